"""The audit log's shed-call summaries: counted per caller and RPC, one line per window, nothing lost at close."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from server.audit import AuditConfig, AuditLog


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_shed_calls_are_one_line_per_caller_and_rpc_with_the_count(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(AuditConfig(path=path, shed_summary_s=3600))
    for _ in range(100):
        audit.record_shed(rpc="/x/CheckLiveness", caller="a", reason="server busy")
    for _ in range(5):
        audit.record_shed(rpc="/x/IdentifyFromClip", caller="b", reason="server busy: identify")
    audit.record(rpc="/x/DeletePerson", caller="a", outcome="ok", collection="c", person_id="p")
    assert [x["outcome"] for x in lines(path)] == ["ok"]  # a gallery change is written at once, sheds wait
    audit.close()  # the window's counts are not lost at shutdown
    shed = [x for x in lines(path) if x["outcome"] == "resource_exhausted"]
    assert [(x["caller"], x["rpc"], x["count"]) for x in shed] == [("a", "/x/CheckLiveness", 100),
                                                                    ("b", "/x/IdentifyFromClip", 5)]
    assert all(x["since"] and x["reason"] for x in shed)


def test_a_window_is_written_when_it_ends_without_further_calls(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(AuditConfig(path=path, shed_summary_s=0.2))
    for _ in range(3):
        audit.record_shed(rpc="/x/CheckLiveness", caller="a", reason="server busy")
    deadline = time.monotonic() + 5
    while not lines(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [x["count"] for x in lines(path)] == [3]
    audit.record_shed(rpc="/x/CheckLiveness", caller="a", reason="server busy")  # a new window begins
    audit.close()
    assert [x["count"] for x in lines(path)] == [3, 1]


@pytest.mark.parametrize("setting", [{"shed_summary_s": 0}, {"shed_summary_s": -1.0}, {"backups": 0}])
def test_settings_that_would_defeat_the_log_are_refused(tmp_path: Path, setting: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"\[audit\]"):
        AuditConfig(path=tmp_path / "a.jsonl", **setting)  # type: ignore[arg-type]
