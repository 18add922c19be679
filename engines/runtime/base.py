"""The runtime interface every engine implements, whatever executes it (ONNX Runtime, TensorRT, a fake).

A ``Model`` is loaded once; ``new_instance()`` gives an execution instance that one worker thread owns (an
ONNX Runtime session may be shared, a TensorRT execution context may not). ``infer`` takes and returns whole
batches keyed by tensor name, axis 0 being the batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # -1 marks a dynamic axis; axis 0 is the batch


@dataclass(frozen=True)
class InferTimings:
    """Where one execution spent its time, in nanoseconds (Triton's compute input / infer / output split)."""

    input_ns: int
    infer_ns: int
    output_ns: int


class EngineInstance(ABC):
    @abstractmethod
    def infer(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], InferTimings]:
        """Run one batch. Called from one worker thread at a time per instance."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the instance holds."""


class Model(ABC):
    name: str
    version: str
    runtime: str  # e.g. "onnxruntime:CPUExecutionProvider", "tensorrt"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int

    @abstractmethod
    def new_instance(self) -> EngineInstance:
        """An execution instance for one worker thread."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model."""


class EngineError(RuntimeError):
    """An engine failed to execute a batch."""
