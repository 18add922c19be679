"""Batcher settings per model (Triton's ``dynamic_batching`` and ``instance_group``, as a dataclass)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 32
    """Largest batch executed at once; 1 turns batching off."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Sizes to aim for: when one can be formed, the largest such size runs at once."""
    max_queue_delay_us: int = 2000
    """How long the oldest request may be held hoping to fill a batch; applies only while the server is busy."""
    max_queue_size: int = 512
    """Requests waiting beyond this are refused at once (RESOURCE_EXHAUSTED); 0 means unbounded."""
    instances: int = 1
    """Engine instances (worker threads) executing batches concurrently."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise ValueError(
                    f"preferred batch size {size} must lie in [1, max_batch_size={self.max_batch_size}]"
                )
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.max_queue_size < 0:
            raise ValueError(f"max_queue_size must be >= 0, got {self.max_queue_size}")
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")

    def unbatched(self) -> BatcherConfig:
        """The same queue and instances with batching off (for baselines)."""
        return BatcherConfig(1, (), 0, self.max_queue_size, self.instances)
