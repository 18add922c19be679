"""The audit log: one JSON line per gallery change and per refused call, to its own rotated file (or stderr).

Fields: time (UTC, ISO 8601), caller, rpc, collection, person_id, outcome, request_id and, for refusals, a
reason. Never an image, frame, embedding or score: the record takes only these named strings, so nothing
biometric can reach it by accident.

Calls shed under overload (RESOURCE_EXHAUSTED) are the exception: they are counted per caller and RPC and written
as one summary line per ``shed_summary_s`` (with the count and the window), not one line each. A flood at ten
times the capacity is ~1,000 refusals a second: a line each would rotate the audit history away (the default
640 MiB of files in well under an hour) and cost the event loop a file write per refused call.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


@dataclass(frozen=True)
class AuditConfig:
    path: Path | None = Path("data/audit.jsonl")
    """JSON-lines file; None writes to stderr (for a container log collector)."""
    max_bytes: int = 64 * 1024 * 1024
    """Rotate when the file reaches this size."""
    backups: int = 10
    """Rotated files kept (audit.jsonl.1 .. .N)."""
    shed_summary_s: float = 10.0
    """Calls shed under overload are written as one line per caller and RPC per this many seconds, with a count."""

    def __post_init__(self) -> None:
        if not self.shed_summary_s > 0:  # 0 or less would write a line per shed call again, in a timer thread each
            raise ValueError(f"[audit] shed_summary_s must be > 0, got {self.shed_summary_s}")
        if self.max_bytes < 1 or self.backups < 1:
            raise ValueError(f"[audit] max_bytes and backups must be >= 1, got {self.max_bytes}, {self.backups}")


class AuditLog:
    def __init__(self, config: AuditConfig) -> None:
        # A logger of its own that does not propagate: audit lines never mix with (or depend on) the app log.
        self._logger = logging.getLogger(f"facegate.audit.{id(self)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        handler: logging.Handler
        if config.path is None:
            handler = logging.StreamHandler(sys.stderr)
        else:
            config.path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(config.path, maxBytes=config.max_bytes,
                                                           backupCount=config.backups, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._handler = handler
        self._logger.addHandler(handler)
        self._summary_s = config.shed_summary_s
        self._shed_lock = threading.Lock()
        self._shed: Counter[tuple[str, str]] = Counter()
        self._shed_reason: dict[tuple[str, str], str] = {}
        self._shed_since = ""
        self._shed_timer: threading.Timer | None = None

    def record(self, *, rpc: str, caller: str, outcome: str, collection: str = "", person_id: str = "",
               request_id: str = "", reason: str = "") -> None:
        line = {"time": _now(), "caller": caller, "rpc": rpc,
                "collection": collection, "person_id": person_id, "outcome": outcome, "request_id": request_id}
        if reason:
            line["reason"] = reason
        self._logger.info(json.dumps(line, ensure_ascii=True))

    def record_shed(self, *, rpc: str, caller: str, reason: str) -> None:
        """Count a call shed under overload; the window's counts are written when it ends (a timer)."""
        with self._shed_lock:
            if not self._shed:
                self._shed_since = _now()
                self._shed_timer = threading.Timer(self._summary_s, self.flush_shed)
                self._shed_timer.daemon = True
                self._shed_timer.start()
            self._shed[caller, rpc] += 1
            self._shed_reason[caller, rpc] = reason

    def flush_shed(self) -> None:
        """Write one line per caller and RPC with the calls shed since the window began."""
        with self._shed_lock:
            counts, reasons, since = self._shed, self._shed_reason, self._shed_since
            self._shed, self._shed_reason, self._shed_timer = Counter(), {}, None
        for (caller, rpc), n in sorted(counts.items()):
            self._logger.info(json.dumps({"time": _now(), "caller": caller, "rpc": rpc, "collection": "",
                                          "person_id": "", "outcome": "resource_exhausted", "request_id": "",
                                          "count": n, "since": since, "reason": reasons[caller, rpc]},
                                         ensure_ascii=True))

    def close(self) -> None:
        with self._shed_lock:
            timer = self._shed_timer
        if timer is not None:
            timer.cancel()
        self.flush_shed()
        self._logger.removeHandler(self._handler)
        self._handler.close()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
