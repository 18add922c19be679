"""Credentials reloaded while serving (server.auth.reload).

End to end, a real server process started as an operator starts it (``--config``, ``--tls-cert/--tls-key``,
``reload_poll_s = 0``, so only SIGHUP reloads): a token revoked and another granted, a bad configuration refused with
the credentials in force kept, the TLS certificate replaced while a connection stays open, a key that does not
match its certificate and an expired certificate refused; counted in the metrics (with the served certificate's
end of validity), audited, and no token, hash or key in the log. The poll that
picks up a Kubernetes Secret updated in place (its symlinks swapped, no signal) is tested on the reloader itself.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.server_process import free_port, metrics_text
from facegate.v1 import models_pb2, models_pb2_grpc
from server.auth.callers import AuthConfig, Authenticator
from server.auth.reload import CredentialReloader
from server.auth.tokens import hash_token, new_token
from server.config import ServerConfig
from tests.certs import CertAuthority, Pem, dates
from tests.conftest import ROOT, scrape, wait_until

TOKENS = {name: new_token() for name in ("a", "b")}
HASHES = {name: hash_token(t) for name, t in TOKENS.items()}
DAY = dt.timedelta(days=1)


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    folder: Path
    log: Path

    def channel(self, ca: CertAuthority) -> grpc.Channel:
        return grpc.secure_channel(f"localhost:{self.port}", grpc.ssl_channel_credentials(ca.pem.cert.read_bytes()))

    def code(self, ca: CertAuthority, who: str, channel: grpc.Channel | None = None) -> grpc.StatusCode:
        """ListModels (the operator scope) as caller ``who``, on a new connection trusting ``ca`` or ``channel``."""
        ch = channel or self.channel(ca)
        try:
            models_pb2_grpc.ModelServiceStub(ch).ListModels(
                models_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {TOKENS[who]}"),), timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
        finally:
            if channel is None:
                ch.close()

    def dates(self) -> tuple[float, float]:
        """What the metrics say the served certificate's validity is: from, to."""
        found = scrape(self.metrics_port)
        (start,) = [(dict(labels), value) for (name, labels), value in found.items()
                    if name == "facegate_tls_certificate_not_before_timestamp_seconds"]
        (end,) = [(dict(labels), value) for (name, labels), value in found.items()
                  if name == "facegate_tls_certificate_expiration_timestamp_seconds"]
        assert start[0] == end[0] == {"certificate": "server"}
        return start[1], end[1]

    def reload(self, outcome: str, count: int) -> None:
        """SIGHUP, then until the metrics count ``count`` reloads with ``outcome``."""
        self.proc.send_signal(signal.SIGHUP)
        line = f'facegate_credential_reloads_total{{outcome="{outcome}"}} {float(count)}'
        assert wait_until(lambda: line in (metrics_text(self.metrics_port) or "")), f"no {line!r} in the metrics"
        last = f"facegate_credentials_last_reload_successful {float(outcome == 'applied')}"
        assert last in (metrics_text(self.metrics_port) or "")  # (what FacegateCredentialReloadRefused reads)


def write_config(path: Path, *callers: str, bad: bool = False) -> None:
    """The settings with these callers; the served chain checked for ``localhost`` up to the roots in ``ca.crt``
    beside them (a cert-manager Secret's ``ca.crt``)."""
    text = (f'[server]\ntls_server_names = ["localhost"]\ntls_trust_roots = "{path.parent / "ca.crt"}"\n\n'
            '[auth]\nreload_poll_s = 0.0\n')
    for name in callers:
        text += f'[[auth.callers]]\nname = "ops-{name}"\nscopes = ["operator"]\n'
        text += f'token_hashes = ["{"sha256$00$00" if bad else HASHES[name]}"]\n'
    path.write_text(text)


def install_pem(pem: Pem, folder: Path, cert: bool = True, key: bool = True) -> None:
    if cert:
        shutil.copyfile(pem.cert, folder / "tls.crt")
    if key:
        shutil.copyfile(pem.key, folder / "tls.key")


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertAuthority, CertAuthority]:
    folder = tmp_path_factory.mktemp("cas")
    (folder / "one").mkdir()
    (folder / "two").mkdir()
    return CertAuthority(folder / "one", "reload CA one"), CertAuthority(folder / "two", "reload CA two")


