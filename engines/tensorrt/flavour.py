"""The two TensorRT flavours behind one builder and one runtime: TensorRT 10.x/11.x (``tensorrt``) and TensorRT
for RTX (``tensorrt_rtx``).

They share the API the project uses (ONNX parser, strongly typed networks, optimisation profiles,
``build_serialized_network``, ``deserialize_cuda_engine``, ``execute_async_v3``) and differ where it matters:
RTX builds ahead of time on the CPU for a list of target compute capabilities (no GPU needed to build), its
engines run only on those (not on Hopper), and it keeps a runtime cache of its just-in-time kernels. Imports
are lazy: a CPU server never imports either.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

TENSORRT = "tensorrt"
TENSORRT_RTX = "tensorrt_rtx"
# TensorRT-RTX 1.x targets (its ComputeCapability enum); no SM90: Hopper needs TensorRT 10/11.
RTX_TARGETS: dict[str, tuple[int, int]] = {"SM75": (7, 5), "SM80": (8, 0), "SM86": (8, 6), "SM89": (8, 9),
                                           "SM120": (12, 0), "SM121": (12, 1)}
# Not SM75 by default: TensorRT-RTX 1.7 refuses FP32 GEMMs for Turing ("Cannot compile operation 'node_Gemm_...'
# for Turing (SM75): FP32 GEMM is not supported"), and every model here has one (the FP32 engines, and the FP32
# I/O around the FP16 variants). Ampere, Ada and Blackwell cover A100/A10/L4/L40 and RTX 30/40/50.
DEFAULT_RTX_TARGETS = ("SM80", "SM86", "SM89", "SM120")


@dataclass(frozen=True)
class Flavour:
    name: str  # TENSORRT | TENSORRT_RTX
    version: str

    @property
    def rtx(self) -> bool:
        return self.name == TENSORRT_RTX

    def load(self) -> Any:
        return importlib.import_module(self.name)

    def runs_on(self, cc: tuple[int, int] | None) -> bool:
        """Whether this flavour's engines run on a GPU of compute capability ``cc`` (None: unknown)."""
        if self.rtx:
            return cc is not None and cc in RTX_TARGETS.values()
        return cc is None or cc >= (7, 5)  # TensorRT 10 supports Turing and newer

    def label(self) -> str:
        name = "TensorRT-RTX" if self.rtx else "TensorRT"
        return f"{name} {self.version}" if self.version else name


def target_for(cc: tuple[int, int]) -> str | None:
    return next((name for name, value in RTX_TARGETS.items() if value == cc), None)


def probe(name: str) -> Flavour | None:
    """The installed flavour ``name`` with its version, or None; never raises (a broken install must not stop
    the CPU path)."""
    try:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            return None
        module = importlib.import_module(name)
        return Flavour(name, str(module.__version__))
    except Exception as exc:
        log.warning("%s is installed but failed to import: %s", name, exc)
        return None


def installed() -> list[Flavour]:
    """Installed flavours, TensorRT first (it supports every GPU RTX does, and Hopper)."""
    return [f for f in (probe(TENSORRT), probe(TENSORRT_RTX)) if f is not None]


def for_gpu(flavours: list[Flavour], cc: tuple[int, int] | None) -> Flavour | None:
    """TensorRT on any GPU it supports, TensorRT-RTX on the GPUs it supports."""
    return next((f for f in flavours if f.runs_on(cc)), None)


def for_build_without_gpu(flavours: list[Flavour]) -> Flavour | None:
    """Only TensorRT-RTX builds without a GPU (ahead-of-time for its target list)."""
    return next((f for f in flavours if f.rtx), None)
