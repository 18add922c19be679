"""GPU utilisation and memory for the metrics endpoint, through NVML (``nvidia-ml-py``), when a GPU is present.

Collected at scrape time; on a machine without an NVIDIA driver the collector yields nothing and costs nothing.
Labels: the GPU's index and model name (from the driver, bounded), never anything a caller sent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


def nvml() -> Any | None:
    """The initialised pynvml module, or None where there is no NVML (no package, no driver, no GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml if pynvml.nvmlDeviceGetCount() > 0 else None
    except Exception:  # no driver: the CPU path
        return None


class GpuCollector(Collector):
    def __init__(self, lib: Any | None = None) -> None:
        self._nvml = lib if lib is not None else nvml()

    @property
    def active(self) -> bool:
        return self._nvml is not None

    def collect(self) -> Iterable[Any]:
        if self._nvml is None:
            return
        n = self._nvml
        util = GaugeMetricFamily("facegate_gpu_utilization_ratio", "GPU busy fraction over the last sample period",
                                 labels=["gpu", "name"])
        used = GaugeMetricFamily("facegate_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu", "name"])
        total = GaugeMetricFamily("facegate_gpu_memory_total_bytes", "GPU memory", labels=["gpu", "name"])
        try:
            for i in range(n.nvmlDeviceGetCount()):
                h = n.nvmlDeviceGetHandleByIndex(i)
                name = n.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else str(name)
                rates = n.nvmlDeviceGetUtilizationRates(h)
                mem = n.nvmlDeviceGetMemoryInfo(h)
                util.add_metric([str(i), name], rates.gpu / 100.0)
                used.add_metric([str(i), name], float(mem.used))
                total.add_metric([str(i), name], float(mem.total))
        except Exception as exc:  # a driver hiccup must not break the scrape of everything else
            log.warning("NVML read failed: %s", exc)
            return
        yield from (util, used, total)
