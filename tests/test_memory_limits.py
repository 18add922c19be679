"""``make bench-memory``: its sizes and quantities, and a short run against a real server with the default limits,
in which each kind of largest request is served or refused for room, and the server stays within the
Deployment's memory limit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import memory_limits
from tests.conftest import ROOT
from tests.test_server_auth import SYNTH


def test_the_deployment_limit_is_read_and_quantities_convert() -> None:
    limit = memory_limits.deployment_limit()
    assert limit is not None and memory_limits.mebibytes(limit) >= 1024
    assert memory_limits.mebibytes("4Gi") == 4096 and memory_limits.mebibytes("512Mi") == 512
    assert memory_limits.mebibytes(str(3 * 2**20)) == 3


def test_the_tree_counts_this_process_and_its_children() -> None:
    alone, n = memory_limits.tree_pss(os.getpid())
    assert n >= 1 and alone > 1 << 20
    assert memory_limits.descendants(os.getpid())[0] == os.getpid()


@pytest.mark.weights
@pytest.mark.slow
def test_a_short_run_serves_or_refuses_every_largest_request(repository_dir: Path, samples: Path,
                                                             tmp_path: Path) -> None:
    if not SYNTH.is_dir():
        pytest.fail(f"the synthetic clips are missing in {SYNTH} (make identify-models)")
    assert memory_limits.main(["--repository", str(repository_dir), "--synthetic", str(SYNTH), "--images",
                               *map(str, sorted(samples.glob("*.jpg"))), "--out", str(tmp_path),
                               "--duration", "8", "--concurrency", "8"]) == 0
    r = json.loads((tmp_path / "memory_limits.json").read_text())
    assert [p["kinds"] for p in r["phases"]] == [[k] for k in memory_limits.KINDS] + [list(memory_limits.KINDS)]
    for p in r["phases"][:3]:  # each largest image or clip alone: some served, the rest refused for room
        kind = p["kinds"][0]
        assert p["statuses"].get(f"{kind} OK", 0) > 0, p
        assert p["statuses"].get(f"{kind} RESOURCE_EXHAUSTED", 0) > 0, p
        # Until 2026-12-07 a video could run out of its 10 s of decoding under this load, and was refused as bad
        # (INVALID_ARGUMENT). It is now held to its CPU, and one the load kept from a CPU is RESOURCE_EXHAUSTED.
        assert set(p["statuses"]) <= {f"{kind} OK", f"{kind} RESOURCE_EXHAUSTED"}, p
        assert not {"video cpu", "video stalled"} & set(p["stopped_by"]), p
        # Every refusal is in the server's metrics, under the limit that made it (an operator's "which limit sheds").
        assert sum(p["stopped_by"].values()) == p["statuses"][f"{kind} RESOURCE_EXHAUSTED"], p
    assert r["phases"][3]["statuses"].get("big_infer OK", 0) > 0
    assert set(r["phases"][3]["statuses"]) <= {"big_infer OK", "big_infer RESOURCE_EXHAUSTED"}
    assert set(r["phases"][4]["statuses"]) == {"normal OK"}
    assert r["phases"][2]["processes"] >= 2  # the video workers were counted
    assert all(r["base_pss_mib"] < p["peak_pss_mib"] < r["deployment_limit_mib"] for p in r["phases"]), r
    # Under the Deployment's limit (or none) the server keeps its memory budgets as set (server/memory_budgets.py),
    # and the report says what they were and what the server held when warm, which their fit starts from.
    assert r["budgets"] == {"decoded_pixels": 250_000_000, "request_bytes": 256 << 20, "infer_input_bytes": 64 << 20}
    assert 300 < r["resident_mib_at_start"] < r["deployment_limit_mib"] / 2
    assert [w["budgets"] for w in r["workers_at_start"]] == [r["budgets"]]  # (one a worker: --workers 1 here)
    assert r["workers_at_start"][0]["resident_mib"] == r["resident_mib_at_start"]
    assert re.search(r"Worker 0's memory budgets: [^;]*decoded_pixels 250,000,000",
                     (tmp_path / "memory_limits.md").read_text())
    group = r["memory_group"]
    if group is not None:  # (run in a control group held to the Deployment's limit where one could be made)
        # The server found the limit of the group it was started in, and nothing in it was killed for memory.
        assert group["limit_mib"] == group["reported_limit_mib"] == r["deployment_limit_mib"], group
        assert all(p["oom_kills"] == 0 and 0 < p["peak_working_set_mib"] < group["limit_mib"] for p in r["phases"])
        assert {p["limit_mib_at_end"] for p in r["phases"]} == {group["limit_mib"]}
    assert all(p["budgets_at_end"] == r["budgets"] for p in r["phases"])  # (the limit did not change)
    assert "| big_video |" in (tmp_path / "memory_limits.md").read_text()


@pytest.mark.weights
@pytest.mark.slow
def test_a_limit_lowered_while_it_serves_lowers_the_budgets(repository_dir: Path, samples: Path,
                                                            tmp_path: Path) -> None:
    """``--resize-to``: the group's limit lowered under the serving server, as an in-place resize does; the server
    fits its budgets to it (server/memory_budgets.py) within its memory_limit_check_s, and the report shows both."""
    if not SYNTH.is_dir():
        pytest.fail(f"the synthetic clips are missing in {SYNTH} (make identify-models)")
    # (In a process of its own. Run in this one, as a second in-process run of gRPC's asyncio client, it came with
    # tests/test_video_worker.py's descriptor count finding one more in 2 of 4 CI runs; the cause was not found.)
    run = subprocess.run([sys.executable, "-m", "benchmarks.memory_limits", "--repository", str(repository_dir),
                          "--synthetic", str(SYNTH), "--images", *map(str, sorted(samples.glob("*.jpg"))), "--out",
                          str(tmp_path), "--duration", "8", "--concurrency", "4", "--only", "normal", "--resize-to",
                          "2560Mi", "--resize-after", "1", "--set", "memory_limit_check_s=0.5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads((tmp_path / "memory_limits.json").read_text())
    if r["memory_group"] is None:
        pytest.skip("no memory control group this process may make (cgroup v1 or v2, as root)")
    (phase,) = r["phases"]
    assert phase["limit_mib_at_end"] == 2560 and r["resize"] == {"to_mib": 2560, "after_s": 1}
    assert r["budgets"]["decoded_pixels"] == 250_000_000  # (as set under the Deployment's limit, at the start)
    assert all(phase["budgets_at_end"][k] < v for k, v in r["budgets"].items()), (phase, r["budgets"])
    assert phase["statuses"].get("normal OK", 0) > 0 and phase["oom_kills"] == 0
    assert "set to 2560 MiB 1 s into the phases" in (tmp_path / "memory_limits.md").read_text()
