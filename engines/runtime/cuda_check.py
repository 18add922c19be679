"""``python -m engines.runtime.cuda_check --out FILE``: what the cuda-python layer under the TensorRT runtime does on
this GPU: pinned host <-> device copy bandwidth on a non-blocking stream, and the launch cost of a captured CUDA
graph against issuing the same copies one by one. Writes JSON (and prints it)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def measure(sizes_mib: tuple[int, ...] = (1, 16, 256), repeats: int = 20) -> dict[str, Any]:
    from engines.runtime import cuda

    name, cc = cuda.device_info(0)
    stream = cuda.Stream()
    out: dict[str, Any] = {"gpu": name, "compute_capability": list(cc), "copies": []}
    for mib in sizes_mib:
        n = mib << 20
        host, dev = cuda.PinnedBuffer(n), cuda.DeviceBuffer(n)
        host.view(np.dtype(np.uint8), (n,))[:] = 1
        for direction in ("h2d", "d2h"):
            copy = stream.h2d if direction == "h2d" else stream.d2h
            args = (dev.ptr, host.ptr, n) if direction == "h2d" else (host.ptr, dev.ptr, n)
            copy(*args)
            stream.synchronize()
            t0 = time.perf_counter()
            for _ in range(repeats):
                copy(*args)
            stream.synchronize()
            dt = (time.perf_counter() - t0) / repeats
            out["copies"].append({"direction": direction, "mib": mib, "gb_per_s": n / dt / 1e9, "ms": dt * 1e3})
        host.free()
        dev.free()
    # 16 small copies (what a batch's inputs and outputs look like), as a graph and one by one.
    host, dev = cuda.PinnedBuffer(16 * 4096), cuda.DeviceBuffer(16 * 4096)

    def issue() -> None:
        for i in range(16):
            stream.h2d(dev.ptr + i * 4096, host.ptr + i * 4096, 4096)

    cuda.Graph.begin(stream)
    issue()
    graph = cuda.Graph.end(stream)
    timings = {}
    for label, run in (("plain", issue), ("graph", lambda: graph.launch(stream))):
        run()
        stream.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            run()
        stream.synchronize()
        timings[label] = (time.perf_counter() - t0) / 200 * 1e6
    out["sixteen_4k_copies_us"] = timings
    graph.destroy()
    host.free()
    dev.free()
    stream.destroy()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    result = measure()
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
