"""Test certificates made on the fly: a CA, a server certificate for 127.0.0.1/localhost, client certificates
(identity in a SAN URI), and a second CA the server does not trust."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    c, k = folder / f"{stem}.crt", folder / f"{stem}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return Pem(c, k)


# A certificate's validity, from and until, relative to now: by default from 5 minutes ago for a day.
VALID = (dt.timedelta(minutes=-5), dt.timedelta(days=1))


def dates(cert: Path) -> tuple[float, float]:
    """When the (first) certificate in ``cert`` becomes and stops being valid, as Unix time."""
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    return c.not_valid_before_utc.timestamp(), c.not_valid_after_utc.timestamp()


def not_after(cert: Path) -> float:
    """When the (first) certificate in ``cert`` stops being valid, as Unix time."""
    return dates(cert)[1]


class CertAuthority:
    """A root CA, or with ``parent`` an intermediate CA that the parent signs (a leaf it issues is written with the
    intermediate after it, as a served chain is)."""

    def __init__(self, folder: Path, name: str = "facegate test CA",
                 valid: tuple[dt.timedelta, dt.timedelta] = VALID, parent: CertAuthority | None = None) -> None:
        self.folder = folder
        self.parent = parent
        self.key: ec.EllipticCurvePrivateKey = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateBuilder().subject_name(_name(name))
                   .issuer_name(parent.cert.subject if parent else _name(name))
                   .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now + valid[0]).not_valid_after(now + valid[1])
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=True, crl_sign=True, encipher_only=False,
                                                decipher_only=False), critical=True))
        self.cert: x509.Certificate = builder.sign(parent.key if parent else self.key, hashes.SHA256())
        self.pem = _write(folder, name.replace(" ", "_"), self.cert, self.key)

    def chain_pem(self) -> bytes:
        """This CA's certificate and those above it, root excluded: what follows a leaf in a served file."""
        if self.parent is None:
            return b""
        return self.cert.public_bytes(serialization.Encoding.PEM) + self.parent.chain_pem()

    def issue(self, stem: str, cn: str, sans: list[x509.GeneralName], server: bool = False,
              valid: tuple[dt.timedelta, dt.timedelta] = VALID) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usage = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now + valid[0]).not_valid_after(now + valid[1])
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(self.key, hashes.SHA256()))
        pem = _write(self.folder, stem, cert, key)
        if self.parent is not None:
            pem.cert.write_bytes(pem.cert.read_bytes() + self.chain_pem())
        return pem

    def server_cert(self, stem: str = "server", valid: tuple[dt.timedelta, dt.timedelta] = VALID) -> Pem:
        return self.issue(stem, "localhost", [x509.DNSName("localhost"),
                                              x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], server=True,
                          valid=valid)

    def client_cert(self, stem: str, uri: str) -> Pem:
        return self.issue(stem, stem, [x509.UniformResourceIdentifier(uri)])
