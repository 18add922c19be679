"""Latency summaries."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def summarize(latencies_s: Sequence[float], wall_s: float) -> dict[str, float]:
    """Throughput and latency percentiles (ms) of completed requests over a measured window."""
    if not latencies_s:
        return {"count": 0, "throughput_rps": 0.0}
    a = np.asarray(latencies_s) * 1e3
    return {
        "count": int(a.size),
        "throughput_rps": float(a.size / wall_s) if wall_s > 0 else 0.0,
        "mean_ms": float(a.mean()),
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p95_ms": float(np.percentile(a, 95)),
        "p99_ms": float(np.percentile(a, 99)),
        "max_ms": float(a.max()),
    }
