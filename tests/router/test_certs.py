"""Certificates Chromium accepts by hash, users' own certificates, renewal."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import stat
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from carom_router.certs import (
    load_certificate,
    load_into,
    make_certificate,
    needs_renewal,
)
from carom_runtime.webtransport import MAX_HASH_VALIDITY


def make_ca_signed(
    tmp_path: Path, password: bytes | None = None, days: int = 90
) -> tuple[Path, Path, x509.Certificate]:
    """A CA and an RSA leaf it signed, written as a user would have them (leaf + chain, key)."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    cert_path, key_path = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    cert_path.write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, encryption)
    )
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    return cert_path, key_path, leaf


def test_made_certificate_is_what_chromium_pins() -> None:
    before = datetime.now(UTC)
    bundle = make_certificate()
    cert = bundle.certificate()
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=13)
    assert bundle.validity == timedelta(days=13) <= MAX_HASH_VALIDITY
    assert cert.not_valid_before_utc <= before <= bundle.not_after
    assert bundle.pinnable
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    private = serialization.load_pem_private_key(bundle.key_pem, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert "key_pem" not in repr(bundle)


def test_validity_limit_is_fourteen_days_backdating_included() -> None:
    assert make_certificate(days=14).validity == timedelta(days=14)
    for days in (14.05, 15, 0, -1):
        with pytest.raises(ValueError, match="14"):
            make_certificate(days=days)
    with pytest.raises(ValueError):
        make_certificate(hosts=())


def test_hash_is_sha256_of_the_der_certificate() -> None:
    bundle = make_certificate(days=1, hosts=("router.example",))
    der = x509.load_pem_x509_certificate(bundle.cert_pem).public_bytes(serialization.Encoding.DER)
    assert bundle.der == der
    assert bundle.sha256 == hashlib.sha256(der).digest()
    assert len(bundle.sha256) == 32
    assert bundle.sha256_hex == hashlib.sha256(der).hexdigest()
    assert base64.b64decode(bundle.sha256_b64) == bundle.sha256
    assert make_certificate().sha256 != make_certificate().sha256  # fresh key each time


def test_needs_renewal() -> None:
    bundle = make_certificate(days=13)
    end = bundle.not_after
    assert not needs_renewal(bundle, datetime.now(UTC))
    assert not needs_renewal(bundle, end - timedelta(days=2, seconds=1))
    assert needs_renewal(bundle, end - timedelta(days=2))
    assert needs_renewal(bundle, end + timedelta(days=1))
    assert needs_renewal(bundle, end - timedelta(days=5), margin=timedelta(days=6))
    naive_utc = (end - timedelta(hours=1)).replace(tzinfo=None)
    assert needs_renewal(bundle, naive_utc)


def test_load_user_certificate_with_chain(tmp_path: Path) -> None:
    cert_path, key_path, leaf = make_ca_signed(tmp_path)
    bundle = load_certificate(cert_path, key_path)
    assert bundle.der == leaf.public_bytes(serialization.Encoding.DER)
    assert bundle.sha256 == hashlib.sha256(bundle.der).digest()
    assert b"BEGIN CERTIFICATE" in bundle.chain_pem
    assert bundle.not_after == leaf.not_valid_after_utc
    assert not bundle.pinnable  # RSA, 91 days: fine for a CA path, not for hashes
    serialization.load_pem_private_key(bundle.key_pem, password=None)  # stored decrypted


def test_load_encrypted_key(tmp_path: Path) -> None:
    cert_path, key_path, _ = make_ca_signed(tmp_path, password=b"s3cret")
    with pytest.raises(TypeError):
        load_certificate(cert_path, key_path)
    assert load_certificate(cert_path, key_path, password=b"s3cret").der


def test_load_refuses_a_key_of_another_certificate(tmp_path: Path) -> None:
    cert_path, _, _ = make_ca_signed(tmp_path)
    other = tmp_path / "other.pem"
    other.write_bytes(make_certificate().key_pem)
    with pytest.raises(ValueError, match="not the key"):
        load_certificate(cert_path, other)


def test_load_into_uses_private_files_and_removes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    seen: list[tuple[int, int]] = []
    configuration = QuicConfiguration(is_client=False)
    original = configuration.load_cert_chain

    def spy(certfile: Any, keyfile: Any = None, password: Any = None) -> None:
        seen.append(
            (
                stat.S_IMODE(os.stat(os.path.dirname(keyfile)).st_mode),
                stat.S_IMODE(os.stat(keyfile).st_mode),
            )
        )
        original(certfile, keyfile, password)

    monkeypatch.setattr(configuration, "load_cert_chain", spy)
    bundle = make_certificate()
    load_into(configuration, bundle)
    assert seen == [(0o700, 0o600)]
    assert list(scratch.iterdir()) == []
    assert configuration.certificate.public_bytes(serialization.Encoding.DER) == bundle.der
    assert configuration.certificate_chain == []
