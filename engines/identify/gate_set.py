"""The identification parity gate where an ensemble was installed rather than trained.

A gate's verdict holds for one type of CPU (``engines/precision.py``), and a bundle carries the verdicts of the
machine that packed it. A pod on another CPU type therefore served the members in FP32: the gate needs the
synthetic clips the ensemble was evaluated on, and pods do not have them. Shipping the clips would add some 380 MB
to a 13 MB bundle. The bundle carries their recipe instead, ``ensembles/<name>.gate-set`` (a few kB):

- the generator's settings and seed (``engines/identify/synthetic.py`` is seeded per identity);
- the sha256 of the face photo it animated, and the face box it used in that photo;
- the split the ensemble was evaluated on (enrolment, test and unknown clips).

``python -m engines.identify.gate_set --repository R --samples DIR`` (the images' entrypoint, where
``FACEGATE_LIVENESS_SAMPLES`` names the liveness samples, which hold that photo) does nothing while every verdict
of the identification gate holds here. Otherwise it finds the photo by its sha256 and regenerates the clips into
a scratch folder in the repository. Then it runs the gate (``engines/identify/int8_gate.py``) on the members' INT8
files as installed, never re-quantised, so the verdict is about the file that will serve. Last, it removes the
clips. The clips are the ones the packing machine made, up to floating-point rounding in the rendering, which is
all a parity gate needs: it compares precisions on the same clips, here. Without the photo or a recipe, nothing
runs and the members stay in FP32, as before.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engines.atomic_write import write_atomically
from engines.file_lock import exclusive
from engines.identify.ensemble import SPLIT_KEYS, find_ensemble
from engines.machine import usable_cpus
from engines.precision import GATE_LOCK, gate_parser
from engines.weights import sha256_file

log = logging.getLogger("engines.identify.gate_set")
# The generator (OpenCV) and the gate (PyTorch, OpenVINO) are imported where they run: the bundle's install imports
# this module for the recipe's name alone.

FORMAT = 1
SCRATCH_PREFIX = ".gate-set-"
# Bounds on looking for the photo in a mounted folder: files read, and the size of one.
MAX_CANDIDATES = 1000
MAX_PHOTO_BYTES = 64 << 20
# Bounds on what a recipe may ask the generator for (the project's set is 30,720 frames of 180x240).
MAX_FRAMES = 200_000
MAX_FRAME_PIXELS = 1 << 20


class GateSetError(ValueError):
    """A recipe that is missing what regenerating the clips needs; the message says what."""


def recipe_name(ensemble: str) -> str:
    """The recipe's path in a repository (and a bundle). Not *.json: ``find_ensemble`` reads every
    ``ensembles/*.json`` as a manifest."""
    return f"ensembles/{ensemble}.gate-set"


def make_recipe(synthetic_root: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The recipe of the clips in ``synthetic_root`` (its ``synthetic.json``) with the split ``report`` (the
    ensemble's training report) evaluated the ensemble on."""
    from engines.identify.synthetic import SyntheticConfig

    meta = json.loads((synthetic_root / "synthetic.json").read_text())
    if not meta.get("base_image_sha256") or not meta.get("face_box"):
        raise GateSetError(f"{synthetic_root / 'synthetic.json'} records no face photo sha256 and face box "
                           "(generated before they were recorded, or from a drawn face): regenerate the clips")
    SyntheticConfig(**meta["config"])  # (raises on settings this generator does not have)
    return {"format": FORMAT, "generator": meta["config"], "base_image_sha256": meta["base_image_sha256"],
            "face_box": [int(v) for v in meta["face_box"]], "split": {k: list(report[k]) for k in SPLIT_KEYS}}


def read_recipe(path: Path) -> dict[str, Any]:
    from engines.identify.synthetic import SyntheticConfig

    try:
        recipe: dict[str, Any] = json.loads(path.read_text())
        ok = (recipe["format"] == FORMAT and len(recipe["face_box"]) == 4
              and all(isinstance(v, int) for v in recipe["face_box"])
              and all(isinstance(recipe["split"][k], list) for k in SPLIT_KEYS))
        cfg = SyntheticConfig(**recipe["generator"])
        frames = cfg.identities * cfg.sessions * cfg.clips_per_session * round(cfg.duration_s * cfg.fps)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GateSetError(f"{path} is not a gate-set recipe: {exc}") from exc
    if not ok:
        raise GateSetError(f"{path} is not a format {FORMAT} gate-set recipe")
    if frames > MAX_FRAMES or cfg.width * cfg.height > MAX_FRAME_PIXELS:
        raise GateSetError(f"{path} asks for {frames} frames of {cfg.width}x{cfg.height} (at most {MAX_FRAMES} "
                           f"of {MAX_FRAME_PIXELS} pixels)")
    return recipe


def find_photo(folder: Path, sha256: str) -> Path | None:
    """The file in ``folder`` (not below it) whose sha256 is ``sha256``; at most ``MAX_CANDIDATES`` files of at
    most ``MAX_PHOTO_BYTES`` each are read."""
    if not folder.is_dir():
        return None
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink())
    for path in candidates[:MAX_CANDIDATES]:
        if path.stat().st_size <= MAX_PHOTO_BYTES and sha256_file(path) == sha256:
            return path
    return None


def _remove_scratch(repository: Path) -> None:
    """Scratch folders of earlier runs (a pod killed while it generated)."""
    for path in repository.glob(f"{SCRATCH_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def run(repository: Path, samples: Path) -> dict[str, Any]:
    """Run the identification gate from the installed recipe where its verdicts do not hold here; the outcome (or
    why it did not run)."""
    ens = find_ensemble(repository)
    if ens is None:
        return {"skipped": "no identification ensemble"}
    recipe_path = repository / recipe_name(ens.name)
    if not recipe_path.is_file():
        return {"skipped": f"ensemble {ens.name} carries no gate set ({recipe_path.name}); members without "
                           "verdicts for this CPU serve FP32"}
    from engines.identify import int8_gate
    from engines.identify.synthetic import SyntheticConfig, generate

    if not (todo := int8_gate.stale(repository)):
        return {"skipped": "every identification verdict is current for this ensemble on this type of CPU"}
    recipe = read_recipe(recipe_path)
    photo = find_photo(samples, recipe["base_image_sha256"])
    if photo is None:
        return {"skipped": f"no file in {samples} has the gate set's photo sha256 {recipe['base_image_sha256']}; "
                           "members without verdicts for this CPU serve FP32"}
    # Replicas on one volume take turns; one that waited finds the verdicts current.
    with exclusive(repository / GATE_LOCK):
        if not (todo := int8_gate.stale(repository)):
            return {"skipped": "every identification verdict is current (another process ran the gate)"}
        _remove_scratch(repository)
        log.info("identification gate: running for %s, on clips regenerated from the gate set", ", ".join(todo))
        scratch = Path(tempfile.mkdtemp(dir=repository, prefix=SCRATCH_PREFIX))
        try:
            t0 = time.monotonic()
            root = scratch / "clips"
            x, y, w, h = recipe["face_box"]
            generate(root, SyntheticConfig(**recipe["generator"]), photo, (x, y, w, h), workers=usable_cpus())
            t1 = time.monotonic()
            split = scratch / "split.json"
            write_atomically(split, json.dumps(recipe["split"]))
            args = gate_parser("", int8_gate.arguments).parse_args(
                ["--repository", str(repository), "--root", str(root), "--cache", str(scratch / "prepared"),
                 "--split", str(split), "--keep-int8"])
            outcome = int8_gate.run(args)
            log.info("identification gate: clips generated in %.0f s, gate %.0f s", t1 - t0, time.monotonic() - t1)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return outcome


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engines.identify.gate_set", description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--samples", type=Path, required=True, help="a folder holding the gate set's face photo")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        outcome = run(args.repository, args.samples)
    except (GateSetError, OSError) as exc:
        print(f"identification gate: {exc}", file=sys.stderr)
        return 2
    if "skipped" in outcome:
        log.info("identification gate not run: %s", outcome["skipped"])
    print(json.dumps(outcome, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