@pytest.fixture(scope="module")
def served(repository_dir: Path, tmp_path_factory: pytest.TempPathFactory,
           cas: tuple[CertAuthority, CertAuthority]) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("reload")
    install_pem(cas[0].server_cert(), folder)
    shutil.copyfile(cas[0].pem.cert, folder / "ca.crt")
    write_config(folder / "facegate.toml", "a")
    port, metrics_port = free_port(), free_port()
    log = folder / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--config", str(folder / "facegate.toml"), "--port", str(port),
             "--model-repository", str(repository_dir), "--metrics-port", str(metrics_port),
             "--tls-cert", str(folder / "tls.crt"), "--tls-key", str(folder / "tls.key"),
             "--gallery-url", f"sqlite:///{folder / 'gallery.sqlite'}", "--audit-log", str(folder / "audit.jsonl")],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    running = Served(proc, port, metrics_port, folder, log)

    def serving() -> bool:
        with running.channel(cas[0]) as ch:
            try:
                return bool(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                            == health_pb2.HealthCheckResponse.SERVING)
            except grpc.RpcError:
                return proc.poll() is not None

    try:
        assert wait_until(serving, 180) and proc.poll() is None, log.read_text()[-2000:]
        yield running
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.weights
@pytest.mark.slow
def test_credentials_are_replaced_whole_or_not_at_all_while_serving(
        served: Served, cas: tuple[CertAuthority, CertAuthority]) -> None:
    one, two = cas
    ok, refused = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED
    assert (served.code(one, "a"), served.code(one, "b")) == (ok, refused)
    assert served.dates() == dates(served.folder / "tls.crt")

    # A token revoked and another granted, with one signal and without a restart.
    write_config(served.folder / "facegate.toml", "b")
    served.reload("applied", 1)
    assert (served.code(one, "a"), served.code(one, "b")) == (refused, ok)

    # A configuration that does not load is refused whole: the credentials in force stay.
    write_config(served.folder / "facegate.toml", "a", bad=True)
    served.reload("refused", 1)
    assert (served.code(one, "a"), served.code(one, "b")) == (refused, ok)

    # A new certificate (from another CA) while a connection made under the old one stays open.
    write_config(served.folder / "facegate.toml", "b")
    kept = served.channel(one)
    assert served.code(one, "b", kept) == ok
    install_pem(two.server_cert(), served.folder)
    # (the roots clients trust during the move: both CAs)
    (served.folder / "ca.crt").write_bytes(one.pem.cert.read_bytes() + two.pem.cert.read_bytes())
    served.reload("applied", 2)
    assert served.code(two, "b") == ok  # new connections get the new certificate
    assert served.code(one, "b") == grpc.StatusCode.UNAVAILABLE  # (the old CA no longer verifies it)
    assert served.code(one, "b", kept) == ok  # and the open connection was not dropped
    kept.close()

    assert served.dates() == dates(served.folder / "tls.crt")  # (the metric follows the certificate)

    # A key that does not match the certificate is refused at the reload, not at every later handshake.
    install_pem(one.server_cert(), served.folder, cert=False)
    served.reload("refused", 2)
    assert served.code(two, "b") == ok
    assert served.proc.poll() is None

    # An expired certificate (a renewal that failed) is refused: OpenSSL would load it and gRPC serve it, and
    # every client's handshake would then fail.
    install_pem(two.server_cert("expired", valid=(-2 * DAY, -dt.timedelta(minutes=1))), served.folder)
    served.reload("refused", 3)
    assert served.code(two, "b") == ok
    assert served.dates()[1] > dt.datetime.now(dt.UTC).timestamp()

    # A valid certificate that does not name the address clients dial ([server] tls_server_names): refused too.
    install_pem(two.issue("elsewhere", "elsewhere", [x509.DNSName("elsewhere.example")], server=True),
                served.folder)
    served.reload("refused", 4)
    assert served.code(two, "b") == ok

    # A certificate from an intermediate CA, renewed into a file without that intermediate: valid, for a server,
    # naming localhost, loaded by OpenSSL, and no client can link it to the root it trusts ([server]
    # tls_trust_roots). Refused; the same certificate with its intermediate is applied and verifies for clients.
    chained = CertAuthority(served.folder, "reload issuing CA", parent=two).server_cert("chained")
    leaf = chained.cert.read_bytes().split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    install_pem(chained, served.folder)
    (served.folder / "tls.crt").write_bytes(leaf)
    served.reload("refused", 5)
    assert served.code(two, "b") == ok
    install_pem(chained, served.folder)
    served.reload("applied", 3)
    assert served.code(two, "b") == ok
    assert served.dates() == dates(served.folder / "tls.crt")

    audit = [json.loads(line) for line in (served.folder / "audit.jsonl").read_text().splitlines()]
    reloads = [(r["caller"], r["outcome"]) for r in audit if r["rpc"] == "ReloadCredentials"]
    assert reloads == [("operator (SIGHUP)", o) for o in ("applied", "refused", "applied", "refused", "refused",
                                                          "refused", "refused", "applied")]
    reasons = [r.get("reason", "") for r in audit if r["rpc"] == "ReloadCredentials"]
    assert "KEY_VALUES_MISMATCH" in reasons[-5] and "tls.crt expired at" in reasons[-4]
    assert "tls.crt does not name ['localhost'], which clients dial" in reasons[-3]
    assert "would refuse the TLS certificate chain in" in reasons[-2]
    assert "dialled as 'localhost': unable to get local issuer certificate" in reasons[-2]
    text = served.log.read_text() + (served.folder / "audit.jsonl").read_text()
    for secret in (*TOKENS.values(), *HASHES.values(), "PRIVATE KEY"):
        assert secret not in text


