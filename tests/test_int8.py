"""INT8 variants behind their parity gate: what the gate wrote is what is served, and nothing else is.

The gate itself (``engines.identify.int8_gate``) runs at model preparation (``make identify-models``); these tests
read its outcome from the repository the suite uses and check the serving side against it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engines.declarations import declaration_for
from engines.identify.ensemble import find_ensemble
from engines.precision import GATE_FILE, INT8_FILE, int8_variant, verdicts_here
from engines.repository import ModelRepository
from engines.runtime.factory import EngineFactory, RuntimeSettings
from engines.runtime.openvino_engine import OpenVinoModel
from tests.verdicts import as_format1

pytestmark = pytest.mark.weights


def _members(repository_dir: Path) -> list[str]:
    ens = find_ensemble(repository_dir)
    if ens is None or not all((repository_dir / m / GATE_FILE).is_file() for m in ens.members):
        pytest.skip("needs the identification ensemble with its INT8 gate run (make identify-models)")
    return list(ens.members)


def test_every_member_has_a_gate_verdict_with_its_numbers(repository_dir: Path) -> None:
    for name in _members(repository_dir):
        entry = verdicts_here(repository_dir / name)["int8"]
        assert entry["passed"] == (entry["min_cosine"] >= 0.99 and entry["rank1_int8"] == entry["rank1_fp32"])
        assert entry["parity_clips"] >= 50 and entry["calibration_clips"] >= 32
        assert "synthetic" in entry["data"]


def test_the_int8_variants_keep_the_embedding_projection_in_fp32(repository_dir: Path) -> None:
    import onnx

    for name in _members(repository_dir):
        graph = onnx.load(str(repository_dir / name / INT8_FILE)).graph
        dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
        gemms = [n for n in graph.node if n.op_type in ("Gemm", "MatMul")]
        assert gemms, name
        for n in gemms:  # its weights are plain FP32, not dequantised INT8
            assert n.input[1] in floats and n.input[1] not in dequantized, (name, n.name)
        assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # the rest is quantised


def test_a_passed_variant_runs_and_a_failed_or_swapped_one_is_never_served(repository_dir: Path,
                                                                              tmp_path: Path) -> None:
    repo = ModelRepository(repository_dir)
    rng = np.random.default_rng(1)
    for name in _members(repository_dir):
        path, why = int8_variant(repo, name)
        entry = verdicts_here(repository_dir / name)["int8"]
        assert (path is not None) == bool(entry["passed"]), why
        if path is None:
            continue
        meta = repo.load(name)
        x = {k: rng.uniform(0, 255, (4, *v.shape)).astype(v.dtype)
             for k, v in declaration_for(meta).warmup_item().items()}
        a, _ = OpenVinoModel(path, meta, precision="int8").new_instance().infer(x)
        b, _ = OpenVinoModel(repo.onnx_path(name), meta).new_instance().infer(x)
        # Random inputs are far outside what it was calibrated on (the gate measured parity on real clips):
        # here only that it runs as the same model would, shapes and all.
        assert a["embedding"].shape == b["embedding"].shape and np.isfinite(a["embedding"]).all()
    # A copy whose gate says failed, ran on another CPU, or whose INT8 file was swapped, is served in FP32
    # whatever its speed.
    name = _members(repository_dir)[0]
    copy = tmp_path / "repo"
    shutil.copytree(repository_dir / name, copy / name, ignore=shutil.ignore_patterns("engines"))
    crepo = ModelRepository(copy)
    entry = json.loads(as_format1(verdicts_here(copy / name)))  # as files held it before the per-type verdicts
    if (copy / name / INT8_FILE).is_file():
        entry["int8"]["passed"] = True
        (copy / name / GATE_FILE).write_text(json.dumps(entry))
        assert int8_variant(crepo, name)[0] is not None
        # A verdict measured on another type of CPU, or written before verdicts named theirs, is not this one's.
        for machine, shown in (("Some Other CPU (family 23 model 1) x2", "Some Other CPU (family 23 model 1) x2"),
                               (None, "not recorded")):
            other = json.loads(json.dumps(entry))
            if machine is None:
                del other["int8"]["machine"]
            else:
                other["int8"]["machine"] = machine
            (copy / name / GATE_FILE).write_text(json.dumps(other))
            assert int8_variant(crepo, name) == (None, f"the INT8 gate ran on another CPU ({shown})")
        (copy / name / GATE_FILE).write_text(json.dumps(entry))
        assert int8_variant(crepo, name)[0] is not None
        (copy / name / INT8_FILE).write_bytes((copy / name / INT8_FILE).read_bytes() + b"\0")
        assert int8_variant(crepo, name) == (None, "the INT8 file is missing or not the one the gate passed")
    entry["int8"]["passed"] = False
    entry["int8"]["summary"] = "failed on purpose"
    (copy / name / GATE_FILE).write_text(json.dumps(entry))
    decl = declaration_for(crepo.load(name))
    model, reason = EngineFactory(crepo, RuntimeSettings(prefer_gpu=False)).create(decl, decl.batching)
    assert not model.runtime.endswith(":int8") and "failed its parity gate (failed on purpose)" in reason
    # And INT8 can be turned off by a setting even where it passed.
    model, reason = EngineFactory(repo, RuntimeSettings(prefer_gpu=False, int8=False)).create(decl, decl.batching)
    assert not model.runtime.endswith(":int8") and "INT8 not allowed" in reason


def test_the_liveness_pair_has_a_gate_verdict_and_is_served_accordingly(repository_dir: Path) -> None:
    from engines.specs import LIVENESS_SPECS

    repo = ModelRepository(repository_dir)
    names = [s.name for s in LIVENESS_SPECS]
    if not all((repository_dir / n / GATE_FILE).is_file() for n in names):
        pytest.skip("the liveness INT8 gate has not run (make models with LIVENESS_SAMPLES)")
    for name in names:
        entry = verdicts_here(repository_dir / name)["int8"]
        assert entry["parity_images"] >= 50
        assert entry["passed"] == (entry["verdicts_changed"] == 0 and entry["max_score_gap"] <= 0.02)
        path, why = int8_variant(repo, name)
        assert (path is not None) == entry["passed"], why
        decl = declaration_for(repo.load(name))
        model, reason = EngineFactory(repo, RuntimeSettings(prefer_gpu=False)).create(decl, decl.batching)
        assert model.runtime.endswith(":int8") <= entry["passed"], reason  # never INT8 unless it passed
