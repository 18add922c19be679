"""facegate's TensorRT code paths executed against test doubles of ``tensorrt`` and ``cuda.bindings.runtime``
(tests/fake_gpu.py): build -> cache -> deserialise (and rebuild when that fails) -> buffers bound by name ->
batches padded to buckets -> CUDA graph captured on a shape's second use and replayed -> fallback when capture
fails -> teardown; and the registry choosing TensorRT. This checks our control flow, not TensorRT itself."""

from __future__ import annotations

import asyncio
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engines.repository import ModelMetadata, ModelRepository, TensorMeta
from engines.tensorrt.build import EngineRequest, ensure_engine
from engines.tensorrt.cache import BuilderSettings
from tests.fake_gpu import FakeCuda, make_fake_tensorrt


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    import engines.runtime.tensorrt_engine as trt_engine

    cuda = FakeCuda()
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cuda  # type: ignore[attr-defined]
    package = types.ModuleType("cuda")
    package.bindings = bindings  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cuda", package)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(cuda))
    monkeypatch.setattr(trt_engine, "_LOGGERS", {})
    return cuda


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    repo = ModelRepository(tmp_path / "repo")
    (repo.model_dir("m")).mkdir(parents=True)
    repo.onnx_path("m").write_bytes(b"not really onnx; the fake parser accepts anything")
    repo.save(ModelMetadata("m", "1", (TensorMeta("input", "float32", (-1, 3, 4, 4)),),
                            (TensorMeta("logits", "float32", (-1, 3)),), onnx_sha256="0" * 64, max_batch_size=8))
    return repo


def test_build_is_cached_and_a_plan_that_does_not_load_is_rebuilt(fake_gpu: FakeCuda, repo: ModelRepository) -> None:
    req = EngineRequest("m", 8, (), "fp32")
    plan = ensure_engine(repo, req, BuilderSettings())
    assert (plan.parent / "build.json").is_file()
    assert any(p.name.startswith("timing-sm90-trt10.16.1") for p in plan.parent.parent.iterdir())
    first = plan.stat().st_mtime_ns
    assert ensure_engine(repo, req, BuilderSettings()) == plan and plan.stat().st_mtime_ns == first  # cache hit
    plan.write_bytes(b"garbage from another GPU")
    rebuilt = ensure_engine(repo, req, BuilderSettings())
    assert rebuilt == plan and rebuilt.read_bytes().startswith(b"{")


def load(repo: ModelRepository, graphs: bool = True):  # type: ignore[no-untyped-def]
    from engines.runtime.tensorrt_engine import TensorRTModel

    plan = ensure_engine(repo, EngineRequest("m", 8, (), "fp32"), BuilderSettings())
    return TensorRTModel(plan, repo.load("m"), (1, 2, 4, 8), cuda_graphs=graphs)


def test_batches_are_padded_to_buckets_and_graphs_replayed(fake_gpu: FakeCuda, repo: ModelRepository) -> None:
    model = load(repo)
    assert model.runtime == "tensorrt:10.16.1" and model.max_batch_size == 8
    assert [t.shape for t in model.inputs] == [(-1, 3, 4, 4)]
    inst = model.new_instance()
    rng = np.random.default_rng(0)
    launches = []
    for n in (3, 3, 3, 5, 1):
        x = rng.uniform(0, 1, (n, 3, 4, 4)).astype(np.float32)
        out, timings = inst.infer({"input": x})
        np.testing.assert_allclose(out["logits"], x.reshape(n, -1)[:, :3] * 2, rtol=1e-6)
        assert out["logits"].shape == (n, 3) and timings.infer_ns >= 0
        launches.append(fake_gpu.launches)
    # Batch 3 pads to bucket 4: plain run first, graph captured and launched from the second use on.
    assert launches == [0, 1, 2, 2, 2]
    assert len(inst.graphs) == 1
    inst.close()


def test_capture_failure_falls_back_to_plain_execution(fake_gpu: FakeCuda, repo: ModelRepository) -> None:
    fake_gpu.fail_capture = True
    inst = load(repo).new_instance()
    x = np.ones((2, 3, 4, 4), np.float32)
    for _ in range(3):
        out, _ = inst.infer({"input": x})
        np.testing.assert_allclose(out["logits"], np.full((2, 3), 2.0))
    assert inst.graph_failures == 1 and not inst.graphs and fake_gpu.launches == 0
    inst.close()


def test_without_graphs_batches_run_unpadded(fake_gpu: FakeCuda, repo: ModelRepository) -> None:
    inst = load(repo, graphs=False).new_instance()
    for _ in range(3):
        out, _ = inst.infer({"input": np.ones((3, 3, 4, 4), np.float32)})
        assert out["logits"].shape == (3, 3)
    assert fake_gpu.launches == 0
    assert inst.time_batches({"input": np.ones((4, 3, 4, 4), np.float32)}, 5, graphs=False, transfers=True) > 0
    inst.close()


def test_teardown_frees_every_buffer_and_the_stream(fake_gpu: FakeCuda, repo: ModelRepository) -> None:
    inst = load(repo).new_instance()
    inst.infer({"input": np.ones((1, 3, 4, 4), np.float32)})
    allocated = set(fake_gpu.device) | set(fake_gpu.host)
    inst.close()
    assert allocated <= set(fake_gpu.freed)
    assert not fake_gpu.device and not fake_gpu.host


def test_the_registry_serves_a_model_on_tensorrt_when_it_is_usable(fake_gpu: FakeCuda, repo: ModelRepository) -> None:
    from engines.batching import BatcherConfig
    from engines.runtime.factory import RuntimeSettings
    from engines.tensorrt.availability import Availability
    from server.config import ServerConfig
    from server.model_registry import ModelRegistry

    config = replace(ServerConfig(model_repository=repo.root), runtime=RuntimeSettings(tensorrt_precision="fp32"),
                     batching={"m": BatcherConfig(max_batch_size=8, max_queue_delay_us=0)})
    registry = ModelRegistry(repo, config, Availability("10.16.1", True, 1, "TensorRT 10.16.1 with 1 GPU(s)"))

    async def main() -> list[np.ndarray]:
        await registry.load(["m"])
        b = registry.batcher("m")
        outs = await asyncio.gather(*[b.infer({"input": np.full((3, 4, 4), i, np.float32)}) for i in range(5)])
        await registry.stop()
        return [o["logits"] for o in outs]

    outs = asyncio.run(main())
    assert registry.models["m"].engine.runtime.startswith("tensorrt")
    assert registry.models["m"].runtime_reason == "TensorRT 10.16.1 with 1 GPU(s)"
    for i, o in enumerate(outs):
        np.testing.assert_allclose(o, np.full(3, 2.0 * i))
