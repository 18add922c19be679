"""A CPU pod as the manifests make it: the image's entrypoint with the CPU image's environment, the Deployment's
variables, and its volumes (the ConfigMap, the caller token Secret, an empty models volume). Its first start
downloads the weights (from a loopback mirror) and exports the models into the empty volume, then serves; a
restart finds them there. What a cluster adds (the kubelet, probes, the image build itself) is not here: this is
the pod's own start, run on this machine."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.server_process import free_port
from engines.identify.bundle_pack import pack
from engines.identify.ensemble import find_ensemble
from engines.machine import cpu_type
from engines.precision import INT8_FILE, stored_verdicts, verdicts_here
from engines.weights import MANIFEST, sha256_file
from facegate.v1 import common_pb2, identification_pb2, identification_pb2_grpc, liveness_pb2, liveness_pb2_grpc
from facegate_client.client import clip_from_folder
from server.auth.tokens import new_token
from tests.conftest import ROOT, clip_dir, image_python, serve_folder, start_entrypoint
from tests.served import gated_precisions
from tests.test_kubernetes import by_kind, render
from tests.verdicts import OTHER_CPU, move_to_another_type

pytestmark = pytest.mark.weights

LIVENESS_MODELS = ("retinaface", "minifasnet_v2", "minifasnet_v1se")
FPS = 200.0


def image_env(dockerfile: Path) -> dict[str, str]:
    """The ENV lines of a Dockerfile (KEY=VALUE pairs; what the image gives every container)."""
    env: dict[str, str] = {}
    for line in dockerfile.read_text().splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, value = pair.split("=", 1)
                env[key] = value
    return env


class Pod:
    """The CPU Deployment's container, run here: each volume a folder, WORKDIR /app a folder."""

    def __init__(self, root: Path, weights_env: dict[str, str], gallery_url: str) -> None:
        docs = render("cpu")
        spec = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
        (self.container,) = spec["containers"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        self.app = root / "app"
        self.app.mkdir()
        self.token = new_token()
        self.port = free_port()
        self.mounts: dict[str, Path] = {}
        for mount in self.container["volumeMounts"]:
            path = mount["mountPath"]
            local = self.app / path.removeprefix("/app/") if path.startswith("/app/") else root / path.lstrip("/")
            local.mkdir(parents=True)
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                (config,) = [d for d in docs if d["kind"] == "ConfigMap"
                             and d["metadata"]["name"] == volume["configMap"]["name"]]
                for key, text in config["data"].items():  # ports changed to free ones, nothing else
                    text = re.sub(r"(?m)^port = \d+", f"port = {self.port}", text)
                    (local / key).write_text(re.sub(r"(?m)^metrics_port = \d+", f"metrics_port = {free_port()}",
                                                    text))
            elif "secret" in volume:
                assert volume["secret"]["secretName"] == "facegate-callers"
                (local / "token").write_text(self.token)
            else:
                assert "emptyDir" in volume, volume  # the models volume and /tmp start empty on every node
            self.mounts[path] = local
        self.env = {"PATH": image_python(root / "bin"), "PYTHONPATH": str(ROOT), "PORT": str(self.port),
                    **image_env(ROOT / "Dockerfile.cpu")}
        for var in self.container["env"]:
            if "value" in var:
                self.env[var["name"]] = self.local(var["value"])
            elif var["valueFrom"]["secretKeyRef"]["name"] == "facegate-gallery":
                self.env[var["name"]] = gallery_url
        # No network here: the weights come from a loopback mirror or a mounted folder, as without egress.
        self.env.update(weights_env)
        # The root filesystem is read-only: scratch files go to the /tmp volume (TMPDIR stands in for the mount).
        assert self.container["securityContext"]["readOnlyRootFilesystem"] is True
        self.env["TMPDIR"] = self.local("/tmp")
        self.env["HOME"] = self.local(self.env["HOME"])

    def local(self, value: str) -> str:
        for path, local in self.mounts.items():
            if value == path or value.startswith(path + "/"):
                return str(local / value.removeprefix(path).lstrip("/"))
        return value

    def written_outside_volumes(self) -> list[Path]:
        """Files made in the image's WORKDIR outside its volumes (where a read-only root would refuse them)."""
        return [p for p in self.app.rglob("*") if p.is_file() and not any(p.is_relative_to(m)
                                                                         for m in self.mounts.values())]

    def start(self) -> tuple[subprocess.Popen[str], str]:
        """Run the entrypoint until it serves; the process and its stderr up to then."""
        return start_entrypoint(self.app, self.env)

    def health(self) -> dict[str, int]:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return {service: stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
                    for service in ("", "facegate.v1.LivenessService", "facegate.v1.IdentificationService")}

    def check(self, image: bytes, credentials: bool = True) -> Any:
        metadata = (("authorization", f"Bearer {self.token}"),) if credentials else ()
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            return liveness_pb2_grpc.LivenessServiceStub(channel).CheckLiveness(
                liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=image)), metadata=metadata,
                timeout=60)

    def identifies(self, trained: dict[str, Any], subjects: int = 4) -> float:
        """Enrol ``subjects`` people from the clips the offline evaluation enrolled; the share of their test clips
        whose first candidate is the right person."""
        metadata = (("authorization", f"Bearer {self.token}"),)
        keys: list[str] = trained["enrol2_gallery"]
        people = sorted({k.split("/")[1] for k in keys})[:subjects]
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = identification_pb2_grpc.IdentificationServiceStub(channel)
            stub.CreateCollection(identification_pb2.CreateCollectionRequest(collection="pod"), metadata=metadata,
                                  timeout=30)
            for person in people:
                clips = [clip_from_folder(clip_dir(trained, k), FPS) for k in keys if k.split("/")[1] == person]
                stub.EnrollFromClip(identification_pb2.EnrollFromClipRequest(
                    collection="pod", person_id=person, clips=clips), metadata=metadata, timeout=120)
            probes = [k for k in trained["test_probes"] if k.split("/")[1] in people][::2]
            hits = [stub.IdentifyFromClip(identification_pb2.IdentifyFromClipRequest(
                collection="pod", clip=clip_from_folder(clip_dir(trained, k), FPS), top_k=1), metadata=metadata,
                timeout=120).candidates[0].person_id == k.split("/")[1] for k in probes]
        assert len(hits) >= 2 * subjects
        return sum(hits) / len(hits)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def running() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait(30)


