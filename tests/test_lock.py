"""The lock (constraints.txt and constraints-bench.txt, written by `make lock`): every dependency the project
declares is pinned there within its declared range, and the venvs `make` built hold exactly the pinned versions,
so a fresh machine runs what CI tested."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"

# What an interpreter has installed, as {name: version}; run in the venv under test.
_LIST_INSTALLED = ("import importlib.metadata as m, json; "
                   "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")


def pins(path: Path) -> dict[NormalizedName, Version]:
    """``name==version`` lines of a constraints file by normalised name; anything else there fails the test."""
    found: dict[NormalizedName, Version] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line.strip())
        assert match, f"{path.name}:{number}: not a plain pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in found, f"{path.name}:{number}: {name} pinned twice"
        found[name] = Version(match[2])
    return found


def declared() -> list[Requirement]:
    """Every requirement in pyproject.toml: the dependencies and every extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines.extend(extra)
    return [Requirement(line) for line in lines]


def bench_declared() -> list[Requirement]:
    """The peers' venv's packages as the Makefile names them (BENCH_PACKAGES)."""
    text = (ROOT / "Makefile").read_text()
    block = re.search(r"^BENCH_PACKAGES := (.*?)(?<!\\)$", text, re.MULTILINE | re.DOTALL)
    assert block, "BENCH_PACKAGES is gone from the Makefile"
    return [Requirement(word.strip('"')) for word in re.findall(r'"[^"]+"|[^\s\\"]+', block[1])]


def installed(python: Path) -> dict[NormalizedName, Version]:
    out = subprocess.run([str(python), "-c", _LIST_INSTALLED], capture_output=True, text=True, check=True).stdout
    return {canonicalize_name(name): Version(version) for name, version in json.loads(out).items()}


def mismatches(lock: dict[NormalizedName, Version], have: dict[NormalizedName, Version]) -> list[str]:
    # A local tag (torch's +cpu) names the build, not the release: the pin matches it as pip's == does.
    return [f"{name}: {have[name]} installed, {pin} locked" for name, pin in sorted(lock.items())
            if name in have and have[name].public != pin.public]


@pytest.mark.parametrize(("lock_file", "requirements"), [("constraints.txt", declared),
                                                         ("constraints-bench.txt", bench_declared)])
def test_every_declared_dependency_is_locked_within_its_range(
        lock_file: str, requirements: Callable[[], list[Requirement]]) -> None:
    lock = pins(ROOT / lock_file)
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement} is declared but {lock_file} has no pin for it (run `make lock`)"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"{lock_file} pins {name}=={lock[name]}, outside the declared {requirement} (run `make lock`)")


def test_the_venv_running_the_tests_holds_the_locked_versions() -> None:
    lock = pins(ROOT / "constraints.txt")
    have = installed(Path(sys.executable))
    assert "numpy" in have and "grpcio" in have
    assert mismatches(lock, have) == []


@pytest.mark.skipif(not BENCH_PYTHON.exists(), reason="no .venv-bench here (`make bench-env` builds it)")
def test_the_peers_venv_holds_the_locked_versions() -> None:
    lock = pins(ROOT / "constraints-bench.txt")
    have = installed(BENCH_PYTHON)
    assert "nvidia-pytriton" in have
    assert mismatches(lock, have) == []
