"""TLS certificates for the WebTransport endpoint.

Chromium accepts a self-signed certificate pinned with ``serverCertificateHashes`` only if it is
ECDSA and ``notAfter - notBefore <= 14 days`` (measured: 14.0 days works, 14.05 fails, RSA fails).
So the router makes a fresh ECDSA P-256 certificate at start, hands its SHA-256 to the page and
makes a new one before it expires. A user's own (e.g. CA-signed) certificate is loaded as is.

Keys live in memory. aioquic's public loader only reads files, so :func:`load_into` writes the
PEMs to a private temporary directory (0700, files 0600) and deletes it right after loading.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from carom_runtime.webtransport import MAX_HASH_VALIDITY

#: How far notBefore is set in the past, to tolerate small clock differences.
BACKDATE = timedelta(minutes=1)

#: Key types aioquic can sign a TLS 1.3 handshake with.
_SUPPORTED_KEYS = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


@dataclass(frozen=True)
class CertBundle:
    """A certificate, its key and the figures a WebTransport page needs to pin it."""

    cert_pem: bytes
    "The leaf certificate, PEM."
    key_pem: bytes = field(repr=False)
    "The private key, unencrypted PKCS#8 PEM (kept out of repr so it never lands in a log)."
    der: bytes
    "The leaf certificate, DER: what serverCertificateHashes hashes."
    sha256: bytes
    "SHA-256 of ``der`` (32 bytes)."
    not_before: datetime
    "Start of validity, UTC."
    not_after: datetime
    "End of validity, UTC."
    chain_pem: bytes = b""
    "Intermediate certificates sent after the leaf, PEM (empty for a self-signed one)."

    @property
    def sha256_hex(self) -> str:
        return self.sha256.hex()

    @property
    def sha256_b64(self) -> str:
        return base64.b64encode(self.sha256).decode("ascii")

    @property
    def validity(self) -> timedelta:
        return self.not_after - self.not_before

    @property
    def pinnable(self) -> bool:
        """Whether Chromium would accept this certificate through serverCertificateHashes."""
        key = self.certificate().public_key()
        return isinstance(key, ec.EllipticCurvePublicKey) and self.validity <= MAX_HASH_VALIDITY

    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)


def make_certificate(
    days: float = 13.0, hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1")
) -> CertBundle:
    """Make a self-signed ECDSA P-256 certificate that Chromium accepts by hash.

    ``days`` is the whole validity (notAfter - notBefore), backdating included, so it stays
    within Chromium's 14-day limit.
    """
    validity = timedelta(days=days)
    if not timedelta(0) < validity <= MAX_HASH_VALIDITY:
        raise ValueError(f"days must be within (0, 14] for serverCertificateHashes, got {days}")
    if not hosts:
        raise ValueError("at least one host is needed for the subjectAltName")

    key = ec.generate_private_key(ec.SECP256R1())
    # X.509 times have one-second resolution: truncate so the encoded window is the one checked.
    not_before = datetime.now(UTC).replace(microsecond=0) - BACKDATE
    not_after = not_before + validity
    not_after = not_after.replace(microsecond=0)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _bundle(cert, key, chain=[])


def load_certificate(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    password: bytes | None = None,
) -> CertBundle:
    """Load a user's certificate (first PEM block; the rest is its chain) and private key.

    Fails early, with the file named, when the key does not belong to the certificate or is a
    type aioquic cannot sign with, instead of at the first handshake.
    """
    certs = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=password)
    if not isinstance(key, _SUPPORTED_KEYS):
        raise ValueError(f"{key_path}: unsupported key type {type(key).__name__}")
    if _public_der(key) != certs[0].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ValueError(f"{key_path} is not the key of the certificate in {cert_path}")
    return _bundle(certs[0], key, chain=certs[1:])


def needs_renewal(bundle: CertBundle, now: datetime, margin: timedelta = timedelta(days=2)) -> bool:
    """Whether to replace the certificate now: within ``margin`` of its end, or already past.

    A naive ``now`` is taken as UTC.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return now >= bundle.not_after - margin


def load_into(configuration: QuicConfiguration, bundle: CertBundle) -> None:
    """Install ``bundle`` in an aioquic configuration through its public file loader.

    Connections made afterwards use it; open connections keep the certificate they started with.
    """
    with write_temporary(bundle) as (cert_path, key_path):
        configuration.load_cert_chain(cert_path, key_path)


@contextmanager
def write_temporary(cert: CertBundle | tuple[str, str]) -> Iterator[tuple[str, str]]:
    """Paths of the certificate (chain after the leaf) and key PEM files, for loaders that read
    only files (aioquic's, ``ssl``'s): a bundle's are written to a private temporary directory
    (0700, files 0600) that is deleted on leaving; a pair of paths is passed through."""
    if isinstance(cert, tuple):
        yield cert
        return
    with tempfile.TemporaryDirectory(prefix="carom-cert-") as tmp:  # created 0700
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        _write_private(cert_path, cert.cert_pem + cert.chain_pem)
        _write_private(key_path, cert.key_pem)
        yield cert_path, key_path


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fp:
        fp.write(data)


def _bundle(
    cert: x509.Certificate, key: PrivateKeyTypes, chain: Sequence[x509.Certificate]
) -> CertBundle:
    der = cert.public_bytes(serialization.Encoding.DER)
    return CertBundle(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        der=der,
        sha256=hashlib.sha256(der).digest(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
    )


def _public_der(key: PrivateKeyTypes) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
