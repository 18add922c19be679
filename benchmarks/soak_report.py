"""What ``benchmarks.soak`` found: growth of the server's memory, threads and descriptors fitted after the warm-up,
and the calls by kind and status."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# What each sampled quantity is shown as, and the unit it is divided by.
# The C heap's two counts come from the server's metrics (glibc's mallinfo2, server process only): a leak raises
# the bytes in use; an allocator keeping freed memory raises the resident memory through the free bytes instead.
QUANTITIES: dict[str, tuple[str, float]] = {"rss": ("resident memory, MiB", 2**20),
                                            "heap_in_use": ("C heap in use (server process), MiB", 2**20),
                                            "heap_free": ("C heap free, kept by the allocator, MiB", 2**20),
                                            "working_set": ("working set of the server's control group, MiB",
                                                            2**20),
                                            "threads": ("threads", 1.0), "fds": ("open descriptors", 1.0),
                                            "audit_bytes": ("audit log, MiB", 2**20)}


def slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of y over x (0 with fewer than two distinct x)."""
    xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(xs) < 2 or np.ptp(xs) == 0:
        return 0.0
    return float(np.polyfit(xs, ys, 1)[0])


def summarize_samples(samples: Sequence[dict[str, Any]], warmup: float) -> dict[str, dict[str, float]]:
    """Per quantity, over the samples after the first ``warmup`` share of the run: first, last, min and max, and
    the fitted growth per minute and per 10,000 calls (in the quantity's unit)."""
    if not samples:
        return {}
    start = samples[-1]["t_s"] * warmup
    kept = [s for s in samples if s["t_s"] >= start] or list(samples[-1:])
    t_min = [s["t_s"] / 60 for s in kept]
    calls = [s["calls"] / 1e4 for s in kept]
    out: dict[str, dict[str, float]] = {}
    for key, (_, unit) in QUANTITIES.items():
        if any(key not in s for s in kept):  # (no heap counts where the server's C library is not glibc)
            continue
        v = [s[key] / unit for s in kept]
        # Each minute's lowest value: big requests in flight swing the memory by hundreds of MiB from one sample
        # to the next, and what a leak raises is the floor they swing from.
        floors: dict[int, tuple[float, float]] = {}
        counts: dict[int, int] = {}
        for t, x in zip(t_min, v, strict=True):
            floors[int(t)] = min(floors.get(int(t), (t, x)), (t, x), key=lambda p: p[1])
            counts[int(t)] = counts.get(int(t), 0) + 1
        # A last minute cut short by the run's end has too few samples for its lowest to be a floor (one sample
        # with big requests in flight raised a 5-minute run's fit of the heap in use from +2.7 to +11.9 MiB a minute).
        last = max(counts)
        if len(counts) > 2 and counts[last] < max(counts.values()) / 2:
            del floors[last]
        out[key] = {"first": v[0], "last": v[-1], "min": min(v), "max": max(v), "per_minute": slope(t_min, v),
                    "per_10k_calls": slope(calls, v), "from_s": kept[0]["t_s"], "samples": len(v),
                    "floor_per_minute": slope([t for t, _ in floors.values()], [x for _, x in floors.values()])}
    return out


def markdown(r: dict[str, Any]) -> str:
    m, g = r["machine"], r["growth"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['date']}. One server (`--workers {r['workers']}`), "
             f"{r['concurrency']} closed-loop workers, {r['wall_s']:.0f} s, **{r['calls']} calls** "
             f"({r['calls'] / r['wall_s']:.1f} a second), {r['corpus_cases']} bad-input cases in the mix.", "",
             f"Growth after the first {r['warmup']:.0%} of the run (least squares over "
             f"{g['rss']['samples'] if g else 0} samples):", "",
             "| quantity | at the fit's start | at the end | min - max | per minute | per 10,000 calls | each "
             "minute's lowest, per minute |", "|---|---|---|---|---|---|---|"]
    for key, (name, _) in QUANTITIES.items():
        q = g.get(key)
        if q:
            lines.append(f"| {name} | {q['first']:.1f} | {q['last']:.1f} | {q['min']:.1f} - {q['max']:.1f} | "
                         f"{q['per_minute']:+.3f} | {q['per_10k_calls']:+.3f} | {q['floor_per_minute']:+.3f} |")
    first = r["samples"][0]
    lines += ["", f"At the first sample: RSS {first['rss'] / 2**20:.1f} MiB, {first['threads']} threads, "
              f"{first['fds']} descriptors.", "",
              f"Unexpected statuses: **{r['unexpected_calls']}**; wrong answers: **{r['wrong_answers']}**; "
              f"a correct answer after the run: **{'yes' if r.get('answers_after') else 'no'}**.", ""]
    for what, n in r["unexpected"].items():
        lines.append(f"- {n} x {what}")
    lines += ["", "| kind | status | calls |", "|---|---|---|"]
    for key, n in r["by_kind"].items():
        kind, code = key.rsplit(" ", 1)
        lines.append(f"| {kind} | {code} | {n} |")
    return "\n".join(lines) + "\n"
