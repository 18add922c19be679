"""The C++, Go, Java and Node example clients against a real server on 127.0.0.1: their answers must equal the
Python client's (decision, live score and identification score to 1e-6). Run by ``make test-clients``, which
builds the clients first; a client that was not built fails here (CI builds all four)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from facegate_client.client import MATCH_NAMES, FacegateClient, clip_from_folder
from tests.conftest import REFERENCE, ROOT, RunningServer, _need, start_server, stop_server

pytestmark = [pytest.mark.weights, pytest.mark.clients]

CLIENTS = ROOT / "clients"


def java_cmd() -> list[str]:
    def make(target: str) -> str:
        return subprocess.run(["make", "-s", "-C", str(CLIENTS / "java"), target], capture_output=True, text=True,
                              check=True).stdout.strip()

    cp = ":".join(str(CLIENTS / "java" / p) if not p.startswith("/") else p for p in make("classpath").split(":"))
    return ["java", *make("jvm-flags").split(), "-cp", cp, "dev.facegate.example.FacegateClient"]


COMMANDS = {
    "cpp": lambda: [str(CLIENTS / "cpp" / "facegate_client")],
    "go": lambda: [str(CLIENTS / "go" / "bin" / "facegate-client")],
    "java": java_cmd,
    "node": lambda: ["node", str(CLIENTS / "node" / "client.js")],
}


def run(lang: str, target: str, *args: str) -> list[list[str]]:
    # Go's flag package stops at the first positional argument: flags go first for every client.
    flags = ["-target", target] if lang == "go" else ["--target", target]
    if "--fps" in args:
        i = args.index("--fps")
        fps = ["-fps" if lang == "go" else "--fps", args[i + 1]]
        args = args[:i] + args[i + 2:]
        flags += fps
    out = subprocess.run([*COMMANDS[lang](), *flags, *args], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "FACEGATE_PROTO_ROOT": str(ROOT / "proto")})
    assert out.returncode == 0, f"{lang}: {out.stdout}\n{out.stderr}"
    return [line.split("\t") for line in out.stdout.strip().splitlines()]


@pytest.fixture(scope="module")
def server(repository_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running, thread = start_server(repository_dir, gallery_path=tmp_path_factory.mktemp("g") / "g.sqlite")
    yield running
    stop_server(running, thread)


@pytest.fixture(scope="module")
def clip_setup(server: RunningServer, repository_dir: Path) -> tuple[str, Path]:
    reports = sorted((repository_dir / "reports").glob("*.json"))
    synth = ROOT / ".cache" / "synthetic" / "motion" / "CASME2_RAW"
    if not reports or not synth.is_dir():
        _need("the trained identification ensemble and its synthetic clips (make identify-models)")
    report = json.loads(reports[0].read_text())
    keys = report["enrol2_gallery"][:6]  # three persons, two clips each
    by_subject: dict[str, list[str]] = {}
    for k in keys:
        subject, clip = k.split("/")[1:]
        by_subject.setdefault(subject, []).append(clip)
    with FacegateClient(server.address, timeout_s=120) as c:
        c.create_collection("clients")
        for subject, clips in by_subject.items():  # one enrolment creates a person with all their clips
            c.enroll("clients", subject, [clip_from_folder(synth / subject / clip, 200.0) for clip in clips])
    probe = next(k for k in report["test_probes"] if k.split("/")[1] == keys[0].split("/")[1])
    return "clients", synth / probe.split("/")[1] / probe.split("/")[2]


@pytest.mark.parametrize("lang", sorted(COMMANDS))
def test_liveness_matches_the_python_client(lang: str, server: RunningServer, samples: Path) -> None:
    images = [str(samples / n) for n in sorted(REFERENCE)]
    lines = run(lang, server.address, "liveness", *images)
    assert len(lines) == 3
    with FacegateClient(server.address) as py:
        for path, line in zip(images, lines, strict=True):
            ref = py.check_liveness(Path(path))
            assert line[0] == path and line[1] == ref.decision
            assert abs(float(line[2].removeprefix("live_score=")) - ref.live_score) <= 1e-6


@pytest.mark.parametrize("lang", sorted(COMMANDS))
def test_identify_matches_the_python_client(lang: str, server: RunningServer, clip_setup: tuple[str, Path]) -> None:
    collection, folder = clip_setup
    (line,) = run(lang, server.address, "identify", collection, str(folder), "--fps", "200")
    with FacegateClient(server.address, timeout_s=120) as py:
        ref = py.identify(collection, clip_from_folder(folder, 200.0))
    assert line[1] == MATCH_NAMES[ref.decision]
    assert line[2] == f"candidate={ref.candidates[0].person_id}"
    assert abs(float(line[3].removeprefix("score=")) - ref.candidates[0].score) <= 1e-6


@pytest.mark.parametrize("lang", sorted(COMMANDS))
def test_deadline_is_honoured(lang: str, server: RunningServer, samples: Path) -> None:
    flag = "-deadline" if lang == "go" else "--deadline-ms"
    value = "1ms" if lang == "go" else "1"
    target_flag = "-target" if lang == "go" else "--target"
    out = subprocess.run([*COMMANDS[lang](), target_flag, server.address, flag, value, "liveness",
                          str(samples / "image_T1.jpg")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "FACEGATE_PROTO_ROOT": str(ROOT / "proto")})
    assert out.returncode == 1 and "ERROR" in out.stdout
    assert "DEADLINE" in out.stdout.upper() or "\t4\t" in out.stdout or "code = 4" in out.stdout


@pytest.fixture(scope="module")
def tls_server(repository_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True)
    running, thread = start_server(repository_dir, gallery_path=d / "g.sqlite", tls_cert=d / "cert.pem",
                                   tls_key=d / "key.pem")
    yield running, d / "cert.pem"
    stop_server(running, thread)


@pytest.mark.parametrize("lang", sorted(COMMANDS))
def test_tls(lang: str, tls_server: tuple[RunningServer, Path], samples: Path) -> None:
    server, ca = tls_server
    target = server.address.replace("127.0.0.1", "localhost")
    flags = ["-target", target, "-tls-ca", str(ca)] if lang == "go" else ["--target", target, "--tls-ca", str(ca)]
    out = subprocess.run([*COMMANDS[lang](), *flags, "liveness", str(samples / "image_T1.jpg")], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "FACEGATE_PROTO_ROOT": str(ROOT / "proto")})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split("\t")[1] == "LIVE"


@pytest.fixture(scope="module")
def auth_server(repository_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    """Bearer tokens on loopback, plus mutual TLS on a second server (the test's own CA and client certificate)."""
    from server.auth.callers import AuthConfig, CallerConfig
    from server.auth.tokens import hash_token, new_token

    d = tmp_path_factory.mktemp("auth")
    token = new_token()
    (d / "token").write_text(token + "\n")
    caller = CallerConfig("example-client", ("liveness",), (hash_token(token),))
    running, thread = start_server(repository_dir, gallery_path=d / "g.sqlite", auth=AuthConfig(callers=(caller,)))
    yield running, d / "token"
    stop_server(running, thread)


@pytest.mark.parametrize("lang", sorted(COMMANDS))
def test_bearer_token(lang: str, auth_server: tuple[RunningServer, Path], samples: Path) -> None:
    server, token = auth_server
    image = str(samples / "image_T1.jpg")
    (line,) = run(lang, server.address, "-token-file" if lang == "go" else "--token-file", str(token), "liveness",
                  image)
    assert line[1] == "LIVE"
    flags = ["-target" if lang == "go" else "--target", server.address]
    out = subprocess.run([*COMMANDS[lang](), *flags, "liveness", image], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FACEGATE_PROTO_ROOT": str(ROOT / "proto")})
    assert out.returncode == 1 and "ERROR" in out.stdout
    assert "UNAUTHENTICATED" in out.stdout.upper() or "\t16\t" in out.stdout or "code = 16" in out.stdout


@pytest.fixture(scope="module")
def mtls_server(repository_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    from server.auth.callers import AuthConfig, CallerConfig
    from tests.certs import CertAuthority

    d = tmp_path_factory.mktemp("mtls")
    ca = CertAuthority(d)
    pem = ca.server_cert()
    ca.client_cert("client", "spiffe://facegate.test/example-client")
    caller = CallerConfig("spiffe://facegate.test/example-client", ("liveness",))
    running, thread = start_server(repository_dir, gallery_path=d / "g.sqlite", tls_cert=pem.cert, tls_key=pem.key,
                                   auth=AuthConfig(client_ca=ca.pem.cert, callers=(caller,)))
    yield running, d
    stop_server(running, thread)


@pytest.mark.parametrize("lang", sorted(COMMANDS))
def test_client_certificate(lang: str, mtls_server: tuple[RunningServer, Path], samples: Path) -> None:
    server, d = mtls_server
    target = server.address.replace("127.0.0.1", "localhost")
    dash = "-" if lang == "go" else "--"
    flags = [f"{dash}target", target, f"{dash}tls-ca", str(d / "facegate_test_CA.crt"),
             f"{dash}tls-cert", str(d / "client.crt"), f"{dash}tls-key", str(d / "client.key")]
    out = subprocess.run([*COMMANDS[lang](), *flags, "liveness", str(samples / "image_T1.jpg")], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "FACEGATE_PROTO_ROOT": str(ROOT / "proto")})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split("\t")[1] == "LIVE"