@pytest.mark.timeout(600)  # the restart regenerates the gate's clips and runs it: a minute or two on 2 cores
def test_a_cpu_pod_serves_from_an_empty_models_volume_and_restarts_without_exporting_again(
        tmp_path: Path, weights_dir: Path, samples: Path, postgres: Any, repository_dir: Path,
        trained: dict[str, Any], running: list[subprocess.Popen[str]]) -> None:
    with serve_folder(weights_dir) as mirror:  # the pod downloads its weights, as the manifests' default does
        pod = Pod(tmp_path, {"FACEGATE_WEIGHTS_URL": mirror}, postgres.url)
        repository = pod.mounts["/app/model_repository"]
        assert not any(repository.iterdir())
        proc, first = pod.start()
        running.append(proc)
    assert "models warm; SERVING" in first, first[-3000:]
    assert first.count("downloading http://127.0.0.1") == len(MANIFEST)
    for spec in MANIFEST:  # into the volume, the one place the pod's user can write
        assert sha256_file(repository / ".weights" / spec.relpath) == spec.sha256
    for name in LIVENESS_MODELS:
        assert f"{name}: exported" in first
        assert (repository / name / "model.onnx").is_file()
    assert "TensorRT" not in first  # the CPU image does not try to build engines
    assert pod.written_outside_volumes() == []
    answer = pod.check((samples / "image_T1.jpg").read_bytes())
    assert answer.decision == liveness_pb2.DECISION_LIVE and abs(answer.live_score - 0.9936) < 0.01
    with pytest.raises(grpc.RpcError) as refused:  # the Secret's token is the only way in
        pod.check(b"x", credentials=False)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # What the probes ask: the overall entry (liveness, startup) and the liveness service (readiness) serve; the
    # image trains no identification ensemble, so that service alone says NOT_SERVING.
    assert pod.health() == {"": SERVING, "facegate.v1.LivenessService": SERVING,
                            "facegate.v1.IdentificationService": NOT_SERVING}

    # The container restarts (same pod, same volume), now with the operator's ensemble bundle named (the
    # identification component's variables) and the liveness samples mounted: nothing is exported again, the
    # bundle is downloaded and installed, and IdentifyFromClip serves. The bundle was packed on "another CPU type"
    # (its verdicts say so), with its clips' recipe: the pod regenerates the clips from a sample photo and runs the
    # identification gate for this CPU type.
    proc.kill()
    proc.wait(30)
    stamps = {name: (repository / name / "model.onnx").stat().st_mtime_ns for name in LIVENESS_MODELS}
    archive, digest = pack(packed_elsewhere(repository_dir, tmp_path / "elsewhere"), tmp_path / "dist",
                           synthetic=trained["synthetic_dir"])
    with serve_folder(archive.parent) as artefacts:
        pod.env.update(FACEGATE_ENSEMBLE=artefacts + archive.name, FACEGATE_ENSEMBLE_SHA256=digest,
                       FACEGATE_LIVENESS_SAMPLES=str(samples))
        proc, again = pod.start()
        running.append(proc)
    assert "models warm; SERVING" in again, again[-3000:]
    assert all(f"{name}: up to date" in again for name in LIVENESS_MODELS)
    assert [line.split()[-1] for line in again.splitlines() if "downloading http" in line] == [
        artefacts + archive.name]  # the bundle, and no weights
    assert {name: (repository / name / "model.onnx").stat().st_mtime_ns for name in LIVENESS_MODELS} == stamps
    ensemble = find_ensemble(repository_dir)
    assert ensemble is not None and f"ensemble {ensemble.name} version {ensemble.version}: installed" in again
    assert pod.written_outside_volumes() == []
    assert pod.check((samples / "image_F1.jpg").read_bytes()).decision == liveness_pb2.DECISION_SPOOF
    assert pod.health()["facegate.v1.IdentificationService"] == SERVING
    assert "identification gate: running for " in again and not list(repository.glob(".gate-set-*"))
    for member in ensemble.members:  # measured here, for this CPU type: the precisions the gates allow here
        assert gated_precisions(repository, member) == gated_precisions(repository_dir, member)
        assert verdicts_here(repository / member)["int8"]["machine"] == cpu_type()
        # The other type's verdicts, as the bundle carried them, are kept beside this type's.
        assert stored_verdicts(repository / member)[OTHER_CPU] == stored_verdicts(
            tmp_path / "elsewhere" / member)[OTHER_CPU]
        # (the INT8 file is the bundle's, gated as installed)
        assert sha256_file(repository / member / INT8_FILE) == sha256_file(repository_dir / member / INT8_FILE)
    assert pod.identifies(trained) >= 0.9


def packed_elsewhere(source: Path, copy: Path) -> Path:
    """The ensemble of ``source`` as a machine of another CPU type would have it: its verdicts name that type."""
    ensemble = find_ensemble(source)
    assert ensemble is not None
    for part in ("ensembles", "reports", *ensemble.members):
        shutil.copytree(source / part, copy / part)
    for member in ensemble.members:
        move_to_another_type(copy / member, OTHER_CPU)
        assert gated_precisions(copy, member) == {"fp32"}
    return copy
