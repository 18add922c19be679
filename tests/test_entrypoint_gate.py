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
from engines.precision import GATE_FILE, INT8_FILE, stored_verdicts, verdicts_here
from engines.specs import DETECTOR, LIVENESS_SPECS
from engines.weights import sha256_file
from server.auth.tokens import new_token
from tests.conftest import ROOT, image_python, run_together, start_entrypoint
from tests.verdicts import OTHER_CPU, move_to_another_type

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
        assert entries["cpu_types"][cpu_type()]["int8"]["parity_images"] >= 50
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


def test_a_volume_shared_with_another_cpu_type_keeps_both_types_verdicts(repository_dir: Path, samples: Path,
                                                                         tmp_path: Path) -> None:
    """Pods of two CPU types on one models volume: this type's gate adds its verdicts beside the other type's,
    gating the INT8 files the other type's verdicts are about as they are (quantising again would void those),
    and neither type then runs the gate again."""
    repository = tmp_path / "model_repository"
    classifiers = [s.name for s in LIVENESS_SPECS]
    if not all(verdicts_here(repository_dir / name).get("int8") for name in classifiers):
        pytest.skip("the liveness gate has not run here (make models with LIVENESS_SAMPLES)")
    for name in LIVENESS_MODELS:
        shutil.copytree(repository_dir / name, repository / name, ignore=shutil.ignore_patterns("engines"))
    theirs = {name: move_to_another_type(repository / name) for name in LIVENESS_MODELS
              if verdicts_here(repository_dir / name)}
    int8 = {name: sha256_file(repository / name / INT8_FILE) for name in classifiers}
    (ran,) = [json.loads(out[out.index("{"):]) for out in run_together(_GATE, str(samples), str(repository),
                                                                         copies=1)]
    assert "skipped" not in ran, ran
    for name in classifiers:
        assert sha256_file(repository / name / INT8_FILE) == int8[name]
        mine = verdicts_here(repository / name)["int8"]
        assert mine["machine"] == cpu_type() and mine["quantised_here"] is False
        # The other type's verdicts are kept as they were; and as they were really measured here, on the same
        # file, this type's numbers are theirs.
        assert stored_verdicts(repository / name)[OTHER_CPU] == theirs[name]
        assert (mine["passed"], mine["verdicts_changed"], mine["max_score_gap"]) == tuple(
            theirs[name]["int8"][k] for k in ("passed", "verdicts_changed", "max_score_gap"))
    (again,) = [json.loads(out[out.index("{"):]) for out in run_together(_GATE, str(samples), str(repository),
                                                                           copies=1)]
    assert again == {"skipped": "verdicts current"}
