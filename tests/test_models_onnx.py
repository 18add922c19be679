"""The exported ONNX models equal the framework models, and the pipeline reproduces the upstream reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from engines.specs import DETECTOR_SPEC, LIVENESS_SPECS
from engines.vision.crop import crop_for_model
from engines.vision.detection import decode_detections, prepare_input
from engines.vision.imaging import ImageLimits, decode_image
from tests.conftest import REFERENCE

pytestmark = pytest.mark.weights

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("spec", LIVENESS_SPECS, ids=lambda s: s.name)
def test_liveness_onnx_equals_torch(spec, weights_dir: Path, repository_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from engines.models.minifasnet import load_minifasnet

    model = load_minifasnet(weights_dir / spec.weights, spec.variant)
    session = ort.InferenceSession(str(repository_dir / spec.name / "model.onnx"))
    x = np.random.default_rng(1).uniform(0, 255, (5, 3, 80, 80)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = session.run(None, {"input": x})[0]
    assert float(np.abs(ref - out).max()) <= 1e-4


def test_detector_onnx_equals_torch(weights_dir: Path, repository_dir: Path) -> None:
    from engines.models.retinaface import CaffeRetinaFace

    sf = weights_dir / "silent-face"
    model = CaffeRetinaFace(sf / "deploy.prototxt", sf / "Widerface-RetinaFace.caffemodel").eval()
    session = ort.InferenceSession(str(repository_dir / "retinaface" / "model.onnx"))
    for shape in ((3, 3, 221, 166), (2, 3, 144, 256)):
        x = np.random.default_rng(2).uniform(-128, 128, shape).astype(np.float32)
        with torch.no_grad():
            ref = [t.numpy() for t in model(torch.from_numpy(x))]
        out = session.run(None, {"input": x})
        for r, o in zip(ref, out, strict=True):
            assert float(np.abs(r - o).max()) <= 1e-4


def test_parameter_counts_match_the_release(weights_dir: Path) -> None:
    from engines.models.minifasnet import MiniFASNet

    counts = {v: sum(p.numel() for p in MiniFASNet(v).parameters()) for v in ("v2", "v1se")}
    assert counts == {"v2": 434_560, "v1se": 433_586}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_detector_boxes_and_scores_match_the_reference(name: str, samples: Path, repository_dir: Path) -> None:
    _, live_ref, box_ref, conf_ref = REFERENCE[name]
    image = decode_image((samples / name).read_bytes(), ImageLimits())
    inp = prepare_input(image.bgr, DETECTOR_SPEC)
    det = ort.InferenceSession(str(repository_dir / "retinaface" / "model.onnx"))
    loc, conf = det.run(None, {"input": inp.tensor[None]})
    best = decode_detections(loc[0], conf[0], inp, DETECTOR_SPEC)[0]
    box = best.pixel_box(image.width, image.height)
    assert max(abs(a - b) for a, b in zip(box, box_ref, strict=True)) <= 2
    assert best.score == pytest.approx(conf_ref, abs=1e-3)
    live = []
    for spec in LIVENESS_SPECS:
        s = ort.InferenceSession(str(repository_dir / spec.name / "model.onnx"))
        crop = crop_for_model(image.bgr, box, spec.scale, 80, 80)
        live.append(_softmax(s.run(None, {"input": crop[None]})[0][0])[1])
    assert float(np.mean(live)) == pytest.approx(live_ref, abs=0.01)
