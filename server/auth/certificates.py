"""When the TLS certificates stop being valid: checked whenever they are read (start-up and every reload), and
exported so that an alert fires before they expire.

OpenSSL loads an expired certificate without complaint, and gRPC serves it: the server starts and runs, and every
call then fails in the TLS handshake (the clients see UNAVAILABLE). cert-manager renews a certificate in
place well before it expires, so an expired one in the files means the renewal failed: at start-up the server
refuses it with the reason, and a reload keeps the certificate in force (still valid, or it would have been
refused in its turn) instead of swapping in one that no client can accept.

The same holds for a certificate that clients refuse whatever its dates: one whose extended key usage leaves out
serverAuth (a client certificate installed by mistake), or one that does not name the address clients dial (the
names in ``[server] tls_server_names``; the server cannot know them otherwise). Both are refused when read.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from server.auth.callers import CredentialFilesError

log = logging.getLogger(__name__)


class TlsFilesError(CredentialFilesError):
    """TLS files that cannot be read, that OpenSSL refuses, or whose certificates are not valid now."""


# A certificate issued a moment ago by a signer whose clock runs ahead of ours is not refused.
CLOCK_SKEW_S = 300.0
# With less than this left, every read logs a warning (the metrics and their alert are the real watch): a quarter of
# the certificate's life, at most a week. cert-manager renews at a third left (30 days of 90), a SPIFFE agent at
# half, so a healthy rotation never comes this close, whether a certificate lives 90 days or one hour.
WARN_BEFORE_S = 7 * 86400.0
WARN_BEFORE_LIFE = 0.25


class Validity(NamedTuple):
    certificate: str  # server, or client_ca
    not_before: float  # Unix time
    not_after: float


def warn_before_s(lifetime_s: float) -> float:
    """How long before its end a certificate that lives ``lifetime_s`` is warned about (the alert's rule too)."""
    return min(WARN_BEFORE_S, WARN_BEFORE_LIFE * lifetime_s)


def _when(ts: dt.datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def load_certificates(pem: bytes, path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:  # (OpenSSL read the file; this is a bundle cryptography cannot parse)
        raise TlsFilesError(f"cannot read the certificates in {path}: {exc}") from None


def _valid(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc - dt.timedelta(seconds=CLOCK_SKEW_S) <= now < cert.not_valid_after_utc


def validity(cert_pem: bytes, cert_path: Path, client_ca_pem: bytes | None, client_ca_path: Path | None,
             now: dt.datetime | None = None, names: Sequence[str] = ()) -> tuple[Validity, ...]:
    """When each certificate in force is valid from and to: ``server`` (the served certificate, the first in its
    file) and ``client_ca`` (the first to expire of the CAs that client certificates are checked against).
    Raises TlsFilesError for a served certificate that has expired or is not valid yet, that clients refuse
    whatever its dates (``_check_served``, with the ``names`` they dial), or a CA file none of whose certificates
    is valid now."""
    now = now or dt.datetime.now(dt.UTC)
    leaf = load_certificates(cert_pem, cert_path)[0]
    _check_served(leaf, cert_path, names)
    if leaf.not_valid_after_utc <= now:
        raise TlsFilesError(f"the TLS certificate {cert_path} expired at {_when(leaf.not_valid_after_utc)}")
    if not _valid(leaf, now):
        raise TlsFilesError(f"the TLS certificate {cert_path} is not valid before {_when(leaf.not_valid_before_utc)}")
    out = [("server", leaf)]
    if client_ca_pem is not None and client_ca_path is not None:
        cas = load_certificates(client_ca_pem, client_ca_path)
        if not any(_valid(c, now) for c in cas):
            last = max(c.not_valid_after_utc for c in cas)
            raise TlsFilesError(f"none of the {len(cas)} certificate(s) in the client CA file {client_ca_path} is "
                                f"valid now (the last expiry: {_when(last)})")
        out.append(("client_ca", min(cas, key=lambda c: c.not_valid_after_utc)))
    found = tuple(Validity(name, c.not_valid_before_utc.timestamp(), c.not_valid_after_utc.timestamp())
                  for name, c in out)
    for v in found:
        left = v.not_after - now.timestamp()
        if left < warn_before_s(v.not_after - v.not_before):
            log.warning("the TLS %s certificate expires at %s, in %.1f days (%.0f %% of its life)",
                        v.certificate.replace("_", " "), _when(dt.datetime.fromtimestamp(v.not_after, dt.UTC)),
                        left / 86400, 100 * left / (v.not_after - v.not_before))
    return found


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _covers(pattern: str, name: str) -> bool:
    """Whether a SAN DNS name covers ``name`` (RFC 6125: case-insensitive; a wildcard only as the whole left-most
    label, standing for exactly one label)."""
    pattern, name = pattern.rstrip(".").lower(), name.rstrip(".").lower()
    if pattern.startswith("*."):
        first, _, rest = name.partition(".")
        return bool(first) and rest == pattern[2:]
    return pattern == name


_USAGES = {ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth", ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
           ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection", ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
           ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning"}


def _check_served(leaf: x509.Certificate, cert_path: Path, names: Sequence[str]) -> None:
    """Raises TlsFilesError for a served certificate that clients refuse whatever its dates: its extended key usage
    leaves out serverAuth, or its SANs (not its CN, which today's clients ignore) leave out one of ``names``, the
    DNS names and IP addresses that clients dial."""
    usage = _extension(leaf, x509.ExtendedKeyUsage)
    if isinstance(usage, x509.ExtendedKeyUsage) and not {ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(usage):
        raise TlsFilesError(f"the TLS certificate {cert_path} is not for a server: its extended key usage "
                            f"({', '.join(_USAGES.get(u, u.dotted_string) for u in usage)}) leaves out serverAuth")
    if not names:
        return
    san = _extension(leaf, x509.SubjectAlternativeName)
    dns = san.get_values_for_type(x509.DNSName) if isinstance(san, x509.SubjectAlternativeName) else []
    ips = san.get_values_for_type(x509.IPAddress) if isinstance(san, x509.SubjectAlternativeName) else []

    def named(name: str) -> bool:
        try:
            return ipaddress.ip_address(name) in ips
        except ValueError:
            return any(_covers(pattern, name) for pattern in dns)

    missing = [n for n in names if not named(n)]
    if missing:
        raise TlsFilesError(f"the TLS certificate {cert_path} does not name {missing}, which clients dial ([server] "
                            f"tls_server_names); its SANs: {[*dns, *(str(ip) for ip in ips)] or 'none'}")
