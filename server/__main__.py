"""``python -m server``: start facegate (CPU default; a GPU runtime where one is installed)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from engines.repository import ModelNotFoundError
from server.app import serve
from server.auth.callers import CredentialFilesError
from server.config import ServerConfig, load_config
from server.gallery.migrations import SchemaError
from server.workers import for_worker, supervise, worker_index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="facegate-server", description=__doc__)
    p.add_argument("--config", type=Path, help="TOML settings file (see README)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--model-repository", type=Path)
    p.add_argument("--no-batching", action="store_true", help="run every request alone (baseline)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument("--tls-server-name", action="append",
                   help="a DNS name or IP address clients dial, which the certificate must name (repeatable)")
    p.add_argument("--tls-trust-roots", type=Path,
                   help="PEM roots clients trust: the served chain must verify up to one of them")
    p.add_argument("--cpu-only", action="store_true", help="never use a GPU runtime")
    p.add_argument("--client-ca", type=Path, help="PEM CA: require client certificates signed by it (mutual TLS)")
    p.add_argument("--token-file", type=Path,
                   help="file of bearer tokens, one a line (a mounted secret); its caller gets --token-scopes")
    p.add_argument("--token-scopes", help="comma-separated scopes of the --token-file caller (default: all)")
    p.add_argument("--token-max-in-flight", type=int,
                   help="calls the --token-file caller may have in flight at once (default 0: no own limit)")
    p.add_argument("--insecure-public", action="store_true",
                   help="allow a non-loopback address without authentication (never do this on a shared network)")
    p.add_argument("--audit-log", help="audit log file (JSON lines, rotated); '-' for stderr")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 8002; 0: off)")
    p.add_argument("--health-port", type=int,
                   help="a plaintext port serving health checks alone, for probes that cannot speak TLS (0: none)")
    p.add_argument("--gallery-url", help="sqlite:///PATH or postgresql://USER@HOST:PORT/DB (default: "
                   "$FACEGATE_GALLERY_URL, else the configured SQLite file)")
    p.add_argument("--workers", type=int, help="serving processes sharing the port (default 1; see README)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGHUP reloads the credentials once serving; before that (loading the models) it must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    index = worker_index()

    def build() -> ServerConfig:
        """The settings from the file and the command line; read again on a credentials reload."""
        auth = {"client_ca": args.client_ca, "token_file": args.token_file,
                "token_file_scopes": tuple(args.token_scopes.split(",")) if args.token_scopes else None,
                "token_file_max_in_flight": args.token_max_in_flight,
                "insecure_public": True if args.insecure_public else None}
        config = load_config(
            args.config, auth, gallery_url=args.gallery_url or os.environ.get("FACEGATE_GALLERY_URL") or None,
            host=args.host, metrics_port=args.metrics_port, health_port=args.health_port, port=args.port,
            model_repository=args.model_repository,
            batching_enabled=False if args.no_batching else None, tls_cert=args.tls_cert, tls_key=args.tls_key,
            tls_server_names=tuple(args.tls_server_name) if args.tls_server_name else None,
            tls_trust_roots=args.tls_trust_roots,
            workers=args.workers,
        )
        if args.cpu_only:
            config = replace(config, runtime=replace(config.runtime, prefer_gpu=False))
        if args.audit_log:
            config = replace(config, audit=replace(config.audit,
                                                   path=None if args.audit_log == "-" else Path(args.audit_log)))
        return for_worker(config, index) if index is not None else config

    try:
        config = build()
    except (ValueError, OSError) as exc:
        logging.getLogger("server").error("bad configuration: %s", exc)
        return 2
    if index is None and config.workers > 1:
        return supervise(list(argv if argv is not None else sys.argv[1:]), config)
    try:
        # Past the first, a worker binds only once its models are warm: the kernel hands it connections as soon
        # as it listens, and the first worker already answers health checks (NOT_SERVING until it is warm).
        asyncio.run(serve(config, bind_after_load=bool(index), load=build, config_path=args.config))
    except (ModelNotFoundError, ConnectionError, SchemaError, CredentialFilesError) as exc:  # named, without secrets
        logging.getLogger("server").error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
