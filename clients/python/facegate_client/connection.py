"""Connection flags shared by the command lines: target, deadline, bearer token, TLS and client certificates."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from facegate_client.client import FacegateClient, tls_credentials

TOKEN_ENV = "FACEGATE_TOKEN"  # noqa: S105 - the variable name, not a secret


def add_connection_args(p: argparse.ArgumentParser, timeout_s: float) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="server address (default %(default)s)")
    p.add_argument("--timeout", type=float, default=timeout_s, help="deadline per call in seconds")
    p.add_argument("--token-file", type=Path, help=f"file with a bearer token (default: ${TOKEN_ENV} if set)")
    p.add_argument("--tls-ca", type=Path, help="CA of the server's certificate (enables TLS)")
    p.add_argument("--tls-cert", type=Path, help="client certificate for mutual TLS (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="client private key for mutual TLS")


def client_from_args(a: argparse.Namespace) -> FacegateClient:
    token = a.token_file.read_text().strip() if a.token_file else os.environ.get(TOKEN_ENV) or None
    tls = a.tls_ca or a.tls_cert
    creds = tls_credentials(a.tls_ca, a.tls_cert, a.tls_key) if tls else None
    return FacegateClient(a.target, timeout_s=a.timeout, credentials=creds, token=token)
