"""``check-liveness IMAGE...``: one line per image: path, decision, live score, face box, quality issues."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from facegate_client.client import field_violations
from facegate_client.connection import add_connection_args, client_from_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="check-liveness", description=__doc__)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--threshold", type=float, help="override the server's decision threshold, in [0, 1]")
    add_connection_args(p, timeout_s=10.0)
    args = p.parse_args(argv)
    failures = 0
    with client_from_args(args) as client:
        for path in args.images:
            try:
                a = client.check_liveness(path, threshold=args.threshold)
            except OSError as exc:
                print(f"{path}\tERROR\t{exc.strerror}: {exc.filename}")
                failures += 1
                continue
            except grpc.RpcError as err:
                details = "; ".join(f"{f}: {d}" for f, d in field_violations(err)) or err.details()  # type: ignore[attr-defined]
                print(f"{path}\tERROR\t{err.code().name}\t{details}")  # type: ignore[attr-defined]
                failures += 1
                continue
            face = a.response.face.box if a.response.HasField("face") else None
            box = f"box={face.x},{face.y},{face.width},{face.height}" if face else "box=-"
            issues = ",".join(a.quality_issues) or "-"
            print(f"{path}\t{a.decision}\tlive_score={a.live_score:.4f}\tthreshold={a.threshold:.2f}\t{box}\t"
                  f"issues={issues}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
