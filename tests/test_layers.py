"""The layers run one way: engines/ never imports server/, and nothing below the servicers imports grpc or the
generated stubs. Checked on the source (AST of every file), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def offenders(folders: list[str], forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in sorted(imported_modules(path)):
                if name.split(".")[0] in forbidden:
                    found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def test_engines_never_import_server() -> None:
    assert offenders(["engines"], ("server",)) == []


@pytest.mark.parametrize("folder", ["engines", "server/pipelines", "server/services", "server/batching",
                                    "server/gallery"])
def test_nothing_below_the_servicers_imports_grpc_or_stubs(folder: str) -> None:
    assert offenders([folder], ("grpc", "grpc_status", "grpc_health", "facegate", "inference")) == []


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from server.app import FacegateServer\n    import grpc\n")
    assert imported_modules(f) == {"server.app", "grpc"}


def test_no_module_is_over_400_lines() -> None:
    long = [f"{p.relative_to(ROOT)}: {n}" for folder in ("server", "engines", "benchmarks", "clients/python")
            for p in (ROOT / folder).rglob("*.py") if (n := len(p.read_text().splitlines())) > 400]
    assert long == []
