"""The FP16 ONNX variant (FP32 I/O) runs in ONNX Runtime and stays within 1e-2 of FP32 on the sample crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines.specs import LIVENESS_SPECS
from engines.tensorrt.fp16 import convert_fp16
from engines.vision.crop import crop_for_model
from engines.vision.imaging import ImageLimits, decode_image
from tests.conftest import REFERENCE

pytestmark = pytest.mark.weights


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("spec", LIVENESS_SPECS, ids=lambda s: s.name)
def test_fp16_variant_matches_fp32_on_sample_crops(spec, repository_dir: Path, samples: Path,  # type: ignore[no-untyped-def]
                                                   tmp_path: Path) -> None:
    src = repository_dir / spec.name / "model.onnx"
    dst = convert_fp16(src, tmp_path / "model.fp16.onnx")
    model = onnx.load(str(dst))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O stays FP32
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    crops = []
    for name, (_, _, box, _) in REFERENCE.items():
        img = decode_image((samples / name).read_bytes(), ImageLimits()).bgr
        crops.append(crop_for_model(img, box, spec.scale, 80, 80))
    x = np.stack(crops)
    full = ort.InferenceSession(str(src)).run(None, {"input": x})[0]
    half = ort.InferenceSession(str(dst)).run(None, {"input": x})[0]
    assert half.dtype == np.float32
    assert float(np.abs(_softmax(full) - _softmax(half)).max()) <= 1e-2
    assert float(np.abs(full - half).max()) <= 5e-2  # logits too
