"""INT8 variants of the two liveness classifiers, served only if they pass the liveness parity gate.

``python -m engines.liveness_gate --samples DIR``: the labelled sample images under scale, crop, brightness, flip
and JPEG-quality changes make a parity set (>= 50 images) and, with other parameters, a calibration set (never the
same images). Both classifiers are quantised (``engines.precision``), then every parity image goes through the
served detector and crop rule and both classifiers, FP32 and INT8, through OpenVINO. The pair passes if every
verdict is identical and every live score within 0.02 of FP32 (the server's own score and decision rule); the
outcome and its numbers go to each classifier's ``precision.json``. Without sample images nothing is made.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engines.identify.preprocess import OnnxDetector
from engines.precision import INT8_FILE, gate_main, quantize_int8, write_gate
from engines.repository import ModelRepository
from engines.specs import LIVENESS_SPECS
from engines.vision.crop import crop_for_model
from engines.vision.liveness_decision import DEFAULT_MARGIN, DEFAULT_THRESHOLD, decide, softmax

log = logging.getLogger("engines.liveness_gate")
MAX_SCORE_GAP = 0.02
MIN_PARITY_IMAGES = 50


def _scaled(img: np.ndarray, f: float) -> np.ndarray:
    return cv2.resize(img, (int(img.shape[1] * f), int(img.shape[0] * f)), interpolation=cv2.INTER_AREA)


def _cropped(img: np.ndarray, frac: float, corner: int) -> np.ndarray:
    h, w = img.shape[:2]
    ch, cw = int(h * frac), int(w * frac)
    y, x = (0 if corner in (0, 1) else h - ch), (0 if corner in (0, 2) else w - cw)
    return img[y:y + ch, x:x + cw]


def _bright(img: np.ndarray, delta: int) -> np.ndarray:
    return np.clip(img.astype(np.int16) + delta, 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    out = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else None
    return out if out is not None else img


def variants(img: np.ndarray, parity: bool) -> list[np.ndarray]:
    """The parity set's changes of one image (18), or the calibration set's (other parameters, 8)."""
    if not parity:
        return [img, _scaled(img, 0.9), _scaled(img, 1.1), _bright(img, 10), _bright(img, -10), _jpeg(img, 90),
                _cropped(img, 0.95, 1), _cropped(img, 0.95, 2)]
    return [*(_scaled(img, f) for f in (0.5, 0.75, 1.25)), *(_cropped(img, 0.85, c) for c in range(4)),
            *(_bright(img, d) for d in (-40, -20, 20, 40)), cv2.flip(img, 1),
            *(_jpeg(img, q) for q in (40, 60, 80)), _bright(cv2.flip(img, 1), 20), _bright(cv2.flip(img, 1), -20),
            _jpeg(_scaled(img, 0.75), 60)]


def crops_of(detector: OnnxDetector, images: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Per classifier, the model input of every image with a face (the served detector and crop rule)."""
    out: list[list[np.ndarray]] = [[] for _ in LIVENESS_SPECS]
    for img in images:
        box = detector.best_box(img, 0.6)
        if box is None:
            continue
        for k, spec in enumerate(LIVENESS_SPECS):
            out[k].append(crop_for_model(img, box, spec.scale, spec.width, spec.height))
    return out


def scores(paths: list[Path], repo: ModelRepository, crops: list[list[np.ndarray]], precision: str) -> np.ndarray:
    from engines.runtime.openvino_engine import OpenVinoModel

    probs = []
    for path, spec, xs in zip(paths, LIVENESS_SPECS, crops, strict=True):
        meta = repo.load(spec.name)
        inst = OpenVinoModel(path, meta, precision=precision).new_instance()
        name = meta.inputs[0].name
        logits = np.concatenate([inst.infer({name: np.stack(xs[i:i + 8])})[0]["logits"]
                                 for i in range(0, len(xs), 8)])
        probs.append([float(softmax(row.astype(np.float64))[spec.live_class]) for row in logits])
    return np.mean(np.asarray(probs), axis=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    repo = ModelRepository(args.repository)
    samples = sorted(p for p in args.samples.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images = [img for img in (cv2.imread(str(p), cv2.IMREAD_COLOR) for p in samples) if img is not None]
    if not images:
        log.warning("no sample images in %s: no INT8 liveness variant is made (FP32 is served)", args.samples)
        return {"skipped": f"no sample images in {args.samples}"}
    detector = OnnxDetector(repo.onnx_path("retinaface"))
    parity = crops_of(detector, [v for img in images for v in variants(img, True)])
    calib = crops_of(detector, [v for img in images for v in variants(img, False)])
    int8_paths = []
    for spec, xs in zip(LIVENESS_SPECS, calib, strict=True):
        dst = repo.model_dir(spec.name) / INT8_FILE
        name = repo.load(spec.name).inputs[0].name
        quantize_int8(repo.onnx_path(spec.name), dst, ({name: np.stack(xs[i:i + 8])} for i in range(0, len(xs), 8)),
                      args.method)
        int8_paths.append(dst)
    fp32 = scores([repo.onnx_path(s.name) for s in LIVENESS_SPECS], repo, parity, "fp32")
    int8 = scores(int8_paths, repo, parity, "int8")
    verdicts = sum(decide(a, DEFAULT_THRESHOLD, DEFAULT_MARGIN) != decide(b, DEFAULT_THRESHOLD, DEFAULT_MARGIN)
                   for a, b in zip(fp32, int8, strict=True))
    gap = float(np.abs(fp32 - int8).max())
    n = len(fp32)
    passed = n >= MIN_PARITY_IMAGES and verdicts == 0 and gap <= MAX_SCORE_GAP
    summary = (f"{verdicts} of {n} verdicts changed, live score gap max {gap:.4f} (gate: none changed, <= "
               f"{MAX_SCORE_GAP}, >= {MIN_PARITY_IMAGES} images)")
    log.info("liveness INT8 pair: %s -> %s", summary, "passed" if passed else "failed")
    for spec in LIVENESS_SPECS:
        write_gate(repo, spec.name, {"passed": passed, "summary": summary, "verdicts_changed": verdicts,
                                     "max_score_gap": gap, "parity_images": n,
                                     "calibration_images": len(calib[0]),
                                     "data": f"{len(images)} sample images under scale, crop, brightness, flip and "
                                             f"JPEG quality changes"})
    return {"passed": passed, "summary": summary, "parity_images": n}


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=Path, required=True, help="labelled liveness sample images")


def main(argv: list[str] | None = None) -> int:
    return gate_main(__doc__.splitlines()[0], argv, _arguments, run)


if __name__ == "__main__":
    sys.exit(main())
