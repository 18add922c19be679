"""Real TensorRT-RTX builds of every served model (its builder needs no GPU): FP32 and the strongly typed FP16
variant, profiles from the batcher settings, the engine cache, and TensorRT's own error messages.

Not skipped in CI (``make test`` installs TensorRT-RTX); elsewhere it skips, saying so. The engines land in the
model repository's engine cache, so a second run reuses them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest

from engines.declarations import declaration_for
from engines.repository import ModelRepository
from engines.tensorrt.build import EngineBuildError, EngineRequest, engine_requests, ensure_engine, parse_network
from engines.tensorrt.cache import BuilderSettings
from engines.tensorrt.flavour import TENSORRT_RTX, Flavour, probe
from engines.tensorrt.profiles import batch_buckets
from tests.conftest import ENGINE_LINES, run_together

RTX = probe(TENSORRT_RTX)
if RTX is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("TensorRT-RTX is not installed: `make test` installs it (make tensorrt-rtx)")
    pytest.skip("TensorRT-RTX is not installed (make tensorrt-rtx)", allow_module_level=True)
FLAVOUR: Flavour = RTX
pytestmark = pytest.mark.weights


def build(repo: ModelRepository, req: EngineRequest) -> dict:
    plan = ensure_engine(repo, req, BuilderSettings(), FLAVOUR)
    info = json.loads((plan.parent / "build.json").read_text())
    info["plan"] = plan
    return info


@pytest.fixture(scope="module")
def repo(repository_dir: Path) -> ModelRepository:
    names = ModelRepository(repository_dir).names()
    assert any(declaration_for(ModelRepository(repository_dir).load(n)).kind == "slowfast_clip" for n in names), \
        "the SlowFast ensemble members must be in the repository (make identify-models)"
    return ModelRepository(repository_dir)


def test_every_served_model_builds_in_fp32_and_fp16_with_the_batchers_profiles(repo: ModelRepository) -> None:
    built = {}
    for precision in ("fp32", "fp16"):
        for req in engine_requests(repo, repo.names(), precision):
            info = build(repo, req)
            built[req.name, precision] = info
            ENGINE_LINES.append(f"{FLAVOUR.label()} {req.name} {precision}: {info['plan_bytes'] / 1024:.0f} KiB, "
                                f"built in {info['build_seconds']:.2f} s, {info['network']['layers']} layers, "
                                f"targets {','.join(info['key']['targets'])}")
            decl = declaration_for(repo.load(req.name))
            (prof,) = info["key"]["profiles"][0]
            # Every batch the batcher can form fits: 1 .. max_batch_size, and so every CUDA-graph bucket.
            assert prof["min"][0] == 1 and prof["max"][0] == decl.batching.max_batch_size
            assert max(batch_buckets(req.max_batch_size, req.preferred)) <= prof["max"][0]
            for axis, (lo, hi) in decl.input_bounds(prof["name"]).items():  # the detector's height and width
                assert prof["min"][axis] == lo and prof["max"][axis] == hi
            types = info["network"]["output_types"]
            if precision == "fp16":
                assert types.get("HALF", 0) > types.get("FLOAT", 0), types  # the parsed network runs in FP16
            else:
                assert "HALF" not in types, types
    for name in repo.names():
        assert built[name, "fp16"]["plan_bytes"] < built[name, "fp32"]["plan_bytes"], name


def test_the_cache_hits_on_a_second_build_and_rebuilds_when_the_onnx_changes(repo: ModelRepository,
                                                                            tmp_path: Path) -> None:
    name = "minifasnet_v2"
    own = ModelRepository(tmp_path)
    shutil.copytree(repo.model_dir(name), own.model_dir(name), ignore=shutil.ignore_patterns("engines"))
    req = EngineRequest(name, 32, (), "fp32")
    first = build(own, req)
    again = build(own, req)
    assert again["plan"] == first["plan"] and again["built_at"] == first["built_at"]  # a hit: nothing rebuilt
    model = onnx.load(str(own.onnx_path(name)))
    tensor = model.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(tensor).copy()
    arr.flat[0] += 1.0
    tensor.CopyFrom(onnx.numpy_helper.from_array(arr, tensor.name))
    onnx.save(model, str(own.onnx_path(name)))
    changed = build(own, req)
    assert changed["plan"] != first["plan"] and changed["key"]["onnx_sha256"] != first["key"]["onnx_sha256"]


def test_a_parser_error_is_tensorrts_own_message_naming_the_node(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    node = onnx.helper.make_node("NoSuchOperator", ["x"], ["y"], name="the_broken_node", domain="facegate.test")
    graph = onnx.helper.make_graph([node], "g", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                         onnx.helper.make_opsetid("facegate.test", 1)])
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    with pytest.raises(EngineBuildError, match="the_broken_node"):
        parse_network(FLAVOUR.load(), path)


_BUILD = """
import json, sys
from pathlib import Path
from engines.repository import ModelRepository
from engines.tensorrt.build import EngineRequest, ensure_engine
from engines.tensorrt.cache import BuilderSettings
from engines.tensorrt.flavour import TENSORRT_RTX, probe
plan = ensure_engine(ModelRepository(Path(sys.argv[1])), EngineRequest(sys.argv[2], 8, (), "fp32"), BuilderSettings(),
                     probe(TENSORRT_RTX))
print(json.dumps({"plan": str(plan), "built_at": json.loads((plan.parent / "build.json").read_text())["built_at"]}))
"""


def test_processes_starting_together_build_each_engine_once(repo: ModelRepository, tmp_path: Path) -> None:
    """Two workers on one repository: one builds while the other waits, then loads the same plan (before, both
    built it, and their plan files shared one temporary name, so one could rename the other's half-written file)."""
    name = "minifasnet_v2"
    shutil.copytree(repo.model_dir(name), tmp_path / name, ignore=shutil.ignore_patterns("engines"))
    answers = [json.loads(out) for out in run_together(_BUILD, str(tmp_path), name)]
    assert answers[0] == answers[1]  # the same plan, built once (one build time recorded)
    built = [p for p in (tmp_path / name / "engines").iterdir() if p.is_dir()]
    assert len(built) == 1 and not list(built[0].glob("*.tmp"))
