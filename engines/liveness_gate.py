"""Reduced-precision variants of the liveness pipeline, served only if they pass its parity gate.

``python -m engines.liveness_gate --samples DIR``: the labelled sample images under scale, crop, brightness, flip
and JPEG-quality changes make a parity set (>= 50 images) and, with other parameters, a calibration set (never the
same images). Both classifiers are quantised to INT8 (``engines.precision``); where the CPU has bf16 arithmetic,
bf16 (OpenVINO's precision hint) is a candidate for the classifiers and for the detector. Every parity image then
goes through the served detector and crop rule and both classifiers, in every combination that could be served
(detector FP32 or bf16, classifiers FP32, INT8 or bf16), and each is compared with all-FP32 (the detector on ONNX
Runtime, the classifiers on OpenVINO): a combination passes if every verdict is identical (a face found by one
and not the other counts as a changed verdict) and every live score within 0.02 (the server's own score and
decision rule). The detector's bf16 passes if it passes with FP32 classifiers; a classifier precision passes if
it passes with the FP32 detector and, where the detector's bf16 passed, with that one too, so whatever ``auto``
picks from the passed variants has been checked together. The outcome and its numbers go to each model's
``precision.json`` (bf16 as this pipeline's part, for this type of CPU). Without sample images nothing is made.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engines.declarations import LIVENESS
from engines.identify.preprocess import OnnxDetector
from engines.machine import has_bf16
from engines.precision import (
    INT8_FILE,
    gate_main,
    int8_vouched,
    quantize_int8,
    verdict_is_current,
    write_bf16_part,
    write_gate,
)
from engines.repository import ModelRepository
from engines.specs import DETECTOR, LIVENESS_SPECS
from engines.vision.crop import crop_for_model
from engines.vision.detection import Box
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


def boxes_of(detector: OnnxDetector, images: list[np.ndarray]) -> list[Box | None]:
    """The served detector's face box of every image (None where none is found)."""
    return [detector.best_box(img, 0.6) for img in images]


def crops_at(images: list[np.ndarray], boxes: list[Box | None]) -> list[list[np.ndarray]]:
    """Per classifier, the model input of every image whose box is not None, in order (the served crop rule)."""
    out: list[list[np.ndarray]] = [[] for _ in LIVENESS_SPECS]
    for img, box in zip(images, boxes, strict=True):
        if box is None:
            continue
        for k, spec in enumerate(LIVENESS_SPECS):
            out[k].append(crop_for_model(img, box, spec.scale, spec.width, spec.height))
    return out


class Classifiers:
    """Both classifiers in one precision on OpenVINO, compiled once and used on every detector's crops."""

    def __init__(self, repo: ModelRepository, paths: list[Path], precision: str) -> None:
        from engines.runtime.openvino_engine import OpenVinoModel

        self._models = []
        for path, spec in zip(paths, LIVENESS_SPECS, strict=True):
            meta = repo.load(spec.name)
            self._models.append((spec, meta.inputs[0].name,
                                 OpenVinoModel(path, meta, precision=precision).new_instance()))

    def scores(self, crops: list[list[np.ndarray]]) -> np.ndarray:
        """The live score of every crop set: the two classifiers' live probabilities averaged."""
        probs = []
        for (spec, name, inst), xs in zip(self._models, crops, strict=True):
            logits = np.concatenate([inst.infer({name: np.stack(xs[i:i + 8])})[0]["logits"]
                                     for i in range(0, len(xs), 8)])
            probs.append([float(softmax(row.astype(np.float64))[spec.live_class]) for row in logits])
        return np.mean(np.asarray(probs), axis=0)

    def live_scores(self, images: list[np.ndarray], boxes: list[Box | None]) -> np.ndarray:
        """Per parity image, the live score (NaN where no face was found)."""
        out = np.full(len(images), np.nan)
        found = [i for i, b in enumerate(boxes) if b is not None]
        if found:
            out[found] = self.scores(crops_at(images, boxes))
        return out


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """A combination against all-FP32: verdicts changed (a face found by one only counts) and the score gap."""
    both = ~np.isnan(reference) & ~np.isnan(candidate)
    verdicts = int(np.sum(np.isnan(reference) != np.isnan(candidate))) + sum(
        decide(a, DEFAULT_THRESHOLD, DEFAULT_MARGIN) != decide(b, DEFAULT_THRESHOLD, DEFAULT_MARGIN)
        for a, b in zip(reference[both], candidate[both], strict=True))
    gap = float(np.abs(reference[both] - candidate[both]).max()) if both.any() else 0.0
    n = len(reference)
    passed = n >= MIN_PARITY_IMAGES and verdicts == 0 and gap <= MAX_SCORE_GAP
    summary = (f"{verdicts} of {n} verdicts changed, live score gap max {gap:.4f} (gate: none changed, <= "
               f"{MAX_SCORE_GAP}, >= {MIN_PARITY_IMAGES} images)")
    return {"passed": passed, "summary": summary, "verdicts_changed": verdicts, "max_score_gap": gap,
            "parity_images": n}


