"""The container's entrypoint runs the liveness parity gate where labelled images are mounted: at a first start
on a CPU (a pod-local repository), so bf16 and INT8 can be served in a container as after ``make``; and not again
while its verdicts are current."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from engines.machine import cpu_type
from engines.precision import GATE_FILE
from engines.specs import DETECTOR, LIVENESS_SPECS
from server.auth.tokens import new_token
from tests.conftest import ROOT, image_python, run_together, start_entrypoint

pytestmark = pytest.mark.weights

LIVENESS_MODELS = (DETECTOR, *(s.name for s in LIVENESS_SPECS))


def start(work: Path, env: dict[str, str]) -> str:
    """Run the entrypoint until the server is serving (models loaded and warm); its stderr up to then."""
    proc, lines = start_entrypoint(work, env)
    proc.kill()
    proc.wait(30)
    return lines


def test_the_entrypoint_runs_the_liveness_gate_once_per_cpu_class(repository_dir: Path, samples: Path,
                                                                   tmp_path: Path) -> None:
    work = tmp_path / "app"
    for name in LIVENESS_MODELS:  # the liveness models as prepared, no verdicts yet
        shutil.copytree(repository_dir / name, work / "model_repository" / name,
                        ignore=shutil.ignore_patterns("engines", GATE_FILE, "*.int8.onnx"))
    token = tmp_path / "token"
    token.write_text(new_token())
    env = {**os.environ, "PATH": image_python(tmp_path / "bin"), "FACEGATE_PREPARE": "0", "PORT": "0",
           "PYTHONPATH": str(ROOT), "FACEGATE_TOKEN_FILE": str(token), "FACEGATE_LIVENESS_SAMPLES": str(samples)}
    first = start(work, env)
    assert "liveness gate: running for" in first and "models warm; SERVING" in first, first[-2000:]
    gates = {name: json.loads((work / "model_repository" / name / GATE_FILE).read_text()) for name in
             (s.name for s in LIVENESS_SPECS)}
    for entries in gates.values():
        assert entries["int8"]["machine"] == cpu_type() and entries["int8"]["parity_images"] >= 50
    # The server then chose with those verdicts: its reasons name them.
    assert "INT8 failed its parity gate" in first or "INT8 passed its parity gate" in first, first[-2000:]
    stamp = {name: (work / "model_repository" / name / GATE_FILE).stat().st_mtime_ns for name in gates}
    again = start(work, env)
    assert "every verdict is current" in again and "models warm; SERVING" in again, again[-2000:]
    assert {name: (work / "model_repository" / name / GATE_FILE).stat().st_mtime_ns for name in gates} == stamp


_GATE = """
import sys
from engines.liveness_gate import main
sys.exit(main(["--if-stale", "--samples", sys.argv[1], "--repository", sys.argv[2]]))
"""


def test_replicas_starting_together_run_the_gate_once(repository_dir: Path, samples: Path, tmp_path: Path) -> None:
    repository = tmp_path / "model_repository"
    for name in LIVENESS_MODELS:  # no verdicts yet, as on a new node's shared volume
        shutil.copytree(repository_dir / name, repository / name,
                        ignore=shutil.ignore_patterns("engines", GATE_FILE, "*.int8.onnx"))
    outcomes = [json.loads(out[out.index("{"):]) for out in run_together(_GATE, str(samples), str(repository))]
    assert sorted("skipped" in outcome for outcome in outcomes) == [False, True], outcomes
