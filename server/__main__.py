"""``python -m server``: start facegate (CPU default; a GPU runtime where one is installed)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from pathlib import Path

from engines.repository import ModelNotFoundError
from server.app import serve
from server.config import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="facegate-server", description=__doc__)
    p.add_argument("--config", type=Path, help="TOML settings file (see README)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--model-repository", type=Path)
    p.add_argument("--no-batching", action="store_true", help="run every request alone (baseline)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument("--cpu-only", action="store_true", help="never use a GPU runtime")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(
            args.config, host=args.host, port=args.port, model_repository=args.model_repository,
            batching_enabled=False if args.no_batching else None, tls_cert=args.tls_cert, tls_key=args.tls_key,
        )
        if args.cpu_only:
            config = replace(config, runtime=replace(config.runtime, prefer_gpu=False))
    except (ValueError, OSError) as exc:
        logging.getLogger("server").error("bad configuration: %s", exc)
        return 2
    try:
        asyncio.run(serve(config))
    except ModelNotFoundError as exc:
        logging.getLogger("server").error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
