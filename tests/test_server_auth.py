"""Caller identity, scopes, no identity takeover and the audit log, through real servers: one with bearer tokens,
one with mutual TLS (certificates made by the test)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from benchmarks.server_process import free_port
from facegate.v1 import (
    common_pb2,
    identification_pb2,
    identification_pb2_grpc,
    liveness_pb2,
    liveness_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from facegate_client.client import (
    FacegateClient,
    clip_from_folder,
    field_violations,
    retry_after,
    tls_credentials,
)
from inference import grpc_service_pb2 as inference_pb2
from inference import grpc_service_pb2_grpc as inference_grpc
from server.audit import AuditConfig
from server.auth.callers import AuthConfig, Authenticator, CallerConfig
from server.auth.tokens import hash_token, new_token
from server.config import load_config
from tests.certs import CertAuthority
from tests.conftest import ROOT, RunningServer, image_python, scrape, start_entrypoint, start_server, stop_server

TOKENS = {name: new_token() for name in ("live", "enrol", "staff", "ops", "burst", "paced", "metered", "batched")}
SCOPES = {"live": ("liveness",), "enrol": ("enrol", "identify", "liveness"), "staff": ("enrol:staff", "identify:staff"),
          "ops": ("operator",), "burst": ("liveness",), "paced": ("liveness",), "metered": ("operator",),
          "batched": ("operator",)}
MAX_IN_FLIGHT = {"burst": 2}
RATE = {"paced": (1.0, 2), "metered": (1.0, 3), "batched": (1.0, 3)}  # (rate_per_s, burst)
CALL_COSTS = {"ListModels": 3.0}  # "metered" lists; "batched" only infers (ModelInfer costs 1 a batch item)
SYNTH = Path(os.environ.get("FACEGATE_SYNTHETIC_DIR") or ROOT / ".cache" / "synthetic" / "motion") / "CASME2_RAW"


def clip_folder(subject: int = 1, index: int = 0) -> Path:
    folders = sorted((SYNTH / f"sub{subject:02d}").iterdir())
    return folders[index]


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def token_metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def token_server(repository_dir: Path, tmp_path_factory: pytest.TempPathFactory, audit_path: Path,
                 token_metrics_port: int) -> Iterator[RunningServer]:
    if not SYNTH.is_dir():
        pytest.fail(f"the synthetic clips are missing in {SYNTH} (make identify-models)")
    callers = tuple(CallerConfig(f"svc-{n}", SCOPES[n], (hash_token(t),), MAX_IN_FLIGHT.get(n, 0),
                                 *RATE.get(n, (0.0, 0))) for n, t in TOKENS.items())
    running, thread = start_server(repository_dir, gallery_path=tmp_path_factory.mktemp("g") / "g.sqlite",
                                   auth=AuthConfig(callers=callers, call_costs=CALL_COSTS),
                                   audit=AuditConfig(path=audit_path),
                                   metrics_port=token_metrics_port)
    yield running
    stop_server(running, thread)


def as_caller(name: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[name]}"),) if name else ()


def check(server: RunningServer, image: bytes, who: str | None) -> liveness_pb2.CheckLivenessResponse:
    stub = liveness_pb2_grpc.LivenessServiceStub(server.channel())
    return stub.CheckLiveness(liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=image)),
                              metadata=as_caller(who), timeout=30)


def code_of(fn) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()  # type: ignore[no-any-return]


def test_tokens_identify_callers_and_scopes_gate_each_rpc(token_server: RunningServer, samples: Path) -> None:
    live = (samples / "image_T1.jpg").read_bytes()
    assert code_of(lambda: check(token_server, live, None)) == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", "Bearer " + new_token()),)
    stub = liveness_pb2_grpc.LivenessServiceStub(token_server.channel())
    req = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=live))
    assert code_of(lambda: stub.CheckLiveness(req, metadata=wrong, timeout=30)) == grpc.StatusCode.UNAUTHENTICATED
    assert check(token_server, live, "live").decision == liveness_pb2.DECISION_LIVE
    assert code_of(lambda: check(token_server, live, "ops")) == grpc.StatusCode.PERMISSION_DENIED
    models = models_pb2_grpc.ModelServiceStub(token_server.channel())
    assert code_of(lambda: models.ListModels(models_pb2.ListModelsRequest(), metadata=as_caller("live"),
                                             timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
    assert models.ListModels(models_pb2.ListModelsRequest(), metadata=as_caller("ops"), timeout=10).models
    # Health stays open for probes.
    health = health_pb2_grpc.HealthStub(token_server.channel())
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def test_a_caller_over_its_own_max_in_flight_is_refused_while_others_are_served(
        token_server: RunningServer, token_metrics_port: int, samples: Path) -> None:
    """svc-burst may have 2 calls in flight: of 32 sent at once, those beyond its 2 get RESOURCE_EXHAUSTED (naming
    its limit, with RetryInfo), while another caller's call in the middle of the burst is served."""
    image = (samples / "image_T1.jpg").read_bytes()
    stub = liveness_pb2_grpc.LivenessServiceStub(token_server.channel())
    req = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=image))
    before = per_caller(token_metrics_port)
    burst = [stub.CheckLiveness.future(req, metadata=as_caller("burst"), timeout=30) for _ in range(32)]
    assert check(token_server, image, "live").decision == liveness_pb2.DECISION_LIVE
    codes = [f.code() for f in burst]
    ok, full = codes.count(grpc.StatusCode.OK), codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert ok >= 2 and full >= 1 and ok + full == len(codes), codes
    refused = next(f for f in burst if f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "svc-burst" in refused.details() and "max_in_flight" in refused.details()
    status = rpc_status.from_call(refused)
    assert status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
    # Its calls in flight went back to none: it is served again.
    assert check(token_server, image, "burst").decision == liveness_pb2.DECISION_LIVE
    # The metrics count each caller's calls apart, its refusals included (a call with no credential as "none").
    assert code_of(lambda: check(token_server, image, None)) == grpc.StatusCode.UNAUTHENTICATED
    counted = {k: v - before.get(k, 0.0) for k, v in per_caller(token_metrics_port).items() if v != before.get(k)}
    assert counted == {("svc-burst", "OK"): ok + 1, ("svc-burst", "RESOURCE_EXHAUSTED"): full,
                       ("svc-live", "OK"): 1, ("none", "UNAUTHENTICATED"): 1}, counted


def test_a_caller_over_its_own_rate_is_told_when_to_retry_while_others_are_served(
        token_server: RunningServer, token_metrics_port: int, samples: Path) -> None:
    """svc-paced may start 1 call a second, in bursts of 2: of 6 calls one after another (empty requests, a few ms
    each: the rate counts calls started, before their request is read) the first 2 are admitted and the rest get
    RESOURCE_EXHAUSTED naming its rate, with RetryInfo saying when a call is allowed again; another caller is
    served meanwhile, and svc-paced is served again once that time has passed."""
    image = (samples / "image_T1.jpg").read_bytes()
    stub = liveness_pb2_grpc.LivenessServiceStub(token_server.channel())
    before = per_caller(token_metrics_port)
    codes, refusals = [], []
    for _ in range(6):
        try:
            stub.CheckLiveness(liveness_pb2.CheckLivenessRequest(), metadata=as_caller("paced"), timeout=30)
        except grpc.RpcError as err:
            codes.append(err.code())
            refusals.append(err)
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 2 + [exhausted] * 4, codes
    assert "'svc-paced' is over its rate_per_s = 1 (burst 2)" in refusals[2].details()
    delay = retry_after(refusals[-1])  # (the Python client's reading of RetryInfo)
    assert delay is not None and 0.0 < delay <= 1.0
    assert retry_after(refusals[0]) is None  # INVALID_ARGUMENT carries none
    assert check(token_server, image, "live").decision == liveness_pb2.DECISION_LIVE
    time.sleep(delay + 0.05)
    assert check(token_server, image, "paced").decision == liveness_pb2.DECISION_LIVE
    counted = {k: v - before.get(k, 0.0) for k, v in per_caller(token_metrics_port).items() if v != before.get(k)}
    assert counted == {("svc-paced", "INVALID_ARGUMENT"): 2, ("svc-paced", "RESOURCE_EXHAUSTED"): 4,
                       ("svc-paced", "OK"): 1, ("svc-live", "OK"): 1}, counted


def test_a_costly_call_takes_its_cost_from_the_callers_rate(token_server: RunningServer) -> None:
    """[auth.call_costs] ListModels = 3: svc-metered (1 a second, bursts of 3) lists the models once, then is told
    to wait ~3 s for another list and ~1 s for a call of cost 1; a caller without a rate is not held to it."""
    models = models_pb2_grpc.ModelServiceStub(token_server.channel())
    assert models.ListModels(models_pb2.ListModelsRequest(), metadata=as_caller("metered"), timeout=10).models
    with pytest.raises(grpc.RpcError) as listing:
        models.ListModels(models_pb2.ListModelsRequest(), metadata=as_caller("metered"), timeout=10)
    assert listing.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'svc-metered' is over its rate_per_s = 1 (burst 3; this call costs 3)" in listing.value.details()
    delay = retry_after(listing.value)
    assert delay is not None and 2.5 < delay <= 3.0
    with pytest.raises(grpc.RpcError) as stats:
        models.GetModelStatistics(models_pb2.GetModelStatisticsRequest(), metadata=as_caller("metered"), timeout=10)
    assert stats.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "costs" not in stats.value.details()
    delay = retry_after(stats.value)
    assert delay is not None and 0.5 < delay <= 1.0
    for _ in range(3):
        assert models.ListModels(models_pb2.ListModelsRequest(), metadata=as_caller("ops"), timeout=10).models


def test_an_inference_request_pays_for_each_item_of_its_batch(token_server: RunningServer) -> None:
    """ModelInfer costs 1 a batch item: svc-batched (1 a second, bursts of 3) is told that a batch of 4 can never
    fit its bucket (INVALID_ARGUMENT on the shape, nothing taken), is served a batch of 2, is told to wait ~1 s for
    another 2 (1 token left, where a per-call cost would have admitted it), and is served it after that wait."""
    stub = inference_grpc.GRPCInferenceServiceStub(token_server.channel())

    def infer(n: int) -> inference_pb2.ModelInferResponse:
        x = np.zeros((n, 3, 80, 80), np.float32)
        return stub.ModelInfer(inference_pb2.ModelInferRequest(
            model_name="minifasnet_v2", inputs=[inference_pb2.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=x.shape)], raw_input_contents=[x.tobytes()]),
            metadata=as_caller("batched"), timeout=30)

    with pytest.raises(grpc.RpcError) as big:
        infer(4)
    assert big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(big.value) == [("inputs[0].shape", (
        "4 batch items at a cost of 1 each cost 4, more than the rate bucket of caller 'svc-batched' ever holds "
        "(3 at rate_per_s = 1, burst = 3); send at most 3 a request"))]
    assert infer(2).outputs
    with pytest.raises(grpc.RpcError) as again:
        infer(2)
    assert again.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'svc-batched' is over its rate_per_s = 1 (burst 3; this call costs 2)" in again.value.details()
    delay = retry_after(again.value)
    assert delay is not None and 0.5 < delay <= 1.0
    time.sleep(delay + 0.05)
    assert infer(2).outputs


