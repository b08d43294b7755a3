"""A site CA and the three identities of the on-demand data plane, made with `cryptography`.

Each identity's certificate says what it may do through its extended key usage, which OpenSSL
checks during the handshake: a pilot's certificate serves (serverAuth) and cannot act as a
client; the gateway's and the metrics scraper's are clients (clientAuth) and cannot serve. So a
stolen metrics key cannot impersonate a pilot, and a pilot's key cannot call another pilot.
Compute nodes have no stable host names, so a pilot's certificate names no host: the gateway
checks the chain against the site CA, not a host name.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class Role(enum.Enum):
    """What a certificate lets its holder do."""

    pilot = "pilot"
    gateway = "gateway"
    metrics = "metrics"


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM-encoded, ready to write to files."""

    certificate: bytes
    key: bytes


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create_ca(common_name: str, organization: str, days: int) -> Issued:
    """A self-signed CA that may sign end certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name, organization)
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: Issued,
    role: Role,
    common_name: str,
    *,
    days: float,
    organization: str | None = None,
    not_before: datetime.datetime | None = None,
) -> Issued:
    """A certificate for `role` signed by `ca`. `not_before` is for tests of expiry only."""
    ca_certificate = x509.load_pem_x509_certificate(ca.certificate)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an elliptic-curve key made by this tool")
    ca_org = ca_certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    org = organization or (str(ca_org[0].value) if ca_org else "inference-gateway")
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - datetime.timedelta(minutes=5)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role is Role.pilot else ExtendedKeyUsageOID.CLIENT_AUTH
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, org))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def subject_of(pem_or_der: bytes) -> str:
    """The certificate's subject as an RFC 4514 string, such as `CN=gateway,O=Example Lab`: the
    form in which pilots are told which subjects to accept."""
    if pem_or_der.lstrip().startswith(b"-----BEGIN"):
        certificate = x509.load_pem_x509_certificate(pem_or_der)
    else:
        certificate = x509.load_der_x509_certificate(pem_or_der)
    return certificate.subject.rfc4514_string()


def expires_at(certificate_file: Path) -> datetime.datetime:
    """When the (first) certificate in `certificate_file` stops being valid."""
    certificate = x509.load_pem_x509_certificate(certificate_file.read_bytes())
    return certificate.not_valid_after_utc


def write(issued: Issued, certificate_file: Path, key_file: Path) -> None:
    """Writes the pair, the key readable by its owner only (created so, never widened after)."""
    certificate_file.write_bytes(issued.certificate)
    key_file.touch(mode=0o600, exist_ok=False)
    key_file.write_bytes(issued.key)
