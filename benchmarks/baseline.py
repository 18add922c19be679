"""The configuration before issue 14, which the CPU benchmarks measure side by side as their baseline: ONNX
Runtime for every model, every clip frame decoded whole, one engine thread per ensemble member and two decoding
threads per core. Each is a setting, so the baseline is today's server with these settings forced."""

from __future__ import annotations

import os

CPU_WORKERS = max(2, min(8, (os.cpu_count() or 2) * 2))


def baseline_toml() -> str:
    return ("[server]\nclip_reduced_decode = false\n"
            f"cpu_workers = {CPU_WORKERS}\n"
            '[runtime]\ncpu_runtime = "onnxruntime"\ngroup_threads = 1\n')
