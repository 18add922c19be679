"""Facts about the served models that both the exporter and the server need (no torch, no onnx imports)."""

from __future__ import annotations

from dataclasses import dataclass

DETECTOR = "retinaface"
LIVENESS_V2 = "minifasnet_v2"
LIVENESS_V1SE = "minifasnet_v1se"


@dataclass(frozen=True)
class DetectorSpec:
    """RetinaFace (Silent-Face release) pre/post-processing, from its deploy.prototxt and upstream code."""

    # Upstream resizes images of at least 192^2 px to (192*sqrt(W/H), 192/sqrt(W/H)) and runs the network at
    # exactly that size. Padding to a fixed canvas was measured to change the scores (the stride-32 map of a
    # 166x221 input is 7x6, so padding reaches every cell), so the input keeps dynamic height and width and
    # the batcher only batches requests of equal size (all 4:3 images resize to the same 166x221 or 221x166).
    target_side: int = 192
    max_side: int = 640  # small images (< 192^2 px) are not resized upstream; bound them (and the TensorRT profile)
    min_side: int = 32
    export_size: tuple[int, int] = (221, 166)  # (height, width) used for export and warm-up: a 3:4 portrait
    bgr_mean: tuple[float, float, float] = (104.0, 117.0, 123.0)
    # PriorBox heads: (step, min sizes); order matches the concatenation in the network.
    priors: tuple[tuple[int, tuple[float, ...]], ...] = ((8, (16.0, 32.0)), (16, (64.0, 128.0)), (32, (256.0, 512.0)))
    variances: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    confidence_threshold: float = 0.1
    nms_threshold: float = 0.3
    nms_top_k: int = 400
    keep_top_k: int = 200

    def dynamic_axes(self) -> dict[int, tuple[int, int]]:
        """(min, max) of the input's dynamic height (axis 2) and width (axis 3): what every runtime must accept,
        so the TensorRT profile is built from it and requests outside it are refused before they reach an engine."""
        return {2: (self.min_side, self.max_side), 3: (self.min_side, self.max_side)}


@dataclass(frozen=True)
class LivenessSpec:
    """A MiniFASNet classifier: its crop scale and input size (both encoded in the released file name)."""

    name: str
    weights: str
    variant: str
    scale: float
    height: int = 80
    width: int = 80
    live_class: int = 1


DETECTOR_SPEC = DetectorSpec()
LIVENESS_SPECS: tuple[LivenessSpec, ...] = (
    LivenessSpec(LIVENESS_V2, "silent-face/2.7_80x80_MiniFASNetV2.pth", "v2", 2.7),
    LivenessSpec(LIVENESS_V1SE, "silent-face/4_0_0_80x80_MiniFASNetV1SE.pth", "v1se", 4.0),
)
