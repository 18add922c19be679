"""The TLS certificates' validity dates (server.auth.certificates), on certificates made for each case: an expired
or not-yet-valid served certificate is refused with the date, a fresh one from a signer whose clock runs a little
ahead is not; a client CA bundle is refused only when none of its CAs is valid, and reports the first to expire;
a certificate close to its end (a quarter of its life left, at most a week) is logged. The server's start-up and
reload with such files: tests/test_credential_reload.py."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography import x509

from server.auth.certificates import CLOCK_SKEW_S, TlsFilesError, validity
from server.auth.reload import read_tls
from server.config import ServerConfig, load_config
from tests.certs import CertAuthority, dates, not_after

DAY = dt.timedelta(days=1)


@pytest.fixture()
def ca(tmp_path: Path) -> CertAuthority:
    return CertAuthority(tmp_path, "validity CA", valid=(-DAY, 30 * DAY))


def test_the_served_certificate_must_be_valid_now(ca: CertAuthority) -> None:
    good = ca.server_cert("good", valid=(-DAY, 20 * DAY))
    assert validity(good.cert.read_bytes(), good.cert, None, None) == (("server", *dates(good.cert)),)
    assert read_tls(good.cert, good.key, None).validity == (("server", *dates(good.cert)),)

    expired = ca.server_cert("expired", valid=(-2 * DAY, -dt.timedelta(seconds=1)))
    with pytest.raises(TlsFilesError, match=r"expired\.crt expired at 20\d\d-\d\d-\d\dT"):
        read_tls(expired.cert, expired.key, None)  # (OpenSSL itself loads it without a word)

    early = ca.server_cert("early", valid=(DAY, 2 * DAY))
    with pytest.raises(TlsFilesError, match="is not valid before"):
        validity(early.cert.read_bytes(), early.cert, None, None)
    # Issued by a signer whose clock runs a minute ahead of ours: accepted.
    fresh = ca.server_cert("fresh", valid=(dt.timedelta(seconds=CLOCK_SKEW_S / 5), 20 * DAY))
    assert validity(fresh.cert.read_bytes(), fresh.cert, None, None)[0][0] == "server"


def test_a_client_ca_bundle_is_refused_only_when_none_of_its_cas_is_valid(tmp_path: Path,
                                                                          ca: CertAuthority) -> None:
    (tmp_path / "old").mkdir()
    old = CertAuthority(tmp_path / "old", "retired CA", valid=(-30 * DAY, -DAY))
    served = ca.server_cert("served", valid=(-DAY, 20 * DAY))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(old.pem.cert.read_bytes() + ca.pem.cert.read_bytes())
    # Old and new CAs side by side (a CA rotation): accepted, and the first to expire is what an alert must see,
    # here already past (the retired CA is still in the file).
    found = {v.certificate: v.not_after for v in read_tls(served.cert, served.key, bundle).validity}
    assert found == {"server": not_after(served.cert), "client_ca": not_after(old.pem.cert)}
    assert found["client_ca"] < dt.datetime.now(dt.UTC).timestamp()

    with pytest.raises(TlsFilesError, match=r"none of the 1 certificate\(s\) in the client CA file .* is valid now"):
        read_tls(served.cert, served.key, old.pem.cert)


def test_a_certificate_close_to_its_end_is_logged_when_read(ca: CertAuthority,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Under a quarter of its life left, and at most a week: a 62-day certificate with 2 days left and a 1-hour one
    with 10 minutes left are logged; a 21-day one with 20 days left and a 1-hour one with half an hour left (a
    healthy rotation, which a fixed week would have flagged) are not."""
    minute = dt.timedelta(minutes=1)
    quiet = [ca.server_cert("lasting", valid=(-DAY, 20 * DAY)),
             ca.server_cert("hour", valid=(-30 * minute, 30 * minute))]
    ending = [ca.server_cert("ending", valid=(-60 * DAY, 2 * DAY)),
              ca.server_cert("hour-end", valid=(-50 * minute, 10 * minute))]
    with caplog.at_level(logging.WARNING, logger="server.auth.certificates"):
        for pem in quiet:
            validity(pem.cert.read_bytes(), pem.cert, None, None)
        assert caplog.records == []
        for pem in ending:
            validity(pem.cert.read_bytes(), pem.cert, None, None)
    long, short = (r.getMessage() for r in caplog.records)
    assert "server certificate expires at" in long and "in 2.0 days (3 % of its life)" in long
    assert "in 0.0 days (17 % of its life)" in short


