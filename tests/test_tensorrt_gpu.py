"""TensorRT and CUDA on a real GPU. Marked ``gpu``: they skip, with the reason, where either is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.tensorrt.availability import availability

AVAIL = availability()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not AVAIL.tensorrt_usable, reason=f"needs TensorRT and a GPU: {AVAIL.reason}")]


@pytest.mark.parametrize("model", ["minifasnet_v2", "minifasnet_v1se", "retinaface"])
def test_engine_matches_onnxruntime(model: str, repository_dir: Path) -> None:
    from engines.declarations import declaration_for
    from engines.repository import ModelRepository
    from engines.runtime.onnxruntime_engine import OnnxRuntimeModel
    from engines.runtime.tensorrt_engine import TensorRTModel
    from engines.tensorrt.build import EngineRequest, ensure_engine
    from engines.tensorrt.cache import BuilderSettings
    from engines.tensorrt.profiles import batch_buckets

    repo = ModelRepository(repository_dir)
    meta = repo.load(model)
    plan = ensure_engine(repo, EngineRequest(model, 8, (), "fp32"), BuilderSettings())
    trt_model = TensorRTModel(plan, meta, batch_buckets(8), cuda_graphs=True)
    ort_model = OnnxRuntimeModel(repo.onnx_path(model), meta, ["CPUExecutionProvider"])
    item = declaration_for(meta).warmup_item()
    rng = np.random.default_rng(0)
    for n in (1, 3, 8, 3):  # the repeated shape runs from a captured CUDA graph
        batch = {k: rng.uniform(0, 255, (n, *v.shape)).astype(np.float32) for k, v in item.items()}
        a, _ = trt_model.new_instance().infer(batch)
        b, _ = ort_model.new_instance().infer(batch)
        for k in a:
            assert np.abs(a[k] - b[k]).max() <= 1e-2
