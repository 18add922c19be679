"""Batch buckets for CUDA graphs: a graph bakes in its shapes, so batches are padded up to the next bucket."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

import numpy as np


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds n items."""
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"batch of {n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def pad_batch(inputs: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pad every input along axis 0 to ``size`` by repeating the last item (real data, so no NaN/Inf paths)."""
    out = {}
    for name, a in inputs.items():
        n = a.shape[0]
        if n > size:
            raise ValueError(f"{name}: batch {n} is larger than the bucket {size}")
        out[name] = a if n == size else np.concatenate([a, np.repeat(a[-1:], size - n, axis=0)])
    return out


def unpad(outputs: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in outputs.items()}
