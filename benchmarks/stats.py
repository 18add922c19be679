"""Latency summaries."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

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


def median_row(rows: Sequence[Mapping[str, Any]], throughput: str = "throughput") -> dict[str, float]:
    """Each numeric measure's median over repeated runs (rounds), and the range of the ``throughput`` field. The
    host's speed drifts within minutes, so a ratio is taken round by round and a cell is the median of rounds."""
    numeric = [k for k, v in rows[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    out = {k: float(statistics.median(float(r[k]) for r in rows)) for k in numeric}
    out[f"{throughput}_min"] = min(float(r[throughput]) for r in rows)
    out[f"{throughput}_max"] = max(float(r[throughput]) for r in rows)
    return out


def paired_ratios(ours: Sequence[Mapping[str, Any]], theirs: Sequence[Mapping[str, Any]], key: str
                  ) -> tuple[float, list[float]]:
    """``ours[key] / theirs[key]`` round by round (each pair measured back to back), and their median."""
    rounds = [float(a[key]) / float(b[key]) for a, b in zip(ours, theirs, strict=True)]
    return float(statistics.median(rounds)), rounds
