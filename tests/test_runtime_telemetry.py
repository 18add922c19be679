"""The runtimes' own telemetry stays off in facegate's processes: loading and running a model in ONNX Runtime and
in OpenVINO leaves nothing in an empty home directory, where both otherwise write the identifiers their uploads
carry (ONNX Runtime's device id, OpenVINO's Google Analytics client id), and OpenVINO's telemetry sends nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.weights

_RUN = """
import sys
import engines
import numpy as np
import onnxruntime as ort
import openvino as ov
onnx = sys.argv[1]
session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
x = np.zeros((1, 3, 80, 80), np.float32)
session.run(None, {session.get_inputs()[0].name: x})
core = ov.Core()
core.compile_model(core.read_model(onnx), "CPU")(x)
import openvino.tools.ovc.telemetry_utils as t
print("telemetry:", t.tm.__name__, getattr(t.tm.Telemetry(), "consent", None))
"""


def test_loading_both_runtimes_through_engines_leaves_no_identifier_and_sends_nothing(repository_dir: Path,
                                                                                      tmp_path: Path) -> None:
    # Not run without the switch as a contrast: that would attempt the vendors' uploads from a test (checked by hand
    # instead, README *Security*). CI=true is removed, as OpenVINO declines on its own in CI.
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "CI")}
    out = subprocess.run([sys.executable, "-c", _RUN, str(repository_dir / "minifasnet_v2" / "model.onnx")],
                         env={**env, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120, check=True)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert "telemetry: openvino.tools.ovc.telemetry_stub" in out.stdout  # OpenVINO's own no-op stand-in
