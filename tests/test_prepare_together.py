"""Replicas on one models volume start together, and each one's entrypoint prepares the repository: one exports
each model while the others wait and find it up to date, and every ONNX file is the one its metadata names."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.repository import ModelRepository
from engines.weights import sha256_file
from tests.conftest import run_together

pytestmark = pytest.mark.weights

_PREPARE = """
import logging, sys
from pathlib import Path
from engines.prepare import prepare
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(name)s: %(message)s")
for noisy in ("onnxscript", "onnx_ir", "torch"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
prepare(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[1]) / ".weights")
"""


def test_two_processes_preparing_one_empty_repository_export_each_model_once(tmp_path: Path,
                                                                              weights_dir: Path) -> None:
    outputs = run_together(_PREPARE, str(tmp_path / "repo"), str(weights_dir))
    lines = [line for out in outputs for line in out.splitlines() if line.startswith("engines.prepare:")]
    exported = sorted(line.split()[1] for line in lines if "exported" in line)
    assert exported == ["minifasnet_v1se:", "minifasnet_v2:", "retinaface:"], lines
    assert sum("up to date" in line for line in lines) == 3, lines
    repo = ModelRepository(tmp_path / "repo")
    for name in repo.names():
        assert sha256_file(repo.onnx_path(name)) == repo.load(name).onnx_sha256