def box_shift(a: list[Box | None], b: list[Box | None]) -> float:
    """The largest difference of any box coordinate (pixels) between two detectors' boxes of the same images."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    return max((float(np.abs(np.subtract(x, y)).max()) for x, y in pairs), default=0.0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    repo = ModelRepository(args.repository)
    # What the verdicts are about: another process replacing a model meanwhile voids them (precision._record).
    measured = {name: repo.load(name).onnx_sha256 for name in (DETECTOR, *(s.name for s in LIVENESS_SPECS))}
    samples = sorted(p for p in args.samples.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images = [img for img in (cv2.imread(str(p), cv2.IMREAD_COLOR) for p in samples) if img is not None]
    if not images:
        log.warning("no sample images in %s: no INT8 liveness variant is made (FP32 is served)", args.samples)
        return {"skipped": f"no sample images in {args.samples}"}
    detector = OnnxDetector(repo.onnx_path(DETECTOR))
    parity_images = [v for img in images for v in variants(img, True)]
    # An INT8 file another CPU type's verdict vouches for is gated as it is: quantising again would void that verdict.
    keep = [int8_vouched(repo, spec.name) for spec in LIVENESS_SPECS]
    calib_images = [v for img in images for v in variants(img, False)]
    calib = crops_at(calib_images, boxes_of(detector, calib_images)) if not all(keep) else []
    int8_paths = [repo.model_dir(spec.name) / INT8_FILE for spec in LIVENESS_SPECS]
    for k, (spec, dst) in enumerate(zip(LIVENESS_SPECS, int8_paths, strict=True)):
        if keep[k]:
            log.info("%s: gating the INT8 file there is, as it is", spec.name)
            continue
        xs, name = calib[k], repo.load(spec.name).inputs[0].name
        quantize_int8(repo.onnx_path(spec.name), dst, ({name: np.stack(xs[i:i + 8])} for i in range(0, len(xs), 8)),
                      args.method)
    fp32_paths = [repo.onnx_path(s.name) for s in LIVENESS_SPECS]
    classifiers = {"fp32": Classifiers(repo, fp32_paths, "fp32"), "int8": Classifiers(repo, int8_paths, "int8")}
    detectors = {"fp32": boxes_of(detector, parity_images)}
    bf16 = has_bf16()
    if bf16:
        classifiers["bf16"] = Classifiers(repo, fp32_paths, "bf16")
        detectors["bf16"] = boxes_of(OnnxDetector(repo.onnx_path(DETECTOR), "bf16"), parity_images)
    reference = classifiers["fp32"].live_scores(parity_images, detectors["fp32"])
    combos = {(d, c): compare(reference, models.live_scores(parity_images, boxes))
              for d, boxes in detectors.items() for c, models in classifiers.items()
              if (d, c) != ("fp32", "fp32")}
    for (d, c), r in combos.items():
        log.info("liveness gate, detector %s + classifiers %s: %s -> %s", d, c, r["summary"],
                 "passed" if r["passed"] else "failed")
    detector_bf16 = bf16 and combos[("bf16", "fp32")]["passed"]

    def verdict(precision: str) -> dict[str, Any]:
        """A classifier precision: with the FP32 detector, and with the bf16 one where that passed."""
        alone = combos[("fp32", precision)]
        if not detector_bf16 or not alone["passed"]:
            return alone
        both = combos[("bf16", precision)]
        return {**both, "summary": f"{alone['summary']}; with the bf16 detector {both['summary']}"}

    data = f"{len(images)} sample images under scale, crop, brightness, flip and JPEG quality changes"
    int8 = verdict("int8")
    for k, spec in enumerate(LIVENESS_SPECS):
        made = {"quantised_here": False} if keep[k] else {"quantised_here": True, "calibration_images": len(calib[k])}
        write_gate(repo, spec.name, {**int8, **made, "data": data}, measured[spec.name])
    out: dict[str, Any] = {"passed": int8["passed"], "summary": int8["summary"],
                           "parity_images": int8["parity_images"]}
    if bf16:
        b = verdict("bf16")
        for spec in LIVENESS_SPECS:
            write_bf16_part(repo, spec.name, LIVENESS, {**b, "data": data}, measured[spec.name])
        det = combos[("bf16", "fp32")]
        shift = box_shift(detectors["fp32"], detectors["bf16"])
        write_bf16_part(repo, DETECTOR, LIVENESS, {**det, "summary": f"{det['summary']}; boxes moved by up to "
                                                   f"{shift:.0f} px", "max_box_shift_px": shift, "data": data},
                        measured[DETECTOR])
        out["bf16"] = {"classifiers": b["summary"], "classifiers_passed": b["passed"],
                       "detector": det["summary"], "detector_passed": det["passed"], "max_box_shift_px": shift}
    else:
        log.info("this CPU has no bf16 arithmetic: no bf16 gate runs (bf16 is never served here)")
    return out


def stale(repo: ModelRepository) -> list[str]:
    """The verdicts this gate would write that are missing, or were measured for other models or on another
    type of CPU."""
    judged = [(s.name, "int8") for s in LIVENESS_SPECS]
    if has_bf16():
        judged += [(name, "bf16") for name in (*(s.name for s in LIVENESS_SPECS), DETECTOR)]
    return [f"{name} {kind}" for name, kind in judged if not verdict_is_current(repo, name, kind, LIVENESS)]


def run_if_stale(args: argparse.Namespace) -> dict[str, Any]:
    if not args.if_stale:
        return run(args)
    todo = stale(ModelRepository(args.repository))
    if not todo:
        log.info("liveness gate: every verdict is current for these models on this type of CPU; not run")
        return {"skipped": "verdicts current"}
    log.info("liveness gate: running for %s", ", ".join(todo))
    return run(args)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=Path, required=True, help="labelled liveness sample images")
    p.add_argument("--if-stale", action="store_true",
                   help="run only if a verdict is missing or was measured for other models or another CPU class "
                        "(a container's first start on each node)")


def main(argv: list[str] | None = None) -> int:
    return gate_main(__doc__.splitlines()[0], argv, _arguments, run_if_stale)


if __name__ == "__main__":
    sys.exit(main())
