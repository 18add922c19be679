"""Command lines for identification.

``enroll-clips COLLECTION ROOT --fps F``: enrol every person folder under ROOT (ROOT/<person>/<clip>/frames),
showing progress; ``identify-clip COLLECTION CLIP_DIR --fps F``: identify the person in a folder of frames.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from facegate_client.client import MATCH_NAMES, clip_from_folder, field_violations
from facegate_client.connection import add_connection_args, client_from_args


def _error(err: grpc.RpcError) -> str:
    details = "; ".join(f"{f}: {d}" for f, d in field_violations(err)) or err.details()  # type: ignore[attr-defined]
    return f"{err.code().name}: {details}"  # type: ignore[attr-defined]


def enroll_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="enroll-clips", description="Enrol persons from folders of clips.")
    p.add_argument("collection")
    p.add_argument("root", type=Path, help="ROOT/<person id>/<clip folder>/<frame images>")
    p.add_argument("--fps", type=float, required=True, help="capture frame rate of the clips")
    p.add_argument("--max-clips", type=int, default=0, help="enrol at most this many clips per person")
    p.add_argument("--append", action="store_true", help="add the clips to persons that exist already")
    add_connection_args(p, timeout_s=60.0)
    a = p.parse_args(argv)
    people = sorted(d for d in a.root.iterdir() if d.is_dir())
    failures = 0
    with client_from_args(a) as client:
        coll = client.create_collection(a.collection)
        print(f"collection {coll.collection} (model {coll.model_version}, {'created' if coll.created else 'exists'})",
              file=sys.stderr)
        for n, person in enumerate(people, start=1):
            folders = sorted(d for d in person.iterdir() if d.is_dir())
            if a.max_clips:
                folders = folders[: a.max_clips]
            try:
                resp = client.enroll(a.collection, person.name, [clip_from_folder(f, a.fps) for f in folders],
                                     append=a.append)
            except grpc.RpcError as err:
                failures += 1
                print(f"[{n}/{len(people)}] {person.name}: ERROR {_error(err)}", file=sys.stderr)
                continue
            rejected = [f"clip {c.index}: {c.reason}" for c in resp.clips if not c.accepted]
            print(f"[{n}/{len(people)}] {person.name}: {resp.clips_accepted}/{len(folders)} clips accepted, "
                  f"{resp.total_clips} enrolled" + (f" ({'; '.join(rejected)})" if rejected else ""),
                  file=sys.stderr)
            failures += resp.clips_accepted == 0
    return 1 if failures else 0


def identify_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="identify-clip", description="Identify the person in a clip.")
    p.add_argument("collection")
    p.add_argument("clips", nargs="+", type=Path, help="folders of frame images")
    p.add_argument("--fps", type=float, required=True)
    p.add_argument("--apex", type=int, help="apex frame index, if known")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--liveness", action="store_true", help="also check liveness on the clip's apex frame")
    add_connection_args(p, timeout_s=30.0)
    a = p.parse_args(argv)
    failures = 0
    with client_from_args(a) as client:
        for folder in a.clips:
            try:
                r = client.identify(a.collection, clip_from_folder(folder, a.fps, a.apex), a.top_k,
                                    check_liveness=a.liveness)
            except grpc.RpcError as err:
                failures += 1
                print(f"{folder}\tERROR\t{_error(err)}")
                continue
            cands = ",".join(f"{c.person_id}:{c.score:.3f}/{c.votes}" for c in r.candidates) or "-"
            live = ""
            if r.HasField("liveness"):
                from facegate_client.client import DECISION_NAMES

                live = f"\tliveness={DECISION_NAMES[r.liveness.decision]}:{r.liveness.live_score:.3f}"
            print(f"{folder}\t{MATCH_NAMES[r.decision]}\tthreshold={r.threshold:.3f}\tcandidates={cands}\t"
                  f"apex={r.diagnostics.apex_index}\tcoverage={r.diagnostics.track_coverage:.2f}{live}")
    return 1 if failures else 0