def per_caller(metrics_port: int) -> dict[tuple[str, str], float]:
    """CheckLiveness calls counted in the metrics, by (caller, code), once the counts stop moving (a refused
    call is counted a moment after its client holds the error)."""
    def read() -> dict[tuple[str, str], float]:
        return {(labels["caller"], labels["code"]): value
                for (name, pairs), value in scrape(metrics_port).items() if name == "facegate_requests_total"
                and (labels := dict(pairs))["method"].endswith("/CheckLiveness")}
    last = read()
    for _ in range(50):
        time.sleep(0.1)
        now = read()
        if now == last:
            break
        last = now
    return last


def test_enrolment_needs_the_enrol_scope_and_never_takes_over_a_person(token_server: RunningServer,
                                                                     audit_path: Path) -> None:
    ident = identification_pb2_grpc.IdentificationServiceStub(token_server.channel())
    coll = identification_pb2.CreateCollectionRequest(collection="people")
    assert code_of(lambda: ident.CreateCollection(coll, metadata=as_caller("live"), timeout=10)) == \
        grpc.StatusCode.PERMISSION_DENIED
    ident.CreateCollection(coll, metadata=as_caller("enrol"), timeout=10)
    clip = clip_from_folder(clip_folder(1, 0), 200.0)
    enrol = identification_pb2.EnrollFromClipRequest(collection="people", person_id="alice", clips=[clip])
    assert code_of(lambda: ident.EnrollFromClip(enrol, metadata=as_caller("live"), timeout=60)) == \
        grpc.StatusCode.PERMISSION_DENIED
    first = ident.EnrollFromClip(enrol, metadata=as_caller("enrol"), timeout=60)
    assert first.total_clips == 1 and not first.replayed
    # A retry of the same call (lost reply) stores nothing twice.
    retry = ident.EnrollFromClip(enrol, metadata=as_caller("enrol"), timeout=60)
    assert retry.replayed and retry.total_clips == 1
    # Someone else's face under alice's id: a CREATE of an existing person is refused.
    mallory = identification_pb2.EnrollFromClipRequest(collection="people", person_id="alice",
                                                       clips=[clip_from_folder(clip_folder(2, 0), 200.0)])
    assert code_of(lambda: ident.EnrollFromClip(mallory, metadata=as_caller("enrol"), timeout=60)) == \
        grpc.StatusCode.ALREADY_EXISTS
    append = identification_pb2.EnrollFromClipRequest(collection="people", person_id="alice",
                                                      clips=[clip_from_folder(clip_folder(1, 1), 200.0)],
                                                      mode=identification_pb2.ENROLL_MODE_APPEND)
    assert ident.EnrollFromClip(append, metadata=as_caller("enrol"), timeout=60).total_clips == 2
    from server.gallery.store import GalleryStore

    store = GalleryStore(token_server.server.config.gallery_path)  # type: ignore[attr-defined]
    assert store.template_authors("people", "alice") == ["svc-enrol", "svc-enrol"]
    store.close()
    lines = audit_path.read_text().splitlines()
    assert any('"outcome": "permission_denied"' in ln and '"caller": "svc-live"' in ln and "EnrollFromClip" in ln
               for ln in lines)
    assert any('"person_id": "alice"' in ln and "enrolled 1 clip" in ln for ln in lines)
    assert any('"outcome": "AlreadyExistsError"' in ln for ln in lines)


