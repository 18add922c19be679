"""Is TensorRT usable here, and which flavour? Probes for TensorRT / TensorRT-RTX, cuda-python and a GPU.

The probes import lazily and never raise, so the CPU path starts on machines with none of them; tests inject
fake probes to check every branch. The tensorrt and cuda imports stay inside this package.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engines.tensorrt.flavour import TENSORRT, TENSORRT_RTX, Flavour, for_gpu, probe

log = logging.getLogger(__name__)

CudaProbe = Callable[[], tuple[bool, int] | tuple[bool, int, tuple[int, int] | None]]


@dataclass(frozen=True)
class Availability:
    tensorrt: str | None  # the chosen flavour's version, or None when none can serve this GPU
    cuda_python: bool
    gpus: int
    reason: str  # why TensorRT can or cannot be used, for logs and model metadata
    flavour: Flavour | None = None
    compute_capability: tuple[int, int] | None = None
    flavours: tuple[Flavour, ...] = ()

    @property
    def chosen(self) -> Flavour | None:
        """The flavour that serves this GPU (given only a version: TensorRT)."""
        return self.flavour or (Flavour(TENSORRT, self.tensorrt) if self.tensorrt else None)

    @property
    def tensorrt_usable(self) -> bool:
        return self.chosen is not None and self.cuda_python and self.gpus > 0


def probe_tensorrt() -> list[Flavour]:
    """Installed flavours, found without importing them (version ""): a CPU-only host never loads TensorRT."""
    found = []
    for name in (TENSORRT, TENSORRT_RTX):
        try:
            if name in sys.modules or importlib.util.find_spec(name) is not None:
                found.append(Flavour(name, ""))
        except (ImportError, ValueError):
            continue
    return found


def probe_cuda() -> tuple[bool, int, tuple[int, int] | None]:
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        return False, 0, None
    try:
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or int(count) == 0:
            return True, 0, None
        from engines.runtime.cuda import device_info

        return True, int(count), device_info(0)[1]
    except Exception as exc:
        log.warning("cuda-python is installed but unusable: %s", exc)
        return False, 0, None


def availability(tensorrt_probe: Callable[[], str | Sequence[Flavour] | None] = probe_tensorrt,
                 cuda_probe: CudaProbe = probe_cuda) -> Availability:
    found = tensorrt_probe()
    flavours = ([Flavour(TENSORRT, found)] if isinstance(found, str) else list(found or []))
    probed = cuda_probe()
    has_cuda, gpus = probed[0], probed[1]
    cc = probed[2] if len(probed) > 2 else None  # type: ignore[misc]
    chosen = for_gpu(flavours, cc) if gpus and has_cuda else None
    if chosen is not None and not chosen.version:  # only now, with a GPU to use it on, import it
        chosen = probe(chosen.name)
    if not flavours:
        reason = "tensorrt is not installed"
    elif not has_cuda:
        reason = "cuda-python (cuda.bindings) is not installed"
    elif gpus == 0:
        reason = "no CUDA GPU is visible"
    elif chosen is None:
        names = ", ".join(f.label() for f in flavours)
        reason = f"{names} cannot run engines on this GPU (compute capability {cc})"
    elif chosen.name == TENSORRT:
        reason = f"TensorRT {chosen.version} with {gpus} GPU(s)"
    else:
        reason = f"{chosen.label()} with {gpus} GPU(s) (compute capability {cc})"
    return Availability(chosen.version if chosen else None, has_cuda, gpus, reason, chosen, cc, tuple(flavours))
