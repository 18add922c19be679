"""The start-up shared by ``python -m engines.tensorrt.build`` and ``... .check``: common flags, logging, and
the refusal (exit 2, with the reason) where TensorRT cannot run."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from engines.repository import ModelRepository
from engines.tensorrt.availability import Availability, availability
from engines.tensorrt.cache import Device
from engines.tensorrt.flavour import Flavour, for_build_without_gpu, probe

log = logging.getLogger("engines.tensorrt")


@dataclass(frozen=True)
class EngineRun:
    args: argparse.Namespace
    repo: ModelRepository
    models: list[str]
    availability: Availability
    flavour: Flavour
    device: Device | None  # None: building ahead of time without a GPU (TensorRT-RTX)


def engine_cli(parser: argparse.ArgumentParser, argv: list[str] | None, what: str,
               build_only: bool = False) -> EngineRun | None:
    """Add the common flags, parse, set up logging and probe TensorRT; None (after logging why) if unusable.
    ``build_only``: without a usable GPU, fall back to TensorRT-RTX's ahead-of-time build if it is installed."""
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--models", nargs="*", help="default: every model in the repository")
    parser.add_argument("--precision", choices=["fp16", "fp32", "both"] if build_only else ["fp16", "fp32"],
                        default="fp16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    avail = availability()
    repo = ModelRepository(args.repository)
    models = args.models or repo.names()
    if avail.tensorrt_usable and avail.flavour is not None:
        from engines.runtime.cuda import device_info

        name, cc = device_info(0)
        return EngineRun(args, repo, models, avail, avail.flavour, Device(name, cc))
    aot = for_build_without_gpu(list(avail.flavours)) if build_only else None
    aot = probe(aot.name) if aot is not None else None
    if aot is not None:
        log.info("no usable GPU (%s): building %s engines ahead of time on the CPU", avail.reason, aot.label())
        return EngineRun(args, repo, models, avail, aot, None)
    log.error("cannot %s here: %s", what, avail.reason)
    return None
