"""When the TLS certificates stop being valid: checked whenever they are read (start-up and every reload), and
exported so that an alert fires before they expire.

OpenSSL loads an expired certificate without complaint, and gRPC serves it: the server starts and runs, and every
call then fails in the TLS handshake (the clients see UNAVAILABLE). cert-manager renews a certificate in
place well before it expires, so an expired one in the files means the renewal failed: at start-up the server
refuses it with the reason, and a reload keeps the certificate in force (still valid, or it would have been
refused in its turn) instead of swapping in one that no client can accept.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from cryptography import x509

from server.auth.callers import CredentialFilesError

log = logging.getLogger(__name__)


class TlsFilesError(CredentialFilesError):
    """TLS files that cannot be read, that OpenSSL refuses, or whose certificates are not valid now."""


# A certificate issued a moment ago by a signer whose clock runs ahead of ours is not refused.
CLOCK_SKEW_S = 300.0
# Below this, every read logs a warning (the metric and its alert are the real watch).
WARN_BEFORE_S = 7 * 86400.0


def _when(ts: dt.datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def _certificates(pem: bytes, path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:  # (OpenSSL read the file; this is a bundle cryptography cannot parse)
        raise TlsFilesError(f"cannot read the certificates in {path}: {exc}") from None


def _valid(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc - dt.timedelta(seconds=CLOCK_SKEW_S) <= now < cert.not_valid_after_utc


def validity(cert_pem: bytes, cert_path: Path, client_ca_pem: bytes | None, client_ca_path: Path | None,
             now: dt.datetime | None = None) -> tuple[tuple[str, float], ...]:
    """When each certificate in force stops being valid (Unix time): ``server`` (the served certificate, the first
    in its file) and ``client_ca`` (the first to expire of the CAs that client certificates are checked against).
    Raises TlsFilesError for a served certificate that has expired or is not valid yet, or a CA file
    none of whose certificates is valid now."""
    now = now or dt.datetime.now(dt.UTC)
    leaf = _certificates(cert_pem, cert_path)[0]
    if leaf.not_valid_after_utc <= now:
        raise TlsFilesError(f"the TLS certificate {cert_path} expired at {_when(leaf.not_valid_after_utc)}")
    if not _valid(leaf, now):
        raise TlsFilesError(f"the TLS certificate {cert_path} is not valid before {_when(leaf.not_valid_before_utc)}")
    out = [("server", leaf.not_valid_after_utc)]
    if client_ca_pem is not None and client_ca_path is not None:
        cas = _certificates(client_ca_pem, client_ca_path)
        if not any(_valid(c, now) for c in cas):
            last = max(c.not_valid_after_utc for c in cas)
            raise TlsFilesError(f"none of the {len(cas)} certificate(s) in the client CA file {client_ca_path} is "
                                f"valid now (the last expiry: {_when(last)})")
        out.append(("client_ca", min(c.not_valid_after_utc for c in cas)))
    for name, until in out:
        if (until - now).total_seconds() < WARN_BEFORE_S:
            log.warning("the TLS %s certificate expires at %s, in %.1f days", name.replace("_", " "), _when(until),
                        (until - now).total_seconds() / 86400)
    return tuple((name, until.timestamp()) for name, until in out)