@pytest.mark.weights
def test_credential_files_that_cannot_serve_stop_the_start_with_the_reason(
        repository_dir: Path, tmp_path: Path, cas: tuple[CertAuthority, CertAuthority]) -> None:
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    cert = cas[0].issue("start-one", "localhost", sans, server=True).cert
    key = cas[1].issue("start-two", "localhost", sans, server=True).key
    (tmp_path / "empty").write_text("# no token yet\n\n")
    expired = cas[0].server_cert("start-expired", valid=(-2 * DAY, -DAY))
    good = cas[0].server_cert("start-good")
    cases = {"KEY_VALUES_MISMATCH": ["--tls-cert", str(cert), "--tls-key", str(key)],
             "does not name ['facegate.example']": ["--tls-cert", str(good.cert), "--tls-key", str(good.key),
                                                     "--tls-server-name", "localhost",
                                                     "--tls-server-name", "facegate.example"],
             "start-expired.crt expired at": ["--tls-cert", str(expired.cert), "--tls-key", str(expired.key)],
             # (start-good is from CA one, whose root is not CA two)
             "would refuse the TLS certificate chain": ["--tls-cert", str(good.cert), "--tls-key", str(good.key),
                                                        "--tls-trust-roots", str(cas[1].pem.cert)],
             "cannot read the TLS files": ["--tls-cert", str(cert), "--tls-key", str(tmp_path / "missing.key")],
             "it holds no token": ["--token-file", str(tmp_path / "empty")],
             "No such file or directory": ["--token-file", str(tmp_path / "missing.token")]}
    for reason, args in cases.items():
        run = subprocess.run([sys.executable, "-m", "server", "--port", "0", "--model-repository", str(repository_dir),
                              "--metrics-port", "0", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert reason in run.stderr


def _secret_version(secret: Path, version: str, token: str) -> None:
    """Write a Secret's new version and swap it in as the kubelet does: files under a versioned folder, the
    ``..data`` symlink replaced in one rename, the file the server reads a symlink through it."""
    (secret / version).mkdir()
    (secret / version / "token").write_text(token)
    (secret / "..data_tmp").symlink_to(version)
    os.replace(secret / "..data_tmp", secret / "..data")
    if not (secret / "token").is_symlink():
        (secret / "token").symlink_to("..data/token")


def test_a_secret_rotated_in_place_is_polled_and_a_refused_one_is_not_retried(tmp_path: Path) -> None:
    """A token rotated with an overlap, as the README tells: the Secret holds the old token, then old and new (one
    a line, while the clients move), then the new one alone; each version is picked up by the poll with no signal.
    A version that holds no valid token is refused once, with the tokens in force kept."""
    secret = tmp_path / "secret"
    secret.mkdir()
    old, new = new_token(), new_token()
    _secret_version(secret, "..v1", old)
    config = ServerConfig(port=0, auth=AuthConfig(token_file=secret / "token", reload_poll_s=0.02))
    installed: list[Authenticator] = []
    outcomes: list[str] = []
    reloader = CredentialReloader(config, installed.append, lambda: config, on_outcome=outcomes.append)
    accepted: list[tuple[bool, bool]] = []

    async def next_outcome(count: int) -> None:
        for _ in range(250):
            if len(outcomes) >= count:
                break
            await asyncio.sleep(0.02)
        assert len(outcomes) == count, outcomes
        accepted.append((installed[-1].from_token(old) is not None, installed[-1].from_token(new) is not None))

    async def run() -> None:
        watching = asyncio.create_task(reloader.watch(0.02))
        await asyncio.sleep(0.3)
        assert outcomes == []  # nothing changed: nothing read again
        _secret_version(secret, "..v2", f"# rotating\n{old}\n{new}\n")
        await next_outcome(1)
        _secret_version(secret, "..v3", f"{new}\n")
        await next_outcome(2)
        _secret_version(secret, "..v4", "too short")  # not a token: refused, and not tried again at each poll
        await asyncio.sleep(0.5)
        _secret_version(secret, "..v5", "# no token left\n")
        await asyncio.sleep(0.5)
        watching.cancel()

    asyncio.run(run())
    assert accepted == [(True, True), (False, True)]
    assert outcomes == ["applied", "applied", "refused", "refused"]
    assert installed[-1].from_token(new) is not None
