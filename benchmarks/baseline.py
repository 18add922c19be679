"""The two server configurations the CPU benchmarks compare side by side, as settings files.

The baseline is the configuration before issue 14: ONNX Runtime for every model, every clip frame decoded whole,
one engine thread per ensemble member and two decoding threads per core. Each is a setting, so the baseline is
today's server with these settings forced. The measured configuration is today's defaults with a chosen CPU
runtime.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from engines.machine import usable_cpus
from server.config import ServerConfig, load_config

CPU_WORKERS = max(2, min(8, usable_cpus() * 2))


def baseline_toml() -> str:
    return ("[server]\nclip_reduced_decode = false\n"
            f"cpu_workers = {CPU_WORKERS}\n"
            '[runtime]\ncpu_runtime = "onnxruntime"\ngroup_threads = 1\n')


def measured_toml(runtime: str) -> str:
    return f'[server]\nclip_reduced_decode = true\n[runtime]\ncpu_runtime = "{runtime}"\n'


def server_config(settings_toml: str, repository: Path) -> ServerConfig:
    """The server's configuration from a settings file's text, read as ``--config`` reads it (for pipelines
    measured in process)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "settings.toml"
        path.write_text(settings_toml)
        return load_config(path, model_repository=repository)