def test_collection_scopes_limit_a_caller_to_its_collection(token_server: RunningServer) -> None:
    ident = identification_pb2_grpc.IdentificationServiceStub(token_server.channel())
    ident.CreateCollection(identification_pb2.CreateCollectionRequest(collection="staff"),
                           metadata=as_caller("staff"), timeout=10)
    assert code_of(lambda: ident.CreateCollection(identification_pb2.CreateCollectionRequest(collection="other"),
                                                  metadata=as_caller("staff"), timeout=10)) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: ident.ListPersons(identification_pb2.ListPersonsRequest(collection="people"),
                                             metadata=as_caller("staff"), timeout=10)) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert not ident.ListPersons(identification_pb2.ListPersonsRequest(collection="staff"),
                                 metadata=as_caller("staff"), timeout=10).persons


def test_no_log_holds_anything_biometric(token_server: RunningServer, audit_path: Path, samples: Path,
                                         capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    image = (samples / "image_T1.jpg").read_bytes()
    answer = check(token_server, image, "live")
    client = FacegateClient(token_server.address, token=TOKENS["enrol"])
    ident = client.identify("people", clip_from_folder(clip_folder(1, 2), 200.0), top_k=3)
    client.close()
    logs = audit_path.read_bytes() + capfd.readouterr().err.encode() + caplog.text.encode()
    assert logs, "expected some log output"
    assert image[600:640] not in logs  # a run of the image's own bytes
    for score in (answer.live_score, *answer.model_scores[0].probabilities,
                  *(c.score for c in ident.candidates)):
        assert f"{score:.6f}".encode() not in logs and repr(score).encode() not in logs
    emb = np.frombuffer(clip_from_folder(clip_folder(1, 2), 200.0).frames[0].data[:64], np.uint8)
    assert emb.tobytes() not in logs


def test_a_public_address_without_authentication_is_refused_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without authentication"):
        load_config(None, host="0.0.0.0")
    assert load_config(None, {"insecure_public": True}, host="0.0.0.0").auth.insecure_public
    token = tmp_path / "token"
    token.write_text(new_token())
    assert load_config(None, {"token_file": token}, host="0.0.0.0").auth.enabled
    proc = subprocess.run([sys.executable, "-m", "server", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "refusing to serve biometric RPCs on 0.0.0.0" in proc.stderr


def test_the_token_file_caller_has_its_own_limit_when_given_one(tmp_path: Path) -> None:
    """``--token-max-in-flight`` (``[auth] token_file_max_in_flight``) gives the token file's caller the
    ``max_in_flight`` a configured caller has (enforced as in the test above); a negative one stops the start."""
    token = tmp_path / "token"
    token.write_text(new_token() + "\n")
    limited = load_config(None, {"token_file": token, "token_file_max_in_flight": 3}).auth
    caller = Authenticator(limited).from_token(token.read_text().strip())
    assert caller is not None and (caller.name, caller.max_in_flight) == ("default", 3)
    unlimited = Authenticator(load_config(None, {"token_file": token}).auth).from_token(token.read_text().strip())
    assert unlimited is not None and unlimited.max_in_flight == 0
    proc = subprocess.run([sys.executable, "-m", "server", "--port", "0", "--token-file", str(token),
                           "--token-max-in-flight", "-1"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "token_file_max_in_flight must be >= 0" in proc.stderr, proc.stderr[-2000:]


def test_the_docker_entrypoint_starts_with_authentication(tmp_path: Path, repository_dir: Path) -> None:
    """The entrypoint as the image runs it (python3 = this interpreter), minus the export and engine build."""
    work = tmp_path / "app"
    work.mkdir()
    (work / "model_repository").symlink_to(repository_dir)
    env = {**os.environ, "PATH": image_python(tmp_path / "bin"), "FACEGATE_PREPARE": "0", "PORT": "0",
           "PYTHONPATH": str(ROOT), "FACEGATE_TOKEN_FILE": str(tmp_path / "missing")}
    refused = subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh")], cwd=work, env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "without authentication" in refused.stderr
    token = tmp_path / "token"
    token.write_text(new_token())
    env["FACEGATE_TOKEN_FILE"] = str(token)
    proc, lines = start_entrypoint(work, env, until="listening on")
    proc.kill()
    proc.wait(30)
    assert "authentication on" in lines.splitlines()[-1], lines


def test_the_docker_entrypoint_serves_tls_as_the_tls_component_sets_it(tmp_path: Path, repository_dir: Path) -> None:
    """deploy/kubernetes/components/tls's variables, with the Secret's three files made here: TLS on the main port
    with the names and roots checked, and the probes' plaintext health port answering while the models load."""
    ca = CertAuthority(tmp_path)
    issuing = CertAuthority(tmp_path, "issuing CA", parent=ca)
    served = issuing.server_cert()
    work = tmp_path / "app"
    work.mkdir()
    (work / "model_repository").symlink_to(repository_dir)
    token = tmp_path / "token"
    token.write_text(new_token())
    port, probe_port = free_port(), free_port()
    env = {**os.environ, "PATH": image_python(tmp_path / "bin"), "FACEGATE_PREPARE": "0", "PORT": str(port),
           "PYTHONPATH": str(ROOT), "FACEGATE_TOKEN_FILE": str(token), "FACEGATE_TLS_CERT": str(served.cert),
           "FACEGATE_TLS_KEY": str(served.key), "FACEGATE_TLS_TRUST_ROOTS": str(ca.pem.cert),
           "FACEGATE_TLS_SERVER_NAMES": "localhost,127.0.0.1", "FACEGATE_HEALTH_PORT": str(probe_port)}
    proc, lines = start_entrypoint(work, env, until="listening on")
    try:
        assert proc.poll() is None and "(TLS; authentication on" in lines.splitlines()[-1], lines
        assert f"health checks (grpc.health.v1 Check alone, plaintext) on 0.0.0.0:{probe_port}" in lines
        loading = health_pb2.HealthCheckResponse.NOT_SERVING  # (the models are still loading)
        with grpc.insecure_channel(f"127.0.0.1:{probe_port}") as plain:
            assert health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                loading
        creds = grpc.ssl_channel_credentials(ca.pem.cert.read_bytes())
        with grpc.secure_channel(f"localhost:{port}", creds) as secure:
            assert health_pb2_grpc.HealthStub(secure).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                loading
    finally:
        proc.kill()
        proc.wait(30)
    # A name the certificate lacks stops the start.
    env["FACEGATE_TLS_SERVER_NAMES"] = "localhost,facegate.facegate.svc"
    refused = subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh")], cwd=work, env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "does not name ['facegate.facegate.svc']" in refused.stderr


# --- mutual TLS ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls(repository_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    folder = tmp_path_factory.mktemp("pki")
    ca = CertAuthority(folder)
    server_pem = ca.server_cert()
    ca.client_cert("svc-a", "spiffe://facegate.test/svc-a")
    ca.client_cert("svc-b", "spiffe://facegate.test/svc-b")
    ca.client_cert("stranger", "spiffe://facegate.test/stranger")
    CertAuthority(folder / "..", "untrusted CA").client_cert("rogue", "spiffe://facegate.test/svc-a")
    callers = (CallerConfig("spiffe://facegate.test/svc-a", ("liveness",)),
               CallerConfig("spiffe://facegate.test/svc-b", ("identify",)))
    running, thread = start_server(repository_dir, tls_cert=server_pem.cert, tls_key=server_pem.key,
                                   auth=AuthConfig(client_ca=ca.pem.cert, callers=callers), health_port=free_port())
    yield running, folder
    stop_server(running, thread)


def mtls_check(server: RunningServer, folder: Path, who: str | None, image: bytes
               ) -> liveness_pb2.CheckLivenessResponse:
    base = folder if who != "rogue" else folder / ".."
    creds = tls_credentials(folder / "facegate_test_CA.crt", base / f"{who}.crt" if who else None,
                            base / f"{who}.key" if who else None)
    channel = grpc.secure_channel(f"localhost:{server.address.rsplit(':', 1)[1]}", creds)
    try:
        return liveness_pb2_grpc.LivenessServiceStub(channel).CheckLiveness(
            liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=image)), timeout=30)
    finally:
        channel.close()


def test_mutual_tls_identifies_callers_by_certificate(mtls: tuple[RunningServer, Path], samples: Path) -> None:
    server, folder = mtls
    image = (samples / "image_F1.jpg").read_bytes()
    assert mtls_check(server, folder, "svc-a", image).decision == liveness_pb2.DECISION_SPOOF
    assert code_of(lambda: mtls_check(server, folder, "svc-b", image)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: mtls_check(server, folder, "stranger", image)) == grpc.StatusCode.UNAUTHENTICATED
    # No certificate, or one from a CA the server does not trust: refused in the TLS handshake, before any RPC.
    assert code_of(lambda: mtls_check(server, folder, None, image)) == grpc.StatusCode.UNAVAILABLE
    assert code_of(lambda: mtls_check(server, folder, "rogue", image)) == grpc.StatusCode.UNAVAILABLE
    # The server still serves after the refusals.
    assert mtls_check(server, folder, "svc-a", image).decision == liveness_pb2.DECISION_SPOOF


def test_probes_that_cannot_speak_tls_use_the_health_port_which_serves_nothing_else(
        mtls: tuple[RunningServer, Path], samples: Path) -> None:
    """A Kubernetes gRPC probe dials without TLS or a certificate: on the mutual-TLS port it fails; on the health
    port ([server] health_port) it gets the same statuses, and nothing but health is served there."""
    server, _ = mtls
    main = server.address.rsplit(":", 1)[1]
    probe_port = server.server.config.health_port  # type: ignore[attr-defined]
    with grpc.insecure_channel(f"127.0.0.1:{main}") as plain:
        assert code_of(lambda: health_pb2_grpc.HealthStub(plain).Check(
            health_pb2.HealthCheckRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(f"127.0.0.1:{probe_port}") as plain:
        probe = health_pb2_grpc.HealthStub(plain)
        for service in ("", "facegate.v1.LivenessService", "facegate.v1.IdentificationService"):
            assert probe.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        assert code_of(lambda: probe.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
                       ) == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: probe.Check(health_pb2.HealthCheckRequest(service="x" * 10_000), timeout=5)
                       ) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Check alone: a Watch would hold a slot as long as its client liked, and enough of them fail the probes.
        assert code_of(lambda: next(probe.Watch(health_pb2.HealthCheckRequest(), timeout=5))
                       ) == grpc.StatusCode.UNIMPLEMENTED
        image = common_pb2.Image(data=(samples / "image_F1.jpg").read_bytes())
        assert code_of(lambda: liveness_pb2_grpc.LivenessServiceStub(plain).CheckLiveness(
            liveness_pb2.CheckLivenessRequest(image=image), timeout=10)) == grpc.StatusCode.UNIMPLEMENTED
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        assert code_of(lambda: list(reflection_pb2_grpc.ServerReflectionStub(plain).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
                       ) == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_is_an_operator_rpc(token_server: RunningServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(token_server.channel())

    def services(who: str | None) -> list[str]:
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(stub.ServerReflectionInfo(iter([req]), metadata=as_caller(who), timeout=10))
        return [s.name for s in resp.list_services_response.service]

    assert code_of(lambda: services(None)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: services("live")) == grpc.StatusCode.PERMISSION_DENIED
    assert "facegate.v1.LivenessService" in services("ops")


def test_an_unauthenticated_upload_is_refused_before_the_server_receives_it(repository_dir: Path,
                                                                            tmp_path: Path) -> None:
    """The caller is checked when the call opens: 48 concurrent 15 MiB requests without a credential are refused
    without the server taking in their 720 MiB (a plain unary handler is called only once the whole message has
    arrived). What the server's peak memory may still grow by is gRPC's flow-control windows and buffers."""
    from benchmarks.server_process import facegate_process
    from tests.test_bad_input_corpus import peak_rss

    token = tmp_path / "token"
    token.write_text(TOKENS["live"])
    with facegate_process(repository_dir, ["--token-file", str(token), "--token-scopes", "liveness"],
                          tmp_path / "server.log") as (address, proc):
        before = peak_rss(proc.pid)
        options = [("grpc.max_send_message_length", 64 << 20)]
        channels = [grpc.insecure_channel(address, options=options) for _ in range(4)]
        big = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=b"\xff" * (15 << 20)))
        calls = [liveness_pb2_grpc.LivenessServiceStub(channels[i % 4]).CheckLiveness.future(big, timeout=60)
                 for i in range(48)]
        assert {c.exception().code() for c in calls} == {grpc.StatusCode.UNAUTHENTICATED}  # type: ignore[union-attr]
        grown = peak_rss(proc.pid) - before
        assert grown < 256 << 20, f"the server's peak memory grew by {grown >> 20} MiB"
        # A caller with the token is served (its 15 MiB of garbage is received, then refused as an image).
        with pytest.raises(grpc.RpcError) as raised:
            liveness_pb2_grpc.LivenessServiceStub(channels[0]).CheckLiveness(big, metadata=as_caller("live"),
                                                                             timeout=60)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        for ch in channels:
            ch.close()
