"""The proto contract: the current protos are compatible with the released API, and a renumbered or removed
field is caught."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("proto_compat", ROOT / "proto" / "compat.py")
assert _spec and _spec.loader
compat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compat)

RELEASED = json.loads((ROOT / "proto" / "api.lock.json").read_text())


def test_current_protos_are_compatible_with_the_released_api() -> None:
    assert compat.breaking_changes(RELEASED, compat.describe(ROOT / "proto")) == []


def _edited(tmp_path: Path, pattern: str, replacement: str) -> dict:
    root = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", root, ignore=shutil.ignore_patterns("*.py", "*.json"))
    path = root / "facegate" / "v1" / "liveness.proto"
    text, n = re.subn(pattern, replacement, path.read_text(), count=1)
    assert n == 1
    path.write_text(text)
    return compat.describe(root)


def test_a_changed_field_number_fails_the_check(tmp_path: Path) -> None:
    problems = compat.breaking_changes(RELEASED, _edited(tmp_path, r"float live_score = 3;", "float live_score = 30;"))
    assert any("live_score moved from number 3 to 30" in p for p in problems)


def test_a_removed_field_fails_unless_reserved(tmp_path: Path) -> None:
    problems = compat.breaking_changes(RELEASED, _edited(tmp_path, r"\s*float uncertainty_margin = 5;", ""))
    assert any("field 5 (uncertainty_margin) was removed" in p for p in problems)
    fine = compat.breaking_changes(RELEASED, _edited(tmp_path / "b", r"\s*float uncertainty_margin = 5;",
                                                     "\n  reserved 5;"))
    assert fine == []


def test_an_added_field_is_compatible(tmp_path: Path) -> None:
    added = _edited(tmp_path, r"float live_score = 3;", "float live_score = 3;\n  string note = 99;")
    assert compat.breaking_changes(RELEASED, added) == []