def test_the_served_certificate_must_be_for_a_server_and_name_what_clients_dial(ca: CertAuthority) -> None:
    served = ca.server_cert("named", valid=(-DAY, 20 * DAY))  # localhost and 127.0.0.1
    read_tls(served.cert, served.key, None, ("localhost", "LOCALHOST.", "127.0.0.1"))
    with pytest.raises(TlsFilesError, match=r"named\.crt does not name \['facegate\.ns\.svc', '::1'\], which clients "
                       r"dial \(\[server\] tls_server_names\); its SANs: \['localhost', '127\.0\.0\.1'\]"):
        read_tls(served.cert, served.key, None, ("localhost", "facegate.ns.svc", "::1"))
    wild = ca.issue("wild", "facegate", [x509.DNSName("*.ns.svc")], server=True)
    read_tls(wild.cert, wild.key, None, ("facegate.ns.svc",))
    for name in ("ns.svc", "a.facegate.ns.svc", ".ns.svc"):  # a wildcard stands for one whole label
        with pytest.raises(TlsFilesError, match="does not name"):
            read_tls(wild.cert, wild.key, None, (name,))
    # A client certificate installed as the server's: refused whatever the names (clients check serverAuth).
    client = ca.issue("client", "desk", [x509.UniformResourceIdentifier("spiffe://corp.example/desk")])
    with pytest.raises(TlsFilesError, match=r"client\.crt is not for a server: its extended key usage \(clientAuth\) "
                       "leaves out serverAuth"):
        read_tls(client.cert, client.key, None)


@pytest.mark.parametrize(("text", "why"), [
    ('tls_server_names = ["facegate.ns.svc"]', "needs tls_cert and tls_key"),
    ('tls_cert = "c"\ntls_key = "k"\ntls_server_names = "facegate.ns.svc"', "must be a list of names"),
    ('tls_cert = "c"\ntls_key = "k"\ntls_server_names = ["*.ns.svc"]', "'\\*.ns.svc' is not a name a client dials"),
    ('tls_cert = "c"\ntls_key = "k"\ntls_server_names = [""]', "'' is not a name a client dials"),
])
def test_tls_server_names_are_names_a_client_dials(text: str, why: str, tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(f"[server]\n{text}\n")
    with pytest.raises(ValueError, match=why):
        load_config(tmp_path / "c.toml")
    assert ServerConfig(tls_cert=Path("c"), tls_key=Path("k"), tls_server_names=("a.b", "10.0.0.1")).tls_server_names


def test_the_served_chain_must_verify_up_to_the_roots_clients_trust(ca: CertAuthority, tmp_path: Path) -> None:
    """With ``tls_trust_roots``, a TLS handshake in memory checks the whole chain as a client would: through the
    intermediate the file must carry, every certificate valid now, to a root the clients trust."""
    issuing = CertAuthority(tmp_path, "issuing CA", valid=(-DAY, 30 * DAY), parent=ca)
    served = issuing.server_cert("chained")
    assert len(x509.load_pem_x509_certificates(served.cert.read_bytes())) == 2
    for names in ((), ("localhost", "127.0.0.1")):
        read_tls(served.cert, served.key, None, names, trust_roots=ca.pem.cert)
    read_tls(served.cert, served.key, None, trust_roots=ca.pem.cert)

    # The renewal wrote the leaf alone: OpenSSL loads it, the server would serve it, and clients cannot link it to
    # their root. Without the roots nothing here can tell.
    leaf_only = tmp_path / "leaf_only.crt"
    leaf_only.write_bytes(served.cert.read_bytes().split(b"-----END CERTIFICATE-----")[0]
                          + b"-----END CERTIFICATE-----\n")
    read_tls(leaf_only, served.key, None, ("localhost",))
    with pytest.raises(TlsFilesError, match=r"a client that trusts .*validity_CA\.crt would refuse the TLS certificate "
                       r"chain in .*leaf_only\.crt dialled as 'localhost': unable to get local issuer certificate\. "
                       r"The file holds: CN=localhost issued by CN=issuing CA, until "):
        read_tls(leaf_only, served.key, None, ("localhost",), trust_roots=ca.pem.cert)

    # An intermediate that expired while the leaf it signed is still valid.
    lapsed = CertAuthority(tmp_path, "lapsed CA", valid=(-10 * DAY, -DAY), parent=ca).server_cert("lapsed")
    with pytest.raises(TlsFilesError, match=r"would refuse the TLS certificate chain in .*lapsed\.crt: certificate has "
                       "expired"):
        read_tls(lapsed.cert, lapsed.key, None, trust_roots=ca.pem.cert)

    # A certificate from an issuer the clients do not trust.
    other = CertAuthority(tmp_path, "other CA")
    with pytest.raises(TlsFilesError, match="unable to get local issuer certificate"):
        read_tls(served.cert, served.key, None, trust_roots=other.pem.cert)

    not_pem = tmp_path / "roots.txt"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(TlsFilesError, match=r"the trusted roots \(.*roots\.txt\) hold no certificate OpenSSL reads"):
        read_tls(served.cert, served.key, None, trust_roots=not_pem)
    with pytest.raises(TlsFilesError, match="cannot read the trusted roots"):
        read_tls(served.cert, served.key, None, trust_roots=tmp_path / "absent.crt")


def test_tls_trust_roots_need_tls(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[server]\ntls_trust_roots = "ca.crt"\n')
    with pytest.raises(ValueError, match=r"tls_trust_roots \(ca\.crt\) needs tls_cert and tls_key"):
        load_config(tmp_path / "c.toml")
    config = ServerConfig(tls_cert=Path("c"), tls_key=Path("k"), tls_trust_roots=Path("ca.crt"))
    assert config.tls_trust_roots == Path("ca.crt")
