"""The cluster's certificate authority and the mutual-TLS contexts built on it.

``pacsp2p ca init DIR`` makes a CA (``ca.crt``, ``ca.key``); ``pacsp2p ca issue DIR NAME``
issues a peer's ``NAME.crt``/``NAME.key``. A peer's name is its certificate's common name.
Both ends of every overlay link present a certificate and accept only one signed by the
cluster CA and currently valid; anything else fails the TLS handshake.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import ssl

CA_DAYS = 3650
PEER_DAYS = 825


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


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pacsp2p cluster"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def init_ca(directory: Path, name: str = "pacsp2p cluster CA") -> Path:
    directory = Path(directory)
    if (directory / "ca.key").exists():
        raise TLSError(f"{directory / 'ca.key'}: a CA already exists here")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(directory / "ca.key", _key_pem(key), private=True)
    _write(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    return directory / "ca.crt"


def issue(directory: Path, peer: str, days: int = PEER_DAYS, out: Path | None = None,
          not_before: datetime.datetime | None = None) -> tuple[Path, Path]:
    """Issue a certificate for *peer* signed by the CA in *directory*."""
    directory, out = Path(directory), Path(out or directory)
    try:
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    except FileNotFoundError as e:
        raise TLSError(f"{e.filename}: no CA here (run 'pacsp2p ca init {directory}')") from None
    key = ec.generate_private_key(ec.SECP256R1())
    now = not_before or datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(peer)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(peer)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
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
            pem = {k: p.read_bytes() for k, p in paths.items()}
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
        """Server and client side alike: present ours, require one from our CA."""
        return ssl.CertificateOptions(
            privateKey=self.own.privateKey.original, certificate=self.own.original,
            verify=True, requireCertificate=True, caCerts=[self.ca.original],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


def peer_name(transport) -> str | None:
    """The common name of the verified certificate on the other end of *transport*."""
    cert = transport.getPeerCertificate()
    if cert is None:
        return None
    cn = cert.get_subject().CN
    return cn


__all__ = ["Credentials", "TLSError", "init_ca", "issue", "peer_name", "SSL"]
