"""RetinaFace pre- and post-processing: resized input, prior boxes, box decoding and NMS (Caffe's rules).

The network itself is an engine; this module is the part Caffe ran in its PriorBox and DetectionOutput
layers, in numpy, so the exported graph stays a plain tensor program.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from engines.specs import DETECTOR_SPEC, DetectorSpec


@dataclass(frozen=True)
class DetectorInput:
    tensor: np.ndarray  # 3 x h x w float32, mean-subtracted BGR
    resized_w: int
    resized_h: int


@dataclass(frozen=True)
class Detection:
    """A face in original-image coordinates, normalised to [0, 1] like Caffe's output (may exceed it)."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float

    def pixel_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) in pixels by the upstream rule the liveness models were trained with."""
        x1, y1, x2, y2 = self.x1 * width, self.y1 * height, self.x2 * width, self.y2 * height
        return int(x1), int(y1), int(x2 - x1 + 1), int(y2 - y1 + 1)


def resized_size(width: int, height: int, spec: DetectorSpec) -> tuple[int, int]:
    """Upstream rule: images of at least t^2 px become (t*sqrt(W/H), t/sqrt(W/H)), t = target side."""
    w, h = width, height
    if width * height >= spec.target_side**2:
        r = math.sqrt(width / height)
        w, h = int(spec.target_side * r), int(spec.target_side / r)
    if max(w, h) > spec.max_side:  # only reachable with extreme aspect ratios
        f = spec.max_side / max(w, h)
        w, h = max(1, int(w * f)), max(1, int(h * f))
    # Extreme aspect ratios could leave one side below what the engines accept: keep it at the minimum.
    return max(w, spec.min_side), max(h, spec.min_side)


def prepare_input(bgr: np.ndarray, spec: DetectorSpec) -> DetectorInput:
    height, width = bgr.shape[:2]
    w, h = resized_size(width, height, spec)
    img = bgr if (w, h) == (width, height) else cv2.resize(bgr, (w, h), interpolation=cv2.INTER_LINEAR)
    chw = img.transpose(2, 0, 1).astype(np.float32)
    chw -= np.asarray(spec.bgr_mean, np.float32).reshape(3, 1, 1)
    return DetectorInput(chw, w, h)


@lru_cache(maxsize=64)
def priors(spec: DetectorSpec, width: int, height: int) -> np.ndarray:
    """Prior boxes [P, 4] as (cx, cy, w, h) in input pixels, in Caffe PriorBox order (row, col, size)."""
    out = []
    for step, sizes in spec.priors:
        # Feature-map size after the stride-2, pad-1, 3x3 convolutions: ceil halving.
        fm_w, fm_h = width, height
        for _ in range(int(math.log2(step))):
            fm_w, fm_h = (fm_w + 1) // 2, (fm_h + 1) // 2
        ys, xs = np.meshgrid(np.arange(fm_h), np.arange(fm_w), indexing="ij")
        cx = (xs.reshape(-1, 1) + 0.5) * step
        cy = (ys.reshape(-1, 1) + 0.5) * step
        sz = np.asarray(sizes, np.float64).reshape(1, -1)
        n = cx.shape[0] * sz.shape[1]
        grid = np.stack(
            [np.broadcast_to(cx, (cx.shape[0], sz.shape[1])).reshape(n),
             np.broadcast_to(cy, (cy.shape[0], sz.shape[1])).reshape(n),
             np.broadcast_to(sz, (cx.shape[0], sz.shape[1])).reshape(n),
             np.broadcast_to(sz, (cx.shape[0], sz.shape[1])).reshape(n)], axis=1)
        out.append(grid)
    return np.concatenate(out).astype(np.float32)


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS: the best remaining box is kept and every box overlapping it by more than ``threshold`` (IoU)
    dropped. Loops once per *kept* box (a few faces), not once per candidate (up to nms_top_k): this runs for
    every detector call and was the largest cost on the server's event loop."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        inter = (np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
                 * np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0,
                           None))
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= threshold]
    return keep


def decode_detections(loc: np.ndarray, conf: np.ndarray, inp: DetectorInput, spec: DetectorSpec
                      ) -> list[Detection]:
    """Caffe DetectionOutput (CENTER_SIZE, shared location, one class): faces sorted by score, best first."""
    pri = priors(spec, inp.resized_w, inp.resized_h)
    if loc.shape[0] != pri.shape[0]:
        raise ValueError(f"detector output has {loc.shape[0]} priors, expected {pri.shape[0]}")
    scores = conf[:, 1]
    idx = np.nonzero(scores > spec.confidence_threshold)[0]
    if idx.size == 0:
        return []
    idx = idx[np.argsort(-scores[idx], kind="stable")[: spec.nms_top_k]]
    p, lc = pri[idx].astype(np.float64), loc[idx].astype(np.float64)
    v = spec.variances
    cx = p[:, 0] + lc[:, 0] * v[0] * p[:, 2]
    cy = p[:, 1] + lc[:, 1] * v[1] * p[:, 3]
    w = p[:, 2] * np.exp(lc[:, 2] * v[2])
    h = p[:, 3] * np.exp(lc[:, 3] * v[3])
    # Normalised by the network input size, as Caffe does; the same fractions of the original image.
    boxes = np.stack([(cx - w / 2) / inp.resized_w, (cy - h / 2) / inp.resized_h,
                      (cx + w / 2) / inp.resized_w, (cy + h / 2) / inp.resized_h], axis=1)
    keep = _nms(boxes, scores[idx].astype(np.float64), spec.nms_threshold)[: spec.keep_top_k]
    return [Detection(float(boxes[k, 0]), float(boxes[k, 1]), float(boxes[k, 2]), float(boxes[k, 3]),
                      float(scores[idx[k]])) for k in keep]


Box = tuple[int, int, int, int]  # x, y, w, h in pixels


@dataclass(frozen=True)
class FaceDetector:
    """Everything around the detector network, in one place: ``prepare`` an image, let an engine run ``feed(inp)``
    (a dynamic batcher in the server, an engine instance in training), then ``faces`` decodes and filters the
    outputs. The pipelines and the training preprocessing all call the network through this."""

    min_score: float
    spec: DetectorSpec = DETECTOR_SPEC

    def prepare(self, bgr: np.ndarray) -> DetectorInput:
        return prepare_input(bgr, self.spec)

    @staticmethod
    def feed(inp: DetectorInput) -> dict[str, np.ndarray]:
        """The network's inputs for one image (no batch axis)."""
        return {"input": inp.tensor}

    def faces(self, outputs: Mapping[str, np.ndarray], inp: DetectorInput) -> list[Detection]:
        """Detections at or above ``min_score``, best first, from one image's outputs (no batch axis)."""
        return [d for d in decode_detections(outputs["loc"], outputs["conf"], inp, self.spec)
                if d.score >= self.min_score]

    def best_box(self, outputs: Mapping[str, np.ndarray], inp: DetectorInput, width: int, height: int) -> Box | None:
        faces = self.faces(outputs, inp)
        return faces[0].pixel_box(width, height) if faces else None

    def detect_box(self, bgr: np.ndarray,
                   run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]) -> Box | None:
        """Synchronous: ``run`` takes a batch of one and returns batched outputs (an engine instance's infer)."""
        inp = self.prepare(bgr)
        out = run({k: v[None] for k, v in self.feed(inp).items()})
        return self.best_box({k: v[0] for k, v in out.items()}, inp, bgr.shape[1], bgr.shape[0])
