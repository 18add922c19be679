"""One declaration per served model, read by the exporter, the server and the engine builders.

Like PyTriton's ``bind(...)``: a model's name, its input and output tensors, its batching defaults, the shape of
a realistic warm-up item, the ranges of its dynamic non-batch axes (which feed both the TensorRT optimisation
profile and request validation) and the runtimes allowed to serve it. No other module special-cases a model by
name: code that needs a fact about a model asks its declaration.

The SlowFast ensemble members are trained, so their names and clip shapes come from the repository's metadata
(``kind: slowfast_clip``); every other model is declared here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from engines.batching import BatcherConfig
from engines.repository import ModelMetadata, TensorMeta
from engines.specs import DETECTOR, DETECTOR_SPEC, LIVENESS_SPECS, LivenessSpec

ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
TENSORRT = "tensorrt"
RUNTIMES = (ONNXRUNTIME, OPENVINO, TENSORRT)
CPU_RUNTIMES = (ONNXRUNTIME, OPENVINO)
FP32, BF16, INT8 = "fp32", "bf16", "int8"
CPU_PRECISIONS = (FP32, BF16, INT8)
# The pipelines whose parity gates a reduced-precision variant must pass (engines.liveness_gate,
# engines.identify.int8_gate): a model serves every pipeline that uses it, so every one of them must agree.
LIVENESS, IDENTIFICATION = "liveness", "identification"
SLOWFAST_KIND = "slowfast_clip"

AxisRange = tuple[int, int, int]  # (min, opt, max) of one dynamic axis


@dataclass(frozen=True)
class ModelDeclaration:
    name: str
    kind: str
    """What the model is ("retinaface_upstream_resize", "minifasnet_crop", "slowfast_clip" or "generic"), as its
    metadata records it."""
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    batching: BatcherConfig
    """Batcher defaults, measured on 2 CPU cores (benchmarks/results); a server configuration may override them."""
    warmup_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Per input, one item's shape (no batch axis) for warm-up and engine timing; dynamic axes resolved."""
    dynamic_axes: Mapping[str, Mapping[int, AxisRange]] = field(default_factory=dict)
    """Per input, the (min, opt, max) of each dynamic non-batch axis: what every runtime must accept."""
    runtimes: tuple[str, ...] = RUNTIMES
    """Runtimes allowed to serve the model, in order of preference when available."""
    cpu_precisions: tuple[str, ...] = (FP32,)
    """Precisions the CPU runtimes may serve it in: FP32 always; bf16 and INT8 only where listed here, and then
    only where the variant passed the parity gate of every pipeline in ``pipelines``."""
    pipelines: tuple[str, ...] = ()
    """The pipelines that use the model, whose parity gates a reduced-precision variant must pass."""

    def __post_init__(self) -> None:
        if FP32 not in self.cpu_precisions or not set(self.cpu_precisions) <= set(CPU_PRECISIONS):
            raise ValueError(f"{self.name}: cpu_precisions must include {FP32!r} and be among {CPU_PRECISIONS}")

    def input_bounds(self, name: str) -> dict[int, tuple[int, int]]:
        """(min, max) per dynamic non-batch axis of input ``name``: requests outside are refused up front."""
        return {axis: (lo, hi) for axis, (lo, _, hi) in self.dynamic_axes.get(name, {}).items()}

    def warmup_item(self) -> dict[str, np.ndarray]:
        """Zeros of a realistic shape per input (no batch axis): the one warm-up and timing input builder."""
        item: dict[str, np.ndarray] = {}
        for t in self.inputs:
            shape = self.warmup_shapes.get(t.name) or tuple(d if d > 0 else 1 for d in t.shape[1:])
            item[t.name] = np.zeros(shape, dtype=t.dtype)
        return item

    def warmup_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        return {k: np.broadcast_to(v, (batch_size, *v.shape)).copy() for k, v in self.warmup_item().items()}


def _detector() -> ModelDeclaration:
    height, width = DETECTOR_SPEC.export_size
    axes = DETECTOR_SPEC.dynamic_axes()
    opt = {2: height, 3: width}  # the 3:4 portrait every phone photo becomes
    return ModelDeclaration(
        name=DETECTOR, kind="retinaface_upstream_resize",
        inputs=(TensorMeta("input", "float32", (-1, 3, -1, -1)),),
        outputs=(TensorMeta("loc", "float32", (-1, -1, 4)), TensorMeta("conf", "float32", (-1, -1, 2))),
        # Heavier than the classifiers and gains less beyond 8; two instances overlap its pre/post-processing.
        batching=BatcherConfig(max_batch_size=16, max_queue_delay_us=1000, max_queue_size=1024, instances=2),
        warmup_shapes={"input": (3, height, width)},
        dynamic_axes={"input": {axis: (lo, opt[axis], hi) for axis, (lo, hi) in axes.items()}},
        # No INT8 variant: no gate checks detection boxes after quantisation. bf16 behind both pipelines' gates.
        cpu_precisions=(FP32, BF16), pipelines=(LIVENESS, IDENTIFICATION),
    )


def _liveness(spec: LivenessSpec) -> ModelDeclaration:
    return ModelDeclaration(
        name=spec.name, kind="minifasnet_crop",
        inputs=(TensorMeta("input", "float32", (-1, 3, spec.height, spec.width)),),
        outputs=(TensorMeta("logits", "float32", (-1, 3)),),
        # Tiny classifiers: large batches amortise the per-call overhead.
        batching=BatcherConfig(max_batch_size=32, max_queue_delay_us=1000, max_queue_size=1024, instances=1),
        cpu_precisions=CPU_PRECISIONS, pipelines=(LIVENESS,),
    )


SLOWFAST_BATCHING = BatcherConfig(max_batch_size=8, max_queue_delay_us=2000, max_queue_size=256, instances=1)


def slowfast_member(name: str, clip_len: int, size: int, embed_dim: int) -> ModelDeclaration:
    """A SlowFast ensemble member: one clip [3, T, S, S] in, one L2-normalised embedding out."""
    return ModelDeclaration(
        name=name, kind=SLOWFAST_KIND,
        inputs=(TensorMeta("clip", "float32", (-1, 3, clip_len, size, size)),),
        outputs=(TensorMeta("embedding", "float32", (-1, embed_dim)),),
        batching=SLOWFAST_BATCHING, cpu_precisions=CPU_PRECISIONS, pipelines=(IDENTIFICATION,),
    )


DECLARATIONS: dict[str, ModelDeclaration] = {
    d.name: d for d in (_detector(), *(_liveness(s) for s in LIVENESS_SPECS))
}


def declaration_for(meta: ModelMetadata) -> ModelDeclaration:
    """The declaration of a model in the repository: declared above, a trained SlowFast member (by the kind its
    metadata records), or a generic one read from its metadata (tensors as exported, default batching)."""
    if meta.name in DECLARATIONS:
        return DECLARATIONS[meta.name]
    kind = str(meta.preprocessing.get("kind", "generic"))
    if kind == SLOWFAST_KIND:
        return ModelDeclaration(name=meta.name, kind=kind, inputs=meta.inputs, outputs=meta.outputs,
                                batching=SLOWFAST_BATCHING, cpu_precisions=CPU_PRECISIONS,
                                pipelines=(IDENTIFICATION,))
    # A generic model has no gate to pass: FP32 only.
    return ModelDeclaration(name=meta.name, kind=kind, inputs=meta.inputs, outputs=meta.outputs,
                            batching=BatcherConfig())
