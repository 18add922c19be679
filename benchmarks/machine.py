"""What machine a benchmark ran on, written beside its numbers."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engines.machine import usable_cpus


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import onnxruntime

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cpus": usable_cpus(),  # what the thread pools are sized for (a container's limit or cpuset)
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
    }


def write_report(out: Path, stem: str, result: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> None:
    """``<stem>.json`` (the numbers) and ``<stem>.md`` (the table) under ``out``; the table also to stdout."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(text)
    print(text)
