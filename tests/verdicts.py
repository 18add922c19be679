"""Gate verdicts as another CPU type would have written them (no second CPU type is at hand in CI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engines.precision import FORMAT, GATE_FILE, stored_verdicts, verdicts_here

OTHER_CPU = "AMD EPYC (family 25 model 17) [avx2 fma]"


def relabelled(block: dict[str, Any], machine: str) -> dict[str, Any]:
    """A copy of one CPU type's verdicts with every entry naming ``machine``."""
    copy: dict[str, Any] = json.loads(json.dumps(block))
    for entry in (copy.get("int8"), *copy.get("bf16", {}).get("parts", {}).values()):
        if entry is not None:
            entry["machine"] = machine
    return copy


def move_to_another_type(directory: Path, machine: str = OTHER_CPU) -> dict[str, Any]:
    """Rewrite the model's verdicts in ``directory`` so that this CPU type's are ``machine``'s (and this type has
    none); returns them as moved."""
    here = verdicts_here(directory)
    assert here, f"no verdicts for this CPU type in {directory}"
    moved = relabelled(here, machine)
    (directory / GATE_FILE).write_text(json.dumps({"format": FORMAT, "cpu_types": {machine: moved}}))
    assert set(stored_verdicts(directory)) == {machine}
    return moved


def as_format1(block: dict[str, Any]) -> str:
    """One CPU type's verdicts as files held them before they were kept per type (no "format" key)."""
    return json.dumps({k: v for k, v in block.items() if k in ("int8", "bf16")})
