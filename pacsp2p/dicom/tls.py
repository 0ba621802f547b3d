"""DICOM over TLS (PS3.15 annex B: the BCP 195 TLS profiles), for the acceptor and the SCU.

Both ends use one profile, that of BCP 195 (RFC 9325) as PS3.15 B.9-B.11 adopt it: TLS 1.2
or newer, only ephemeral key exchange (ECDHE, DHE) with authenticated encryption
(AES-GCM, ChaCha20-Poly1305), no compression, no session tickets — so no RC4, 3DES, CBC,
NULL, export, anonymous or static-RSA suites, and no SSLv3/TLS 1.0/1.1. DCMTK's default
client profile ("Non-downgrading BCP 195") and Python's ``ssl`` defaults meet it.

- ``server_options``: the acceptor's certificate and key; with a CA file, client
  certificates are verified against it and, when ``require_client_cert``, required (a
  client with none, or one from another CA, fails the handshake).
- ``client_options``: the SCU's side towards a TLS destination: the destination's
  certificate must chain to the CA file (its host name is not checked, as DICOM nodes
  are often reached by address); our certificate is presented when given.
- ``TLSFactory``: a listening factory adding TLS to a wrapped factory, which keeps the
  wrapped factory's right to refuse a connection before any TLS work (the acceptor's
  admission caps).
- ``peer_name``: the common name of a verified peer certificate.
- ``settings_options``: all of it from the ``[facade]`` and ``[destinations]`` settings,
  every file checked (for the facade, and for ``pacsp2p check-config``);
  ``admin_options``: the admin endpoint's HTTPS (``[admin] tls_cert``).

Files are read once, when the options are built; errors are ``TLSFilesError`` with one
line naming the file and the reason (the caller adds the config key).
"""

from __future__ import annotations

import datetime
import weakref
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.protocols.tls import TLSMemoryBIOFactory

from pacsp2p.config import ConfigError
from pacsp2p.smallfile import read_small

BCP195_CIPHERS = ("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:"
                  "!aNULL:!eNULL:!MD5:!DSS:!PSK:!SRP")
MINIMUM = ssl.TLSVersion.TLSv1_2


class TLSFilesError(Exception):
    """A certificate, key or CA file that cannot be used (one line: file and reason);
    ``role`` is "cert", "key" or "ca"."""

    def __init__(self, message: str, role: str = "cert"):
        super().__init__(message)
        self.role = role


_ROLES = {"certificate": "cert", "private key": "key", "CA certificate": "ca"}


def _read(path: Path, what: str) -> bytes:
    try:
        return read_small(path)
    except FileNotFoundError:
        raise TLSFilesError(f"{path}: {what} not found", _ROLES[what]) from None
    except OSError as e:
        raise TLSFilesError(f"{path}: cannot read the {what} ({e.strerror})",
                            _ROLES[what]) from None


def _certificates(path: Path, what: str) -> list:
    """Every certificate of a PEM file (a CA file may hold several), as cryptography
    objects; an expired one is an error."""
    pem = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise TLSFilesError(f"{path}: not a PEM {what}", _ROLES[what]) from None
    now = datetime.datetime.now(datetime.timezone.utc)
    for cert in certs:
        if cert.not_valid_after_utc < now:
            raise TLSFilesError(f"{path}: {what} expired on "
                                f"{cert.not_valid_after_utc:%Y-%m-%d}", _ROLES[what])
    return certs


def _authorities(path: Path) -> list:
    """The CA certificates of *path* as the trust store wants them (pyOpenSSL)."""
    return [crypto.X509.from_cryptography(c) for c in _certificates(path, "CA certificate")]


def _own(cert: Path, key: Path) -> dict:
    """Our certificate (and its chain) and key as CertificateOptions arguments, checked
    to belong together."""
    chain = _certificates(cert, "certificate")
    try:
        pkey = serialization.load_pem_private_key(_read(key, "private key"), None)
    except (ValueError, TypeError):
        raise TLSFilesError(f"{key}: not a PEM private key without a passphrase",
                            "key") from None
    own = dict(privateKey=pkey, certificate=chain[0], extraCertChain=chain[1:])
    try:
        ssl.CertificateOptions(**own).getContext()     # checks that key and cert match
    except Exception:
        raise TLSFilesError(f"{key}: this key does not belong to {cert}", "key") from None
    return own


def _ciphers():
    return ssl.AcceptableCiphers.fromOpenSSLCipherString(BCP195_CIPHERS)


@lru_cache(maxsize=32)
def server_options(cert: Path, key: Path, ca: Path | None,
                   require_client_cert: bool) -> ssl.CertificateOptions:
    """The acceptor's TLS options (see the module docstring)."""
    own = _own(cert, key)
    if require_client_cert and ca is None:
        raise TLSFilesError("requiring client certificates needs a CA file to check them",
                            "ca")
    cas = _authorities(ca) if ca is not None else None
    return _remember_failures(ssl.CertificateOptions(
        verify=cas is not None, caCerts=cas, requireCertificate=require_client_cert,
        raiseMinimumTo=MINIMUM, acceptableCiphers=_ciphers(), **own))


@lru_cache(maxsize=32)
def client_options(cert: Path | None, key: Path | None,
                   ca: Path) -> ssl.CertificateOptions:
    """The SCU's TLS options towards a destination (see the module docstring)."""
    cas = _authorities(ca)
    kw = _own(cert, key) if cert is not None and key is not None else {}
    return ssl.CertificateOptions(verify=True, caCerts=cas, raiseMinimumTo=MINIMUM,
                                  acceptableCiphers=_ciphers(), **kw)


