"""INT8 variants of the SlowFast members, served only if they pass the parity gate (run at model preparation).

``python -m engines.identify.int8_gate --root SYNTH_DIR``: quantises each member of the served ensemble
(calibrated on centre crops of training-half clips, never the test split), then runs FP32 and INT8 through
OpenVINO (the runtime that would serve them) on the test split, the unknown subjects and the enrolment clips.
A member passes if every clip's INT8 embedding has cosine >= 0.99 to its FP32 one, and the ensemble's rank-1 on
the test split (enrolling two clips per person, as the server check does) is unchanged with the passing members
in INT8. The outcome, with its numbers, goes to each member's ``precision.json``; a failed variant is reported and
FP32 is served. All of this is on synthetic clips.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from engines.identify.datasets import READERS
from engines.identify.ensemble import find_ensemble
from engines.identify.preprocess import prepare_all
from engines.identify.train import _batch, cmc, identify
from engines.precision import INT8_FILE, gate_main, quantize_int8, write_gate
from engines.repository import ModelRepository

log = logging.getLogger("engines.identify.int8_gate")
MIN_COSINE = 0.99


def ov_embed(path: Path, inputs: np.ndarray, batch: int = 8) -> np.ndarray:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": os.cpu_count() or 1})
    req = compiled.create_infer_request()
    out = [np.array(next(iter(req.infer({0: inputs[i:i + batch]}).values())), copy=True)
           for i in range(0, len(inputs), batch)]
    return np.concatenate(out).astype(np.float32)


def embedding_projection(path: Path) -> list[str]:
    """The nodes that project the pooled features to the embedding (the graph's Gemm / MatMul): kept in FP32.
    They are a negligible share of the multiply-adds, and quantising them cost the most cosine: on m2, min cosine
    0.9895 with them in INT8, 0.9976 without (232 clips, entropy calibration)."""
    import onnx

    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node
            if n.op_type in ("Gemm", "MatMul")]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def run(args: argparse.Namespace) -> dict[str, Any]:
    repo = ModelRepository(args.repository)
    ens = find_ensemble(args.repository)
    if ens is None:
        raise SystemExit(f"no identification ensemble in {args.repository} (make identify-models)")
    report = json.loads((args.repository / "reports" / f"{ens.name}.json").read_text())
    clips = prepare_all(READERS["casme2"](args.root, args.annotation), repo.onnx_path("retinaface"), ens.spec,
                        args.cache)
    index = {c.record.key: i for i, c in enumerate(clips)}
    enrol = [index[k] for k in report["enrol2_gallery"]]
    test = [index[k] for k in report["test_probes"]]
    unknown = [index[k] for k in report["unknown_probes"]]
    held_out = set(test) | set(unknown)
    calib = [i for i in range(len(clips)) if i not in held_out][: args.calibration]
    x_cal = _batch(clips, calib, ens.spec, None).numpy()
    parity = enrol + test + unknown
    x_par = _batch(clips, parity, ens.spec, None).numpy()
    fp32: dict[str, np.ndarray] = {}
    int8: dict[str, np.ndarray] = {}
    members: dict[str, dict[str, Any]] = {}
    for name in ens.members:
        src = repo.onnx_path(name)
        dst = repo.model_dir(name) / INT8_FILE
        input_name = repo.load(name).inputs[0].name
        quantize_int8(src, dst, ({input_name: x_cal[i:i + 8]} for i in range(0, len(x_cal), 8)), args.method,
                      keep_fp32=embedding_projection(src))
        fp32[name], int8[name] = ov_embed(src, x_par), ov_embed(dst, x_par)
        cos = cosines(fp32[name], int8[name])
        members[name] = {"min_cosine": float(cos.min()), "median_cosine": float(np.median(cos)),
                         "cosine_ok": bool(cos.min() >= MIN_COSINE)}
        log.info("%s: cosine INT8 vs FP32 min %.4f median %.4f over %d clips", name, cos.min(), np.median(cos),
                 len(cos))
    n_enrol, n_test = len(enrol), len(test)
    labels = [clips[k].record.subject for k in enrol]
    truth = [clips[k].record.subject for k in test]

    def rank1(chosen: dict[str, np.ndarray]) -> tuple[float, list[str]]:
        gal = [chosen[n][:n_enrol] for n in ens.members]
        prb = [chosen[n][n_enrol:n_enrol + n_test] for n in ens.members]
        ranked = identify(gal, labels, prb, list(ens.members))
        return cmc(ranked, truth, 1)[0], [r[0][0] if r else "" for r in ranked]

    base, base_top = rank1(fp32)
    mixed = {n: int8[n] if members[n]["cosine_ok"] else fp32[n] for n in ens.members}
    quant, quant_top = rank1(mixed)
    changed = sum(a != b for a, b in zip(base_top, quant_top, strict=True))
    unchanged = quant == base
    for name, m in members.items():
        m["passed"] = bool(m["cosine_ok"] and unchanged)
        m["summary"] = (f"min cosine {m['min_cosine']:.4f} over {len(parity)} clips (gate >= {MIN_COSINE}); "
                        f"ensemble rank-1 on the synthetic test split {quant:.4f} vs FP32 {base:.4f}, "
                        f"{changed} of {n_test} top-1 persons changed")
        write_gate(repo, name, {**m, "rank1_fp32": base, "rank1_int8": quant, "top1_changed": changed,
                                "calibration_clips": len(calib), "parity_clips": len(parity),
                                "data": "synthetic clips (no real micro-expression data)"})
    return {"members": members, "rank1_fp32": base, "rank1_int8": quant, "top1_changed": changed}


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, required=True, help="the (synthetic) CASME II layout the ensemble used")
    p.add_argument("--annotation", type=Path)
    p.add_argument("--cache", type=Path, default=Path(".cache/clips"))
    p.add_argument("--calibration", type=int, default=128, help="training-half clips to calibrate on")


def main(argv: list[str] | None = None) -> int:
    return gate_main(__doc__.splitlines()[0], argv, _arguments, run)


if __name__ == "__main__":
    sys.exit(main())
