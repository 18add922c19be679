"""The identification gate's clips carried as a recipe (engines/identify/gate_set.py): the generator makes the
same bytes from the same recipe, a bundle packed with its clips carries the recipe, and the gate does nothing where
it need not or cannot run. The gate run from a recipe on another CPU type's bundle is test_container_start's
restart (a pod, as the manifests make it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from engines.identify import gate_set
from engines.identify.bundle import install
from engines.identify.bundle_pack import pack
from engines.identify.ensemble import find_ensemble
from engines.identify.synthetic import SyntheticConfig, generate
from engines.weights import sha256_file
from tests.conftest import _need
from tests.verdicts import move_to_another_type

pytestmark = pytest.mark.weights


def frames(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_same_recipe_generates_the_same_bytes_whatever_the_process_count(samples: Path, tmp_path: Path) -> None:
    cfg = SyntheticConfig(identities=3, sessions=1, clips_per_session=2, duration_s=0.05, seed=7)
    photo, box = samples / "image_T1.jpg", (106, 147, 207, 213)
    generate(tmp_path / "one", cfg, photo, box, workers=1)
    generate(tmp_path / "two", cfg, photo, box, workers=2)
    one, two = frames(tmp_path / "one"), frames(tmp_path / "two")
    assert len(one) > 3 * 2 * 5 and one == two  # every frame, the annotation file and synthetic.json
    meta = json.loads(one["synthetic.json"])
    assert meta["base_image_sha256"] == sha256_file(photo) and meta["face_box"] == list(box)
    # Another seed is another set: the comparison above could fail.
    generate(tmp_path / "other", SyntheticConfig(**{**meta["config"], "seed": 8}), photo, box, workers=1)
    other = frames(tmp_path / "other")
    assert [k for k in one if k.endswith(".jpg") and one[k] != other.get(k)]


@pytest.fixture(scope="module")
def installed(repository_dir: Path, trained: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, dict[str, Any]]:
    """The trained ensemble packed with its clips' recipe and installed beside a copy of the detector."""
    if find_ensemble(repository_dir) is None:
        _need(f"a trained identification ensemble in {repository_dir} (make identify-models)")
    archive, digest = pack(repository_dir, tmp_path_factory.mktemp("dist"), synthetic=trained["synthetic_dir"])
    repository = tmp_path_factory.mktemp("repository")
    shutil.copytree(repository_dir / "retinaface", repository / "retinaface")
    install(str(archive), digest, repository)
    return repository, {"archive": archive, "digest": digest}


def test_a_bundle_packed_with_its_clips_carries_their_recipe(
        installed: tuple[Path, dict[str, Any]], repository_dir: Path, trained: dict[str, Any], samples: Path,
        tmp_path: Path) -> None:
    repository, _ = installed
    ensemble = find_ensemble(repository)
    assert ensemble is not None
    recipe = gate_set.read_recipe(repository / gate_set.recipe_name(ensemble.name))
    meta = json.loads((trained["synthetic_dir"] / "synthetic.json").read_text())
    assert recipe["generator"] == meta["config"] and recipe["face_box"] == meta["face_box"]
    assert recipe["base_image_sha256"] == sha256_file(samples / "image_T1.jpg")  # the photo CI generates from
    assert {k: recipe["split"][k] for k in gate_set.SPLIT_KEYS} == {k: trained[k] for k in gate_set.SPLIT_KEYS}
    # A later bundle without one leaves no recipe describing other clips.
    elsewhere = tmp_path / "repository"
    shutil.copytree(repository, elsewhere)
    plain, digest = pack(repository_dir, tmp_path / "dist")
    install(str(plain), digest, elsewhere)
    assert not (elsewhere / gate_set.recipe_name(ensemble.name)).exists()
    assert find_ensemble(elsewhere) == ensemble


def test_a_recipe_without_its_photo_or_settings_is_refused(tmp_path: Path, trained: dict[str, Any]) -> None:
    meta = json.loads((trained["synthetic_dir"] / "synthetic.json").read_text())
    (tmp_path / "synthetic.json").write_text(json.dumps({**meta, "base_image_sha256": None}))
    with pytest.raises(gate_set.GateSetError, match="no face photo sha256"):
        gate_set.make_recipe(tmp_path, trained)
    good = gate_set.make_recipe(trained["synthetic_dir"], trained)
    (tmp_path / "recipe").write_text(json.dumps(good))
    assert gate_set.read_recipe(tmp_path / "recipe") == good
    for broken in ({**good, "format": 2}, {**good, "generator": {**good["generator"], "colour": 1}},
                   {k: v for k, v in good.items() if k != "split"},
                   {**good, "generator": {**good["generator"], "identities": 100_000}}):  # bounded
        (tmp_path / "recipe").write_text(json.dumps(broken))
        with pytest.raises(gate_set.GateSetError):
            gate_set.read_recipe(tmp_path / "recipe")


def test_the_gate_runs_only_where_a_verdict_is_stale_and_the_photo_is_at_hand(
        installed: tuple[Path, dict[str, Any]], samples: Path, tmp_path: Path) -> None:
    repository, _ = installed
    ensemble = find_ensemble(repository)
    assert ensemble is not None
    # Packed on this CPU type: the verdicts it carries hold here.
    assert "current" in gate_set.run(repository, samples)["skipped"]
    copy = tmp_path / "repository"
    shutil.copytree(repository, copy)
    move_to_another_type(copy / ensemble.members[0])
    # Stale, but the photo is not in the folder named: nothing is generated, the member stays in FP32.
    elsewhere = tmp_path / "photos"
    elsewhere.mkdir()
    (elsewhere / "image_T1.jpg").write_bytes((samples / "image_T1.jpg").read_bytes() + b"\0")  # another file
    outcome = gate_set.run(copy, elsewhere)
    assert "has the gate set's photo" in outcome["skipped"]
    assert not list(copy.glob(f"{gate_set.SCRATCH_PREFIX}*"))
    assert gate_set.find_photo(samples, sha256_file(samples / "image_T1.jpg")) == samples / "image_T1.jpg"
    # Without a recipe there is nothing to regenerate from.
    (copy / gate_set.recipe_name(ensemble.name)).unlink()
    assert "carries no gate set" in gate_set.run(copy, samples)["skipped"]
