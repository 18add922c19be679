"""Is TensorRT usable here? Probes for TensorRT, cuda-python and a GPU.

The probes import lazily and never raise, so the CPU path starts on machines with neither library; tests
inject fake probes to check every branch. The tensorrt and cuda imports stay inside this package.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Availability:
    tensorrt: str | None  # version, or None when not importable
    cuda_python: bool
    gpus: int
    reason: str  # why TensorRT can or cannot be used, for logs and model metadata

    @property
    def tensorrt_usable(self) -> bool:
        return self.tensorrt is not None and self.cuda_python and self.gpus > 0


def probe_tensorrt() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception as exc:  # a broken install must not stop the CPU path
        log.warning("tensorrt is installed but failed to import: %s", exc)
        return None


def probe_cuda() -> tuple[bool, int]:
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        return False, 0
    try:
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
        return True, int(count) if int(err) == 0 else 0
    except Exception as exc:
        log.warning("cuda-python is installed but unusable: %s", exc)
        return False, 0


def availability(tensorrt_probe: Callable[[], str | None] = probe_tensorrt,
                 cuda_probe: Callable[[], tuple[bool, int]] = probe_cuda) -> Availability:
    version = tensorrt_probe()
    has_cuda, gpus = cuda_probe()
    if version is None:
        reason = "tensorrt is not installed"
    elif not has_cuda:
        reason = "cuda-python (cuda.bindings) is not installed"
    elif gpus == 0:
        reason = "no CUDA GPU is visible"
    else:
        reason = f"TensorRT {version} with {gpus} GPU(s)"
    return Availability(version, has_cuda, gpus, reason)
