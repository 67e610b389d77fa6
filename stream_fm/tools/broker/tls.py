"""A throwaway certificate authority for the secured test broker and ``demo --secure``.

Everything is PEM: the CA certificate (the clients' ``ssl_cafile`` and the broker's truststore),
the broker's key and certificate (one PEM keystore file, its key encrypted, as Kafka requires)
and client certificates for mutual TLS. Made fresh at each start and never reused, so no key
outlives the broker's temporary directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from stream_fm.errors import BrokerStartError

try:  # the dev extra installs it; the plain broker needs no TLS
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:  # pragma: no cover - depends on the environment
    x509 = None  # type: ignore[assignment]

_DAY = dt.timedelta(days=1)


def _ca_usage() -> x509.KeyUsage:
    flags = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
         "encipher_only", "decipher_only"),
        False,
    )  # fmt: skip
    return x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **flags)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key on disk; ``key_password`` is set when the key is encrypted."""

    cert: Path
    key: Path
    key_password: str = ""


def _require() -> None:
    if x509 is None:
        raise BrokerStartError(
            "a secured broker needs the 'cryptography' package: pip install -e '.[dev]'"
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stream-fm test CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey, password: str) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


class CertificateAuthority:
    """``ca = CertificateAuthority.create(dir, "ca")``; ``ca.issue("broker", hosts=[...])``."""

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.directory = directory
        self._key = key
        self._cert = cert
        self.cert_path = directory / f"{_cn(cert)}.pem"

    @classmethod
    def create(cls, directory: Path, name: str = "ca") -> CertificateAuthority:
        _require()
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .sign(key, hashes.SHA256())
        )
        ca = cls(directory, key, cert)
        ca.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return ca

    def issue(
        self,
        name: str,
        hosts: tuple[str, ...] = (),
        key_password: str = "",
        expired: bool = False,
    ) -> Issued:
        """A certificate for ``name`` (its CN, so the mTLS principal is ``User:<name>``).
        ``hosts`` become its subject alternative names (a server's); ``expired`` back-dates it.
        A Java server's key stays unencrypted (Java 17 cannot read PBES2 keys): 0600 in a
        temporary directory."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        start, end = (now - 10 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path = self.directory / f"{name}.pem"
        key_path = self.directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_key_pem(key, key_password))
        key_path.chmod(0o600)
        return Issued(cert_path, key_path, key_password)

    def keystore(self, issued: Issued) -> Path:
        """Kafka's PEM keystore: the (encrypted) key followed by the certificate chain."""
        path = issued.cert.with_suffix(".keystore.pem")
        path.write_bytes(
            issued.key.read_bytes() + issued.cert.read_bytes() + self.cert_path.read_bytes()
        )
        path.chmod(0o600)
        return path


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
