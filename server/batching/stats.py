"""Per-model statistics, cumulative since start (the shape of Triton's ModelStatistics)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    @property
    def mean_ms(self) -> float:
        return self.ns / self.count / 1e6 if self.count else 0.0


@dataclass
class BatchStats:
    executions: int = 0
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    """Updated only from the event loop thread, so no locks are needed."""

    success: Duration = field(default_factory=Duration)  # request time from enqueue to result
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    rejected_queue_full: int = 0
    expired_before_run: int = 0
    inference_count: int = 0  # requests executed
    execution_count: int = 0  # batches executed
    batches: dict[int, BatchStats] = field(default_factory=dict)
    last_inference_ms: int = 0  # wall clock, ms since the epoch

    def record_batch(self, size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.inference_count += size
        self.execution_count += 1
        # Like Triton: per-request compute durations count each request in the batch once.
        self.compute_input.add(input_ns * size, size)
        self.compute_infer.add(infer_ns * size, size)
        self.compute_output.add(output_ns * size, size)
        b = self.batches.setdefault(size, BatchStats())
        b.executions += 1
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)
        self.last_inference_ms = int(time.time() * 1000)

    @property
    def average_batch(self) -> float:
        return self.inference_count / self.execution_count if self.execution_count else 0.0

    def histogram(self) -> dict[int, int]:
        return {size: b.executions for size, b in sorted(self.batches.items())}
