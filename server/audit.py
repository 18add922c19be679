"""The audit log: one JSON line per gallery change and per refused call, to its own rotated file (or stderr).

Fields: time (UTC, ISO 8601), caller, rpc, collection, person_id, outcome, request_id and, for refusals, a
reason. Never an image, frame, embedding or score: the record takes only these named strings, so nothing
biometric can reach it by accident.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
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

    def record(self, *, rpc: str, caller: str, outcome: str, collection: str = "", person_id: str = "",
               request_id: str = "", reason: str = "") -> None:
        line = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "caller": caller, "rpc": rpc,
                "collection": collection, "person_id": person_id, "outcome": outcome, "request_id": request_id}
        if reason:
            line["reason"] = reason
        self._logger.info(json.dumps(line, ensure_ascii=True))

    def close(self) -> None:
        self._logger.removeHandler(self._handler)
        self._handler.close()
