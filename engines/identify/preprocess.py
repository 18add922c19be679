"""Turn dataset clips into model inputs with the server's own preprocessing, and cache them.

Detection runs on a few frames per clip (ONNX Runtime, the served detector), then the shared functions of
``engines.vision.clip_window`` build the crop box, the apex and the window: training sees exactly what the
server will feed the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from engines.identify.datasets import ClipRecord
from engines.repository import ModelRepository
from engines.runtime.base import EngineInstance
from engines.runtime.onnxruntime_engine import OnnxRuntimeModel
from engines.vision.clip_window import (
    ClipSpec,
    crop_frames,
    detection_frames,
    grey_thumbnail,
    model_window,
    spot_apex,
    square_crop_box,
    stable_box,
)
from engines.vision.detection import Box, FaceDetector


@dataclass
class PreparedClip:
    record: ClipRecord
    tensor: np.ndarray  # uint8 [3, T + 2*margin_frames, size + margin_px, size + margin_px]
    apex: int
    coverage: float
    padded: int


class OnnxDetector:
    """The served detector: FP32 on ONNX Runtime (the reference every gate compares with), or another CPU precision
    on OpenVINO (what a parity gate checks); two threads: preparation has the machine to itself."""

    def __init__(self, onnx_path: Path, precision: str = "fp32") -> None:
        meta = ModelRepository(onnx_path.parent.parent).load(onnx_path.parent.name)
        self.precision = precision
        if precision == "fp32":
            self._engine: EngineInstance = OnnxRuntimeModel(onnx_path, meta, ["CPUExecutionProvider"],
                                                            intra_op_threads=2).new_instance()
        else:
            from engines.runtime.openvino_engine import OpenVinoModel

            self._engine = OpenVinoModel(onnx_path, meta, threads=2, precision=precision).new_instance()

    def best_box(self, bgr: np.ndarray, min_score: float) -> Box | None:
        return FaceDetector(min_score).detect_box(bgr, lambda batch: self._engine.infer(batch)[0])


def prepare_clip(record: ClipRecord, detector: OnnxDetector, spec: ClipSpec) -> PreparedClip | None:
    read = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in record.frames]
    frames = [f for f in read if f is not None]
    if not frames or len(frames) != len(read):
        return None
    h, w = frames[0].shape[:2]
    sampled = detection_frames(len(frames), spec.detect_frames)
    box, coverage = stable_box([detector.best_box(frames[i], spec.face_score) for i in sampled])
    if box is None:
        return None
    crop = square_crop_box(box, w, h, spec.crop_scale)
    apex = record.apex
    if apex is None:
        apex = spot_apex([grey_thumbnail(f, crop) for f in frames], record.fps)
    win = model_window(len(frames), record.fps, spec.fps, spec.clip_len + 2 * spec.margin_frames, apex)
    tensor = crop_frames(frames, win.indices, crop, spec.size + spec.margin_px)
    return PreparedClip(record, np.clip(tensor, 0, 255).astype(np.uint8), apex, coverage, win.padded)


def cache_key(records: list[ClipRecord], spec: ClipSpec, detector: Path, precision: str = "fp32") -> str:
    h = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode())
    h.update(detector.read_bytes()[:4096])
    if precision != "fp32":  # FP32 keeps the key it always had, so existing caches stay valid
        h.update(precision.encode())
    for r in records:
        h.update(f"{r.key}:{len(r.frames)}:{r.apex}".encode())
    return h.hexdigest()[:16]


def prepare_all(records: list[ClipRecord], detector_path: Path, spec: ClipSpec, cache_dir: Path | None,
                detector_precision: str = "fp32") -> list[PreparedClip]:
    """Prepared clips (clips without a detectable face are dropped), cached as one .npz per dataset+spec (and
    detector precision: a bf16 gate prepares the same clips with the bf16 detector)."""
    key = cache_key(records, spec, detector_path, detector_precision)
    path = cache_dir / f"clips-{key}.npz" if cache_dir else None
    by_key = {r.key: r for r in records}
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            tensors = data["tensors"]  # read once: each data[...] access re-reads the file
        return [PreparedClip(by_key[m["key"]], tensors[i], m["apex"], m["coverage"], m["padded"])
                for i, m in enumerate(meta)]
    detector = OnnxDetector(detector_path, detector_precision)
    out = [c for c in (prepare_clip(r, detector, spec) for r in records) if c is not None]
    if path is not None and out:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = [{"key": c.record.key, "apex": c.apex, "coverage": c.coverage, "padded": c.padded} for c in out]
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, tensors=np.stack([c.tensor for c in out]), meta=json.dumps(meta))
        tmp.replace(path)
    return out
