"""The start-up shared by ``python -m engines.tensorrt.build`` and ``... .check``: common flags, logging, and
the refusal (exit 2, with the reason) where TensorRT cannot run."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from engines.repository import ModelRepository
from engines.tensorrt.availability import Availability, availability

log = logging.getLogger("engines.tensorrt")


@dataclass(frozen=True)
class EngineRun:
    args: argparse.Namespace
    repo: ModelRepository
    models: list[str]
    availability: Availability


def engine_cli(parser: argparse.ArgumentParser, argv: list[str] | None, what: str) -> EngineRun | None:
    """Add the common flags, parse, set up logging and probe TensorRT; None (after logging why) if unusable."""
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--models", nargs="*", help="default: every model in the repository")
    parser.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    avail = availability()
    if not avail.tensorrt_usable:
        log.error("cannot %s here: %s", what, avail.reason)
        return None
    repo = ModelRepository(args.repository)
    return EngineRun(args, repo, args.models or repo.names(), avail)
