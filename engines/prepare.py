"""Prepare the model repository: obtain weights, build the framework models, export and verify ONNX.

``python -m engines.prepare --repository model_repository`` (what ``make models`` runs). Idempotent: a model
whose metadata already records the same source weights and whose ONNX file hashes to the recorded value is
left alone, so ``make serve`` is quick after the first time.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from engines.declarations import DECLARATIONS
from engines.file_lock import exclusive
from engines.repository import ModelMetadata, ModelRepository
from engines.specs import DETECTOR, DETECTOR_SPEC, LIVENESS_SPECS, LivenessSpec
from engines.weights import MANIFEST, WEIGHTS_DIR_ENV, WEIGHTS_URL_ENV, WeightsError, obtain, sha256_file

log = logging.getLogger("engines.prepare")

MODEL_VERSION = "1"
# Bump when the export itself changes (graph, shapes, metadata), so existing repositories are re-exported.
RECIPE = 2
# Verification tolerance between ONNX Runtime and the framework model on random inputs.
TOLERANCE = 1e-4

_PROTOTXT = "silent-face/deploy.prototxt"
_CAFFEMODEL = "silent-face/Widerface-RetinaFace.caffemodel"


def _up_to_date(repo: ModelRepository, name: str, weights: dict[str, str]) -> bool:
    if not repo.has(name):
        return False
    meta = repo.load(name)
    return (meta.source_weights == weights and meta.preprocessing.get("recipe") == RECIPE
            and sha256_file(repo.onnx_path(name)) == meta.onnx_sha256)


def _prepare_liveness(repo: ModelRepository, spec: LivenessSpec, paths: dict[str, Path], force: bool) -> None:
    weights = {spec.weights: sha256_file(paths[spec.weights])}
    if not force and _up_to_date(repo, spec.name, weights):
        log.info("%s: up to date", spec.name)
        return
    import torch

    from engines.export import export_onnx, verify_onnx
    from engines.models.minifasnet import load_minifasnet

    model = load_minifasnet(paths[spec.weights], spec.variant, spec.height, spec.width)
    path = repo.onnx_path(spec.name)
    export_onnx(model, torch.rand(2, 3, spec.height, spec.width) * 255, path, "input", ["logits"])
    sample = np.zeros((3, spec.height, spec.width), np.float32)
    sample.flat[1] = 255.0
    report = verify_onnx(model, path, sample)
    _check(spec.name, report.max_abs_diff)
    decl = DECLARATIONS[spec.name]
    repo.save(ModelMetadata(
        name=spec.name, version=MODEL_VERSION, inputs=decl.inputs, outputs=decl.outputs,
        onnx_sha256=sha256_file(path), source_weights=weights,
        preprocessing={"recipe": RECIPE, "kind": decl.kind, "scale": spec.scale, "color": "bgr",
                       "value_range": "0-255", "live_class": spec.live_class,
                       "verified_max_abs_diff": report.max_abs_diff},
    ))
    log.info("%s: exported, max abs diff vs torch %.2e", spec.name, report.max_abs_diff)


def _prepare_detector(repo: ModelRepository, paths: dict[str, Path], force: bool) -> None:
    weights = {rel: sha256_file(paths[rel]) for rel in (_PROTOTXT, _CAFFEMODEL)}
    if not force and _up_to_date(repo, DETECTOR, weights):
        log.info("%s: up to date", DETECTOR)
        return
    import torch

    from engines.export import export_onnx, verify_onnx
    from engines.models.retinaface import CaffeRetinaFace

    model = CaffeRetinaFace(paths[_PROTOTXT], paths[_CAFFEMODEL]).eval()
    h, w = DETECTOR_SPEC.export_size
    path = repo.onnx_path(DETECTOR)
    export_onnx(model, torch.rand(2, 3, h, w) * 255 - 128, path, "input", ["loc", "conf"], spatial=True)
    worst = 0.0
    for sh, sw in ((h, w), (w, h), (144, 256), (100, 90)):  # portrait, landscape, 16:9, a small image
        sample = np.zeros((3, sh, sw), np.float32)
        sample.flat[0], sample.flat[1] = -128.0, 128.0
        report = verify_onnx(model, path, sample, batch_sizes=(1, 3))
        worst = max(worst, report.max_abs_diff)
    _check(DETECTOR, worst)
    decl = DECLARATIONS[DETECTOR]
    repo.save(ModelMetadata(
        name=DETECTOR, version=MODEL_VERSION, inputs=decl.inputs, outputs=decl.outputs,
        onnx_sha256=sha256_file(path), source_weights=weights,
        preprocessing={"recipe": RECIPE, "kind": decl.kind, **asdict(DETECTOR_SPEC),
                       "verified_max_abs_diff": worst},
    ))
    log.info("%s: exported, max abs diff vs torch %.2e", DETECTOR, worst)


def _check(name: str, diff: float) -> None:
    if diff > TOLERANCE:
        raise RuntimeError(f"{name}: ONNX differs from the framework model by {diff:.2e} (> {TOLERANCE:.0e})")


def prepare(repository: Path, weights_dir: Path | None, cache_dir: Path, force: bool = False,
            mirror: str | None = None) -> ModelRepository:
    # Replicas on one volume start together: one exports while the others wait and then find it up to date (each
    # export writes through one temporary name, and two at once could rename each other's half-written file).
    with exclusive(repository / ".prepare.lock"):
        paths = obtain(weights_dir, cache_dir, MANIFEST, mirror=mirror)
        repo = ModelRepository(repository)
        _prepare_detector(repo, paths, force)
        for spec in LIVENESS_SPECS:
            _prepare_liveness(repo, spec, paths, force)
    return repo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help=f"local weights folder (default: ${WEIGHTS_DIR_ENV}, else download)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/weights"))
    parser.add_argument("--weights-url", default=os.environ.get(WEIGHTS_URL_ENV) or None,
                        help=f"download from this mirror, laid out like the weights folder (default: "
                             f"${WEIGHTS_URL_ENV}, else the pinned upstream); sha256-checked either way")
    parser.add_argument("--force", action="store_true", help="re-export even when up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch"):  # the exporter logs every optimisation pass at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    weights_dir = args.weights_dir
    if weights_dir is None and os.environ.get(WEIGHTS_DIR_ENV):
        weights_dir = Path(os.environ[WEIGHTS_DIR_ENV])
    try:
        prepare(args.repository, weights_dir, args.cache_dir, args.force, args.weights_url)
    except WeightsError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
