"""Several server processes on one gallery, as replicas behind a load balancer: three on a real PostgreSQL behind
one client channel with gRPC's round_robin policy (how a Kubernetes headless Service is used), two on one SQLite
file; database faults while serving and at start-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from benchmarks.server_process import free_port, terminate, wait_serving
from facegate.v1 import identification_pb2, identification_pb2_grpc
from facegate_client.client import clip_from_folder
from tests.conftest import ROOT, start_server, stop_server
from tests.test_server_auth import SYNTH, clip_folder

pytestmark = [pytest.mark.weights, pytest.mark.slow]
FPS = 200.0


def spawn(repository: Path, url: str, folder: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = folder / f"{name}.toml"
    config.write_text(f'[audit]\npath = "{folder / f"{name}-audit.jsonl"}"\n')
    log = open(folder / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--model-repository",
                             str(repository), "--gallery-url", url, "--config", str(config), "--log-level", "WARNING",
                             "--metrics-port", "0"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def replicas(repository_dir: Path, postgres, tmp_path_factory: pytest.TempPathFactory  # type: ignore[no-untyped-def]
             ) -> Iterator[tuple[list[subprocess.Popen[bytes]], list[str], Path]]:
    if not SYNTH.is_dir():
        pytest.fail(f"the synthetic clips are missing in {SYNTH} (make identify-models)")
    folder = tmp_path_factory.mktemp("replicas")
    started = [spawn(repository_dir, postgres.url, folder, f"r{i}") for i in range(3)]
    procs, addresses = [p for p, _ in started], [a for _, a in started]
    try:
        for a in addresses:
            wait_serving(a, 180)
        yield procs, addresses, folder
    finally:
        for p in procs:
            if p.poll() is None:
                terminate(p)


def stub_for(address: str) -> identification_pb2_grpc.IdentificationServiceStub:
    return identification_pb2_grpc.IdentificationServiceStub(grpc.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 << 20)]))


def enrol(stub: identification_pb2_grpc.IdentificationServiceStub, collection: str, subject: int) -> None:
    clips = [clip_from_folder(clip_folder(subject, i), FPS) for i in (0, 1)]
    r = stub.EnrollFromClip(identification_pb2.EnrollFromClipRequest(
        collection=collection, person_id=f"sub{subject:02d}", clips=clips), timeout=120)
    assert r.clips_accepted == 2


def top(stub: identification_pb2_grpc.IdentificationServiceStub, collection: str, subject: int) -> list[str]:
    r = stub.IdentifyFromClip(identification_pb2.IdentifyFromClipRequest(
        collection=collection, clip=clip_from_folder(clip_folder(subject, 2), FPS), top_k=10), timeout=120)
    return [c.person_id for c in r.candidates]


def test_round_robin_replicas_share_one_gallery_and_a_deletion_reaches_all(
        replicas: tuple[list[subprocess.Popen[bytes]], list[str], Path]) -> None:
    _, addresses, _ = replicas
    balanced = identification_pb2_grpc.IdentificationServiceStub(grpc.insecure_channel(
        "ipv4:" + ",".join(addresses), options=[("grpc.lb_policy_name", "round_robin"),
                                                ("grpc.max_send_message_length", 64 << 20)]))
    balanced.CreateCollection(identification_pb2.CreateCollectionRequest(collection="rr"), timeout=30)
    for subject in (1, 2, 3):
        enrol(balanced, "rr", subject)  # spread over the replicas by round_robin
    each = [stub_for(a) for a in addresses]
    for stub in each:  # every replica finds everyone, whichever replica enrolled them
        for subject in (1, 2, 3):
            assert top(stub, "rr", subject)[0] == f"sub{subject:02d}"
    each[2].DeletePerson(identification_pb2.DeletePersonRequest(collection="rr", person_id="sub01"), timeout=30)
    for stub in each:  # once DeletePerson returned, no replica returns the person
        assert "sub01" not in top(stub, "rr", 1)
    # An enrolment through one replica is found through another right away (the next search reads the sequence).
    t0 = time.monotonic()
    enrol(each[0], "rr", 4)
    assert top(each[1], "rr", 4)[0] == "sub04"
    assert time.monotonic() - t0 < 60
    listed = each[1].ListCollections(identification_pb2.ListCollectionsRequest(), timeout=10)
    assert ("rr", 3) in [(c.collection, c.persons) for c in listed.collections]


def test_a_replica_killed_mid_enrolment_leaves_all_or_nothing_and_a_late_replica_serves_the_gallery(
        replicas: tuple[list[subprocess.Popen[bytes]], list[str], Path], repository_dir: Path, postgres) -> None:  # type: ignore[no-untyped-def]
    procs, addresses, folder = replicas
    survivor = stub_for(addresses[1])
    survivor.CreateCollection(identification_pb2.CreateCollectionRequest(collection="kill"), timeout=30)
    enrol(survivor, "kill", 2)
    clips = [clip_from_folder(clip_folder(5, i % 4), FPS) for i in range(12)]
    victim = stub_for(addresses[0])

    def doomed() -> None:
        with suppress(grpc.RpcError):
            victim.EnrollFromClip(identification_pb2.EnrollFromClipRequest(
                collection="kill", person_id="sub05", clips=clips), timeout=120)

    t = threading.Thread(target=doomed)
    t.start()
    time.sleep(1.5)
    os.kill(procs[0].pid, signal.SIGKILL)
    procs[0].wait(30)
    t.join(60)
    persons = {p.person_id: p.clips for p in survivor.ListPersons(
        identification_pb2.ListPersonsRequest(collection="kill"), timeout=30).persons}
    assert persons.get("sub05", 12) == 12  # the whole person or nothing
    # A replica started after all this serves the existing gallery.
    with ExitStack() as stack:
        late, address = spawn(repository_dir, postgres.url, folder, "late")
        stack.callback(terminate, late)
        wait_serving(address, 180)
        assert top(stub_for(address), "kill", 2)[0] == "sub02"


def test_two_servers_on_one_sqlite_file_stay_consistent(repository_dir: Path, tmp_path: Path) -> None:
    """The divergence first reported: B cached the collection, then missed A's enrolment and kept returning a
    person A had deleted."""
    gallery = tmp_path / "g.sqlite"
    a, ta = start_server(repository_dir, gallery_path=gallery)
    b, tb = start_server(repository_dir, gallery_path=gallery)
    try:
        sa, sb = (identification_pb2_grpc.IdentificationServiceStub(s.channel()) for s in (a, b))
        sa.CreateCollection(identification_pb2.CreateCollectionRequest(collection="pair"), timeout=30)
        enrol(sa, "pair", 1)
        assert top(sb, "pair", 1)[0] == "sub01"  # B caches the collection here
        enrol(sa, "pair", 3)
        assert top(sb, "pair", 3)[0] == "sub03"
        sa.DeletePerson(identification_pb2.DeletePersonRequest(collection="pair", person_id="sub01"), timeout=30)
        assert "sub01" not in top(sb, "pair", 1)
    finally:
        stop_server(a, ta)
        stop_server(b, tb)


def test_postgresql_going_away_is_unavailable_and_the_server_recovers(repository_dir: Path, postgres) -> None:  # type: ignore[no-untyped-def]
    running, thread = start_server(repository_dir, gallery_url=postgres.url)
    try:
        stub = identification_pb2_grpc.IdentificationServiceStub(running.channel())
        stub.CreateCollection(identification_pb2.CreateCollectionRequest(collection="fault"), timeout=30)
        postgres.stop()
        try:
            with pytest.raises(grpc.RpcError) as info:
                stub.ListPersons(identification_pb2.ListPersonsRequest(collection="fault"), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
            assert status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
        finally:
            postgres.start()
        for _ in range(50):  # back by itself, no restart
            try:
                stub.ListPersons(identification_pb2.ListPersonsRequest(collection="fault"), timeout=30)
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
                time.sleep(0.2)
        else:
            pytest.fail("the server did not recover after PostgreSQL came back")
    finally:
        stop_server(running, thread)


def test_a_wrong_gallery_url_is_a_clear_start_up_error_without_the_password(repository_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "server", "--port", "0", "--model-repository", str(repository_dir),
                           "--gallery-url", "postgresql://facegate:s3cret@127.0.0.1:1/facegate"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 2
    assert "postgresql://facegate:***@127.0.0.1:1/facegate" in proc.stderr and "s3cret" not in proc.stderr
