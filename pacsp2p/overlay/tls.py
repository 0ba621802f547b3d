"""The cluster's certificate authority and the mutual-TLS contexts built on it.

``pacsp2p ca init DIR`` makes a CA (``ca.crt``, ``ca.key``); ``pacsp2p ca issue DIR NAME``
issues a peer's ``NAME.crt``/``NAME.key``. A peer's name is its certificate's common name.

The same commands make the certificates of DICOM TLS (the facade, modalities,
workstations), from a CA of their own: ``pacsp2p ca init --dicom DIR`` and ``pacsp2p ca
issue DIR NAME --kind server|client [--host H ...]``. The two CAs are kept apart (a peer
certificate is refused from a DICOM CA, a modality's from the cluster CA), because every
certificate of the cluster CA opens the overlay.
Both ends of every overlay link present a certificate and accept only one signed by the
cluster CA and currently valid; anything else fails the TLS handshake.

A refused handshake is told in words, and by which side (``refusal``): "refused by this
peer: their certificate is not signed by this cluster's CA", "refused by the other peer:
it does not trust our certificate (not signed by the CA it trusts)", "... expired",
"name does not match": OpenSSL's verify result on our side (remembered by the verify
callback of ``Credentials.options``) or the TLS alert the other side sent.

``listen`` opens a mutual-TLS port whose connections must complete the handshake within
``[overlay] handshake_timeout`` seconds (default ``HANDSHAKE_TIMEOUT``) or are aborted,
and which holds at most ``MAX_PENDING`` connections that have not completed it: a
connection beyond that is closed at once, before any TLS work. So idle or slow sockets
from anyone on the network cannot pile up and exhaust the peer's file descriptors.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import weakref
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from pacsp2p.smallfile import read_small

log = Logger()

CA_DAYS = 3650
BACKDATE = datetime.timedelta(days=1)   # certificates start a day back: a peer whose clock
                                         # is behind (an NTP step) still accepts fresh ones
PEER_DAYS = 825
MAX_DAYS = 36500              # days a certificate issued may last at most
# the name of a certificate's holder is its file name too (DIR/NAME.crt): a peer's as the
# config takes it; a DICOM node's (a modality's certificate, an AE title) may hold spaces
_PEER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")
CLUSTER_CA = "pacsp2p cluster CA"
DICOM_CA = "pacsp2p DICOM CA"
KINDS = {  # kind -> extended key usages
    "peer": (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    "server": (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    "client": (ExtendedKeyUsageOID.CLIENT_AUTH,),
}
HANDSHAKE_TIMEOUT = 10.0      # seconds for a connection to complete its TLS handshake
MAX_PENDING = 64              # connections per port not through their handshake yet
MAX_PENDING_PER_ADDRESS = 16  # ... of them from one address
REPORT_EVERY = 60.0           # seconds between summary lines of dropped connections
_DNS = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                  r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class TLSError(Exception):
    """Missing or unusable certificates (one-line message naming the file)."""


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str, org: str = "pacsp2p cluster") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def init_ca(directory: Path, name: str = CLUSTER_CA) -> Path:
    directory = Path(directory)
    if (directory / "ca.key").exists():
        raise TLSError(f"{directory / 'ca.key'}: a CA already exists here")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    org = "pacsp2p DICOM" if name == DICOM_CA else "pacsp2p cluster"
    cert = (x509.CertificateBuilder().subject_name(_name(name, org))
            .issuer_name(_name(name, org))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(directory / "ca.key", _key_pem(key), private=True)
    _write(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    return directory / "ca.crt"


def _alt_names(name: str, hosts) -> list:
    """Subject alternative names: *name* if it is a DNS name, and every host (an IP
    address or a DNS name)."""
    out = []
    for h in ([name] if _DNS.match(name) else []) + list(hosts):
        try:
            entry = x509.IPAddress(ipaddress.ip_address(h))
        except ValueError:
            if not _DNS.match(h):
                raise TLSError(f"--host {h!r}: not an IP address or a DNS name") from None
            entry = x509.DNSName(h)
        if entry not in out:
            out.append(entry)
    return out


def issue(directory: Path, peer: str, days: int = PEER_DAYS, out: Path | None = None,
          not_before: datetime.datetime | None = None, kind: str = "peer",
          hosts=()) -> tuple[Path, Path]:
    """Issue a certificate for *peer* signed by the CA in *directory*: *kind* "peer" (an
    overlay member, from the cluster CA), "server" (a DICOM node that accepts and makes
    TLS associations: a facade, a C-MOVE destination) or "client" (a modality that only
    makes them), with *hosts* (addresses, DNS names) as subject alternative names."""
    directory, out = Path(directory), Path(out or directory)
    if kind not in KINDS:
        raise TLSError(f"--kind {kind!r}: must be one of {', '.join(KINDS)}")
    if not (_PEER_NAME if kind == "peer" else _NODE_NAME).fullmatch(peer):
        raise TLSError(f"{peer!r}: a {kind} name must be 1-64 letters, digits, '.', '_' "
                       f"or '-'{'' if kind == 'peer' else ', spaces'} (a letter or digit "
                       f"first): it names the files too")
    if not 1 <= days <= MAX_DAYS:
        raise TLSError(f"--days {days}: must be 1 to {MAX_DAYS}")
    try:
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    except FileNotFoundError as e:
        raise TLSError(f"{e.filename}: no CA here (run 'pacsp2p ca init {directory}')") from None
    ca_names = ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ca_name = ca_names[0].value if ca_names else ""
    if kind == "peer" and ca_name == DICOM_CA:
        raise TLSError(f"{directory}: is a DICOM CA; peers need the cluster CA "
                       f"(use --kind server or client for DICOM nodes)")
    if kind != "peer" and ca_name == CLUSTER_CA:
        raise TLSError(f"{directory}: is the cluster CA, whose certificates open the "
                       f"overlay; make a DICOM CA for {kind}s: pacsp2p ca init --dicom DIR")
    key = ec.generate_private_key(ec.SECP256R1())
    now = not_before or datetime.datetime.now(datetime.timezone.utc)
    org = "pacsp2p cluster" if kind == "peer" else "pacsp2p DICOM"
    cert = (x509.CertificateBuilder().subject_name(_name(peer, org))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.ExtendedKeyUsage(list(KINDS[kind])), critical=False))
    alt = [x509.DNSName(peer)] if kind == "peer" else []
    alt += [a for a in _alt_names(peer, hosts) if a not in alt]
    if alt:
        cert = cert.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = cert.sign(ca_key, hashes.SHA256())
    crt, keyfile = out / f"{peer}.crt", out / f"{peer}.key"
    _write(keyfile, _key_pem(key), private=True)
    _write(crt, cert.public_bytes(serialization.Encoding.PEM))
    if out != directory and not (out / "ca.crt").exists():
        _write(out / "ca.crt", (directory / "ca.crt").read_bytes())
    return crt, keyfile


class Credentials:
    """A peer's certificate and key plus the cluster CA, as Twisted TLS options."""

    def __init__(self, tls_dir: Path, peer: str):
        tls_dir = Path(tls_dir)
        paths = {"ca": tls_dir / "ca.crt", "crt": tls_dir / f"{peer}.crt",
                 "key": tls_dir / f"{peer}.key"}
        try:
            pem = {k: read_small(p) for k, p in paths.items()}
        except FileNotFoundError as e:
            raise TLSError(f"{e.filename}: not found (issue one with "
                           f"'pacsp2p ca issue CA_DIR {peer}')") from None
        self.ca = ssl.Certificate.loadPEM(pem["ca"])
        self.own = ssl.PrivateCertificate.loadPEM(pem["crt"] + pem["key"])
        cn = self.own.getSubject().commonName
        cn = cn.decode() if isinstance(cn, bytes) else cn
        if cn != peer:
            raise TLSError(f"{paths['crt']}: certificate is for {cn!r}, not peer {peer!r}")
        expiry = x509.load_pem_x509_certificate(pem["crt"]).not_valid_after_utc
        if expiry < datetime.datetime.now(datetime.timezone.utc):
            raise TLSError(f"{paths['crt']}: certificate expired on {expiry:%Y-%m-%d}")
        self.name = peer

    def options(self) -> ssl.CertificateOptions:
        """Server and client side alike: present ours, require one from our CA (a
        failed verification is remembered for ``refusal``)."""
        options = ssl.CertificateOptions(
            privateKey=self.own.privateKey.original, certificate=self.own.original,
            verify=True, requireCertificate=True, caCerts=[self.ca.original],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        ctx = options.getContext()
        ctx.set_verify(ctx.get_verify_mode(), _note_verify)
        return options


# -- why a handshake failed, in words -------------------------------------------------

_FAILED_VERIFY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_THEIRS = {   # X509_V_ERR_* of the other side's certificate -> what it means
    2: "is not signed by this cluster's CA", 7: "is not signed by this cluster's CA",
    18: "is self-signed, not signed by this cluster's CA",
    19: "is not signed by this cluster's CA", 20: "is not signed by this cluster's CA",
    21: "is not signed by this cluster's CA", 9: "is not valid yet",
    10: "has expired", 23: "is revoked", 26: "is not made for this use (key usage)",
    62: "name does not match", 64: "name does not match",
}

_ALERTS = (   # the other side's TLS alert (in OpenSSL's reason) -> what it means
    ("unknown ca", "it does not trust our certificate (not signed by the CA it trusts: "
                   "another cluster?)"),
    ("certificate expired", "it says our certificate has expired"),
    ("certificate required", "it wants a certificate and got none"),
    ("bad certificate", "it refused our certificate (bad certificate)"),
    ("certificate unknown", "it refused our certificate (certificate unknown)"),
    ("certificate revoked", "it says our certificate is revoked"),
    ("protocol version", "no TLS version in common (1.2 or later here)"),
    ("decrypt error", "it refused our certificate (its signature does not verify "
                      "against the CA it trusts: another cluster?)"),
    ("handshake failure", "no cipher suite or parameters in common"),
)

_LOCAL = (    # failures seen here without a verify result
    ("peer did not return a certificate", "refused by this peer: no certificate shown"),
    ("certificate verify failed", "refused by this peer: their certificate failed "
                                  "verification against this cluster's CA"),
    ("wrong version number", "not TLS (or a TLS version below 1.2)"),
    ("http request", "not TLS (an HTTP request)"),
    ("unsupported protocol", "TLS version below 1.2"),
    ("no shared cipher", "no cipher suite in common"),
)


def _note_verify(connection, cert, errnum, depth, ok) -> bool:
    """OpenSSL's verify callback: the verdict stays OpenSSL's; a failure's X509_V_* code
    is remembered for ``refusal``."""
    if not ok:
        try:
            _FAILED_VERIFY.setdefault(connection, errnum)
        except TypeError:
            pass
    return bool(ok)


def refusal(transport, reason: str) -> str:
    """Why the TLS handshake on *transport* failed, and which side refused, in words;
    *reason*: the connection's loss reason as OpenSSL gave it."""
    try:
        errnum = _FAILED_VERIFY.get(transport.getHandle())
    except Exception:
        errnum = None
    if errnum is not None:
        what = _THEIRS.get(errnum, f"failed verification (X509 error {errnum})")
        if errnum in (9, 10):       # not valid yet, expired: or is our clock wrong?
            now = datetime.datetime.now(datetime.timezone.utc)
            what += f" (this peer's clock says {now:%Y-%m-%d %H:%M:%S} UTC: is it right?)"
        return f"refused by this peer: their certificate {what}"
    low = (reason or "").lower()
    for words, meaning in _ALERTS:
        if "alert" in low and words in low:
            return f"refused by the other side: {meaning}"
    for words, meaning in _LOCAL:
        if words in low:
            return meaning
    if "connection was closed" in low or "connection lost" in low or "eof" in low:
        return "closed by the other side during the TLS handshake"
    return f"TLS handshake failed: {reason[:200]}"


def peer_name(transport) -> str | None:
    """The common name of the verified certificate on the other end of *transport*."""
    cert = transport.getPeerCertificate()
    if cert is None:
        return None
    cn = cert.get_subject().CN
    return cn


class HandshakeGuard:
    """The connections of one port that have not completed their TLS handshake: how
    many (``pending``), how long they may take (``timeout``), how many at most
    (``limit``, ``per_address`` of them from one address). Anyone can open them, so a
    new one over a limit is never refused: the *oldest* pending one (of the same
    address, for the per-address limit) is closed to make room, as the DICOM acceptor
    does (``dicom.admission``) — a real peer completes its handshake in milliseconds,
    a silent one has had the longest to do so; connections held open by someone can
    then not lock the peers out. What was dropped is counted (``expired``,
    ``evicted``) and logged as one summary line per ``REPORT_EVERY`` seconds at most,
    so a flood cannot flood the log."""

    def __init__(self, reactor, what: str, timeout: float = HANDSHAKE_TIMEOUT,
                 limit: int = MAX_PENDING, per_address: int = MAX_PENDING_PER_ADDRESS):
        self.reactor, self.what, self.timeout = reactor, what, timeout
        self.limit, self.per_address = limit, per_address
        self.waiting: dict = {}                   # protocol -> its address, oldest first
        self.expired = self.evicted = 0           # since start
        self._unreported = [0, 0]                 # expired, evicted since the last line
        self._reported_at: float | None = None

    @property
    def pending(self) -> int:
        return len(self.waiting)

    def make_room(self, host: str) -> None:
        """Before a connection from *host* is taken: close the oldest pending one if a
        limit is reached."""
        mine = [p for p, h in self.waiting.items() if h == host]
        victim = mine[0] if len(mine) >= self.per_address else \
            next(iter(self.waiting)) if len(self.waiting) >= self.limit else None
        if victim is not None:
            self.forget(victim)
            self.evicted += 1
            self._note(1)
            victim.transport.abortConnection()

    def add(self, proto, host: str) -> None:
        self.waiting[proto] = host

    def forget(self, proto) -> None:
        self.waiting.pop(proto, None)

    def timed_out(self) -> None:
        self.expired += 1
        self._note(0)

    def _note(self, kind: int) -> None:
        self._unreported[kind] += 1
        now = self.reactor.seconds()
        if self._reported_at is not None and now - self._reported_at < REPORT_EVERY:
            return
        expired, evicted = self._unreported
        self._unreported, self._reported_at = [0, 0], now
        log.warn("{what}: dropped {expired} connections that did not complete the TLS "
                 "handshake within {timeout:g} s and closed the oldest pending one "
                 "{evicted} times to make room ({limit} pending handshakes at most, "
                 "{per} from one address; next summary in {every:g} s at most)",
                 what=self.what, expired=expired, evicted=evicted, timeout=self.timeout,
                 limit=self.limit, per=self.per_address, every=REPORT_EVERY)


@implementer(IHandshakeListener)
class _Guarded(ProtocolWrapper):
    """Inside the TLS layer: aborts the connection unless the handshake completes in
    time, then steps aside (passes the news on to the protocol it wraps)."""

    _timer = None

    def makeConnection(self, transport):
        guard = self.factory.guard
        peer = transport.getPeer()
        guard.add(self, getattr(peer, "host", ""))
        self._timer = guard.reactor.callLater(guard.timeout, self._expire)
        super().makeConnection(transport)

    def _release(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.factory.guard.forget(self)

    def _expire(self) -> None:
        self._timer = None
        self.factory.guard.timed_out()
        self.transport.abortConnection()

    def handshakeCompleted(self):
        self._release()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason):
        self._release()
        super().connectionLost(reason)


class _Guarding(WrappingFactory):
    protocol = _Guarded
    noisy = False

    def __init__(self, factory, guard: HandshakeGuard):
        super().__init__(factory)
        self.guard = guard


class _GuardedTLSFactory(TLSMemoryBIOFactory):
    noisy = False

    def __init__(self, options, factory, guard: HandshakeGuard):
        super().__init__(options, False, _Guarding(factory, guard))
        self.guard = guard

    def buildProtocol(self, addr):
        self.guard.make_room(getattr(addr, "host", ""))
        return super().buildProtocol(addr)


def listen(reactor, port: int, factory, options, interface: str = "", what: str = "port",
           timeout: float = HANDSHAKE_TIMEOUT, limit: int = MAX_PENDING):
    """Like ``reactor.listenSSL``, with a ``HandshakeGuard`` (``port.guard``)."""
    guard = HandshakeGuard(reactor, what, timeout, limit)
    listening = reactor.listenTCP(port, _GuardedTLSFactory(options, factory, guard),
                                  interface=interface)
    listening.guard = guard
    return listening


__all__ = ["Credentials", "HandshakeGuard", "TLSError", "init_ca", "issue", "listen",
           "peer_name", "refusal", "SSL"]