def same_ca(a: Path, b: Path) -> bool:
    """Whether the PEM files *a* and *b* hold a certificate in common."""
    def fingerprints(path):
        try:
            return {c.fingerprint(hashes.SHA256())
                    for c in x509.load_pem_x509_certificates(read_small(path))}
        except (OSError, ValueError):
            return set()
    return bool(fingerprints(a) & fingerprints(b))


def settings_options(settings):
    """The options of the facade's TLS port of *settings* (config.Settings; None without
    ``tls_port``), after the client side of every TLS destination has been checked too;
    raises ``config.ConfigError`` (one line: file, key, reason). The facade's CA must not
    be the overlay's: a certificate made for a modality would then open the overlay.
    Used by the facade and by the checks before start (``pacsp2p check-config``)."""
    fs = settings.facade
    server = None
    if fs.tls_port:
        overlay = settings.overlay
        if fs.tls_ca is not None and overlay is not None and \
                same_ca(fs.tls_ca, overlay.tls_dir / "ca.crt"):
            raise ConfigError(f"{settings.source}: facade.tls_ca: is the cluster CA of the "
                              f"overlay; modalities need a CA of their own ('pacsp2p ca "
                              f"init --dicom DIR'), or their certificates would open the "
                              f"overlay too")
        try:
            server = server_options(fs.tls_cert, fs.tls_key, fs.tls_ca,
                                    fs.tls_require_client_cert)
        except TLSFilesError as e:
            raise ConfigError(f"{settings.source}: facade.tls_{e.role}: {e}") from None
    for dest in settings.destinations.values():
        if getattr(dest, "tls", False):
            try:
                client_options(dest.tls_cert, dest.tls_key, dest.tls_ca)
            except TLSFilesError as e:
                raise ConfigError(f"{settings.source}: destinations.{dest.ae_title}.tls: "
                                  f"{e}") from None
    return server


def admin_options(settings):
    """The admin endpoint's HTTPS options (``[admin] tls_cert``, ``tls_key``; the same
    BCP 195 profile), None without ``tls_cert``. A client certificate is not required
    (password users connect without one); with ``tls_client_ca`` one that is shown must
    chain to it. Raises ``config.ConfigError`` naming ``admin.tls_*``."""
    ad = settings.admin
    if getattr(ad, "tls_cert", None) is None:
        return None
    try:
        return server_options(ad.tls_cert, ad.tls_key, ad.tls_client_ca, False)
    except TLSFilesError as e:
        key = {"cert": "tls_cert", "key": "tls_key", "ca": "tls_client_ca"}[e.role]
        raise ConfigError(f"{settings.source}: admin.{key}: {e}") from None


class TLSFactory(TLSMemoryBIOFactory):
    """Server-side TLS around *factory*; a connection it refuses (``buildProtocol``
    returning None) is closed at once, before any TLS work."""

    noisy = False

    def __init__(self, options, factory):
        super().__init__(options, False, factory)

    def buildProtocol(self, addr):
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return self.protocol(self, inner)


_HANDSHAKE_ERRORS = (   # words in OpenSSL's reason -> what it means, in words
    ("peer did not return a certificate", "no client certificate"),
    ("certificate required", "no client certificate"),
    ("certificate expired", "certificate expired"),
    ("unknown ca", "certificate not signed by the configured CA"),
    ("certificate verify failed", "certificate not signed by the configured CA"),
    ("signature failure", "certificate not signed by the configured CA"),
    ("unsupported protocol", "TLS version below 1.2"),
    ("wrong version number", "not TLS, or a TLS version below 1.2"),
    ("no shared cipher", "no BCP 195 cipher suite in common"),
    ("http request", "not TLS (an HTTP request)"),
)


_VERIFY_ERRORS = {   # X509_V_ERR_* -> what it means, in words
    9: "certificate not valid yet", 10: "certificate expired",
    2: "certificate not signed by the configured CA",
    7: "certificate not signed by the configured CA",
    18: "self-signed certificate", 19: "certificate not signed by the configured CA",
    20: "certificate not signed by the configured CA",
    21: "certificate not signed by the configured CA",
    23: "certificate revoked", 26: "certificate not made for this use (key usage)",
}


def handshake_error(reason: str, verify_result: int | None = None) -> str:
    """Why a TLS handshake failed, in words where OpenSSL's reason (or the result of
    verifying the peer's certificate, *verify_result*) is a known one."""
    if verify_result in _VERIFY_ERRORS:
        return _VERIFY_ERRORS[verify_result]
    low = reason.lower()
    for words, meaning in _HANDSHAKE_ERRORS:
        if words in low:
            return meaning
    return ""


_FAILED_VERIFY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _note_verify(connection, cert, errnum, depth, ok) -> bool:
    """OpenSSL's verify callback: the verdict stays OpenSSL's; a failure's X509_V_* code
    is remembered for the log line (``verify_result``)."""
    if not ok:
        try:
            _FAILED_VERIFY[connection] = errnum
        except TypeError:
            pass
    return bool(ok)


def _remember_failures(options: ssl.CertificateOptions) -> ssl.CertificateOptions:
    ctx = options.getContext()
    ctx.set_verify(ctx.get_verify_mode(), _note_verify)
    return options


def verify_result(transport) -> int | None:
    """The X509_V_* code of the failed verification of the peer's certificate on a TLS
    *transport* whose handshake just failed (None if it did not fail there)."""
    try:
        return _FAILED_VERIFY.get(transport.getHandle())
    except Exception:
        return None


def peer_name(transport) -> str | None:
    """The common name of the verified certificate at the other end of *transport* (a
    TLS transport), or None."""
    get = getattr(transport, "getPeerCertificate", None)
    cert = get() if get is not None else None
    if cert is None:
        return None
    cn = cert.get_subject().CN
    return cn if isinstance(cn, str) else None
