"""A fake engine for batcher tests (never what the server runs): records batches, optional delay/failure."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping

import numpy as np

from engines.runtime.base import EngineInstance, InferTimings, Model, TensorSpec


class FakeModel(Model):
    """y = x * 2 + instance id marker; records the batch sizes and the first value of each item it ran."""

    def __init__(self, delay_s: float = 0.0, max_batch_size: int = 64, fail: bool = False,
                 meet: int = 0) -> None:
        """``meet`` > 1: each call waits (up to 5 s) until that many calls are inside the engine at once, so calls the
        batcher started together are seen together however late a loaded machine schedules their threads."""
        self.name = "fake"
        self.version = "1"
        self.runtime = "fake"
        self.inputs = (TensorSpec("x", np.dtype(np.float32), (-1, 2)),)
        self.outputs = (TensorSpec("y", np.dtype(np.float32), (-1, 2)),)
        self.max_batch_size = max_batch_size
        self.delay_s = delay_s
        self.fail = fail
        self.batches: list[int] = []
        self.seen: list[float] = []
        self.concurrent = 0
        self.max_concurrent = 0
        self._lock = threading.Lock()
        self._meeting = threading.Barrier(meet) if meet > 1 else None
        self.closed = 0

    def new_instance(self) -> EngineInstance:
        return _FakeInstance(self)


class _FakeInstance(EngineInstance):
    def __init__(self, model: FakeModel) -> None:
        self.model = model

    def infer(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], InferTimings]:
        m = self.model
        with m._lock:
            m.concurrent += 1
            m.max_concurrent = max(m.max_concurrent, m.concurrent)
            m.batches.append(int(inputs["x"].shape[0]))
            m.seen.extend(float(v) for v in inputs["x"][:, 0])
        try:
            if m._meeting is not None:
                # Broken: the others never came, so the calls ran one after another (max_concurrent shows it).
                with contextlib.suppress(threading.BrokenBarrierError):
                    m._meeting.wait(5.0)
            if m.delay_s:
                time.sleep(m.delay_s)
            if m.fail:
                raise RuntimeError("engine exploded")
            return {"y": inputs["x"] * 2}, InferTimings(0, 1000, 0)
        finally:
            with m._lock:
                m.concurrent -= 1

    def close(self) -> None:
        self.model.closed += 1
