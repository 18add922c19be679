"""The served certificate chain checked as a client checks it: one TLS handshake in memory, OpenSSL on both ends,
against the roots that clients trust (``[server] tls_trust_roots``) and for each name they dial
(``[server] tls_server_names``).

``certificates.py`` looks at the served certificate alone. What clients most often refuse after a renewal lies in
the rest of the chain: an intermediate left out of the file, so that clients cannot link the certificate to their
roots ("unable to get local issuer certificate"); an intermediate that has expired; a certificate from an issuer
the clients do not trust (the issuer changed, the clients' bundle did not). OpenSSL loads such a chain without
complaint and gRPC serves it; every client's handshake then fails. gRPC's C-core clients (C++, Python, Ruby, PHP)
verify with BoringSSL or OpenSSL, and Go's, Java's and Node's with verifiers of the same RFC 5280 path rules, so a
chain that OpenSSL refuses here is refused there. Run at start-up and at every reload, like the other checks.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

from server.auth.certificates import TlsFilesError, load_certificates

# A full handshake is two flights each way, in TLS 1.2 and 1.3 alike; the rest is slack.
_MAX_FLIGHTS = 8


def _describe(cert_pem: bytes, cert: Path) -> str:
    """The certificates in the served file, leaf first: whom each names and who issued it, until when."""
    return "; ".join(f"{c.subject.rfc4514_string()} issued by {c.issuer.rfc4514_string()}, until "
                     f"{c.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}" for c in load_certificates(cert_pem, cert))


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str | None) -> None:
    """A full handshake between the two contexts through memory buffers; raises ssl.SSLError as the client or the
    server would."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    c_out, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    near = client.wrap_bio(to_client, c_out, server_hostname=name)
    far = server.wrap_bio(to_server, s_out, server_side=True)
    done = [False, False]
    for _ in range(_MAX_FLIGHTS):
        for i, (end, out, peer_in) in enumerate(((near, c_out, to_server), (far, s_out, to_client))):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done):
            return
    raise ssl.SSLError("the handshake did not complete")


def check_chain(server: ssl.SSLContext, cert: Path, cert_pem: bytes, roots: Path, names: Sequence[str]) -> None:
    """Raises TlsFilesError when a client that trusts the certificates in ``roots`` would refuse the chain that
    ``server`` (the context read_tls loaded from ``cert``, whose text is ``cert_pem``) serves, for any of ``names``
    (or, with no names, whatever name it dialled)."""
    try:
        roots_pem = roots.read_bytes()
    except OSError as exc:
        raise TlsFilesError(f"cannot read the trusted roots ({roots}): {exc.strerror or exc}") from None
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # (certificate and name required, as in every gRPC client)
    try:
        client.load_verify_locations(cadata=roots_pem.decode("ascii", "replace"))
    except ssl.SSLError as exc:
        raise TlsFilesError(f"the trusted roots ({roots}) hold no certificate OpenSSL reads: "
                            f"{exc.reason or exc}") from None
    client.check_hostname = bool(names)
    targets: list[str | None] = [*names] or [None]
    for name in targets:
        try:
            _handshake(server, client, name)
        except ssl.SSLCertVerificationError as exc:
            dialled = f" dialled as {name!r}" if name is not None else ""
            raise TlsFilesError(f"a client that trusts {roots} would refuse the TLS certificate chain in {cert}"
                                f"{dialled}: {exc.verify_message}. The file holds: {_describe(cert_pem, cert)}"
                                ) from None
        except ssl.SSLError as exc:
            raise TlsFilesError(f"a TLS handshake with the certificate chain in {cert} failed: "
                                f"{exc.reason or exc}") from None
