"""Reduced-precision variants of the identification pipeline, served only if they pass its parity gate (run at
model preparation).

``python -m engines.identify.int8_gate --root SYNTH_DIR``: quantises each member of the served ensemble to INT8
(calibrated on centre crops of training-half clips, never the test split), then runs FP32 and INT8 (and, where
the CPU has bf16 arithmetic, bf16) through OpenVINO (the runtime that would serve them) on the test split, the
unknown subjects and the enrolment clips. A member's precision passes if every clip's embedding has cosine >=
0.99 to its FP32 one, and the ensemble's rank-1 on the test split (enrolling two clips per person, as the server
check does) is unchanged with the passing members in that precision. Where the CPU has bf16, the same clips are
also prepared with the detector in bf16 (its face box decides every crop): the detector's identification part
passes if the FP32 members' embeddings of those crops keep cosine >= 0.99 to the all-FP32 ones and rank-1 is
unchanged, and where it passes, each member precision must pass on those crops too. The outcome, with its
numbers, goes to each model's ``precision.json`` (bf16 as this pipeline's part, for this type of CPU); a failed
variant is reported and FP32 is served. All of this is on synthetic clips.

Where the ensemble was installed from a bundle rather than trained (a pod on another CPU type),
``engines/identify/gate_set.py`` regenerates the clips from the bundle's recipe and runs this gate with ``--split``
(the recipe's evaluation split) and ``--keep-int8`` (the installed INT8 files are gated as they are, not made
again, so the verdict is about the file that serves).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from engines.declarations import IDENTIFICATION, LIVENESS
from engines.identify.datasets import READERS
from engines.identify.ensemble import SPLIT_KEYS, find_ensemble, report_path
from engines.identify.preprocess import prepare_all
from engines.identify.train import _batch, cmc, identify
from engines.machine import has_bf16, usable_cpus
from engines.precision import (
    INT8_FILE,
    gate_main,
    int8_vouched,
    passed_bf16,
    quantize_int8,
    verdict_is_current,
    write_bf16_part,
    write_gate,
)
from engines.repository import METADATA_FILE, ModelRepository
from engines.specs import DETECTOR

log = logging.getLogger("engines.identify.int8_gate")
MIN_COSINE = 0.99


def ov_compile(path: Path, precision: str = "fp32") -> Any:
    """A model compiled as the server compiles it: the served configuration (all cores). Its precision hint
    matters: where the CPU has bf16, OpenVINO's default inference precision is bf16, so an FP32 reference compiled
    without the hint would be bf16 (a gate of this file did that until the hint was made explicit)."""
    import openvino as ov

    from engines.runtime.openvino_engine import cpu_config

    return ov.Core().compile_model(str(path), "CPU", cpu_config(usable_cpus(), precision))


def ov_embed(compiled: Any, inputs: np.ndarray, batch: int = 8) -> np.ndarray:
    """The embeddings of ``inputs`` from a compiled member, ``batch`` clips per inference."""
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
    report = json.loads((args.split or report_path(args.repository, ens.name)).read_text())
    # What the verdicts are about: another process replacing a model meanwhile voids them (precision._record).
    measured = {name: repo.load(name).onnx_sha256 for name in (DETECTOR, *ens.members)}
    # Decided before anything is prepared: --keep-int8 keeps the INT8 files there are, and a file another CPU type's
    # verdict vouches for is kept anyway (quantising again would void that verdict).
    to_quantise = [n for n in ens.members
                   if not ((args.keep_int8 and (repo.model_dir(n) / INT8_FILE).is_file()) or int8_vouched(repo, n))]
    if kept := [n for n in ens.members if n not in to_quantise]:
        log.info("gating the INT8 files there are, as they are, for %s", ", ".join(kept))
    records = READERS["casme2"](args.root, args.annotation)
    if not to_quantise:  # no calibration: only the split's clips are prepared (232 of 384 for the project's set)
        wanted = {k for key in SPLIT_KEYS for k in report[key]}
        records = [r for r in records if r.key in wanted]
    clips = prepare_all(records, repo.onnx_path(DETECTOR), ens.spec, args.cache)
    index = {c.record.key: i for i, c in enumerate(clips)}
    enrol = [index[k] for k in report["enrol2_gallery"]]
    test = [index[k] for k in report["test_probes"]]
    unknown = [index[k] for k in report["unknown_probes"]]
    held_out = set(test) | set(unknown)
    calib = [i for i in range(len(clips)) if i not in held_out][: args.calibration] if to_quantise else []
    x_cal = _batch(clips, calib, ens.spec, None).numpy() if to_quantise else None
    parity = enrol + test + unknown
    x_par = _batch(clips, parity, ens.spec, None).numpy()
    bf16 = has_bf16()
    precisions = ["int8", "bf16"] if bf16 else ["int8"]
    files: dict[str, dict[str, Path]] = {"fp32": {}, "int8": {}, "bf16": {}}
    for name in ens.members:
        src = repo.onnx_path(name)
        dst = repo.model_dir(name) / INT8_FILE
        if name in to_quantise:
            assert x_cal is not None  # (made above for every member quantised)
            input_name = repo.load(name).inputs[0].name
            quantize_int8(src, dst, ({input_name: x_cal[i:i + 8]} for i in range(0, len(x_cal), 8)), args.method,
                          keep_fp32=embedding_projection(src))
        files["fp32"][name], files["int8"][name], files["bf16"][name] = src, dst, src
    n_enrol, n_test = len(enrol), len(test)
    labels = [clips[k].record.subject for k in enrol]
    truth = [clips[k].record.subject for k in test]

    compiled: dict[tuple[str, str], Any] = {}  # each member in each precision compiled once, used on both crops

    def embed(precision: str, x: np.ndarray) -> dict[str, np.ndarray]:
        for n in ens.members:
            if (precision, n) not in compiled:
                compiled[precision, n] = ov_compile(files[precision][n], precision)
        return {n: ov_embed(compiled[precision, n], x) for n in ens.members}

    def rank1(chosen: dict[str, np.ndarray]) -> tuple[float, list[str]]:
        gal = [chosen[n][:n_enrol] for n in ens.members]
        prb = [chosen[n][n_enrol:n_enrol + n_test] for n in ens.members]
        ranked = identify(gal, labels, prb, list(ens.members))
        return cmc(ranked, truth, 1)[0], [r[0][0] if r else "" for r in ranked]

    fp32 = embed("fp32", x_par)
    base, base_top = rank1(fp32)

    def check(candidate: dict[str, np.ndarray], label: str) -> dict[str, Any]:
        """Every member's embeddings against all-FP32, and rank-1 with the members whose cosine holds."""
        members = {}
        for name in ens.members:
            cos = cosines(fp32[name], candidate[name])
            members[name] = {"min_cosine": float(cos.min()), "median_cosine": float(np.median(cos)),
                             "cosine_ok": bool(cos.min() >= MIN_COSINE)}
            log.info("%s %s: cosine vs FP32 min %.4f median %.4f over %d clips", name, label, cos.min(),
                     np.median(cos), len(cos))
        quant, top = rank1({n: candidate[n] if members[n]["cosine_ok"] else fp32[n] for n in ens.members})
        changed = sum(a != b for a, b in zip(base_top, top, strict=True))
        return {"members": members, "rank1": quant, "top1_changed": changed, "unchanged": quant == base}

    results = {p: check(embed(p, x_par), p) for p in precisions}
    detector: dict[str, Any] | None = None
    # The detector serves bf16 only where its liveness part passed too: where that part failed on this CPU type, its
    # identification part (and the members' checks on its crops) would change nothing served.
    detector_refused = (verdict_is_current(repo, DETECTOR, "bf16", LIVENESS)
                        and not passed_bf16(repo, DETECTOR, [LIVENESS])[0])
    if bf16 and detector_refused:
        log.info("detector bf16 failed its liveness gate on this CPU type: its identification part is not run")
    elif bf16:  # the same clips with the detector in bf16: its box decides every crop
        # (only the parity clips: nothing else is embedded from these crops)
        clips_b = prepare_all([clips[i].record for i in parity], repo.onnx_path(DETECTOR), ens.spec, args.cache,
                              detector_precision="bf16")
        index_b = {c.record.key: i for i, c in enumerate(clips_b)}
        found = [index_b.get(clips[i].record.key) for i in parity]
        parity_b = [j for j in found if j is not None]
        if len(parity_b) < len(parity):
            detector = {"passed": False,
                        "summary": f"no face found in {len(parity) - len(parity_b)} parity clips in bf16"}
        else:
            x_b = _batch(clips_b, parity_b, ens.spec, None).numpy()
            with_fp32 = check(embed("fp32", x_b), "fp32 on bf16-detector crops")
            boxes_moved = sum(not np.array_equal(clips_b[j].tensor, clips[i].tensor)
                              for i, j in zip(parity, parity_b, strict=True))
            worst = min(m["min_cosine"] for m in with_fp32["members"].values())
            ok = all(m["cosine_ok"] for m in with_fp32["members"].values()) and with_fp32["unchanged"]
            detector = {"passed": ok, "min_cosine": worst, "crops_changed": boxes_moved,
                        "rank1_fp32": base, "rank1_bf16_detector": with_fp32["rank1"],
                        "summary": f"crops of {boxes_moved} of {len(parity)} clips changed; FP32 members' min "
                                   f"cosine {worst:.4f} (gate >= {MIN_COSINE}); rank-1 {with_fp32['rank1']:.4f} "
                                   f"vs FP32 {base:.4f}, {with_fp32['top1_changed']} of {n_test} top-1 changed"}
            if ok:  # every member precision must hold on these crops too, as they would be served together
                for p in precisions:
                    on_b = check(embed(p, x_b), f"{p} on bf16-detector crops")
                    for name, m in results[p]["members"].items():
                        m["cosine_ok"] = m["cosine_ok"] and on_b["members"][name]["cosine_ok"]
                        m["min_cosine_bf16_detector"] = on_b["members"][name]["min_cosine"]
                    results[p]["unchanged"] = results[p]["unchanged"] and on_b["unchanged"]
        log.info("detector bf16 (identification): %s", detector["summary"])
        write_bf16_part(repo, DETECTOR, IDENTIFICATION, {**detector, "parity_clips": len(parity),
                                                         "data": "synthetic clips (no real micro-expression data)"},
                        measured[DETECTOR])
    out: dict[str, Any] = {"rank1_fp32": base}
    for p in precisions:
        r = results[p]
        for name, m in r["members"].items():
            m["passed"] = bool(m["cosine_ok"] and r["unchanged"])
            extra = (f"; with the bf16 detector min cosine {m['min_cosine_bf16_detector']:.4f}"
                     if "min_cosine_bf16_detector" in m else "")
            m["summary"] = (f"min cosine {m['min_cosine']:.4f} over {len(parity)} clips (gate >= {MIN_COSINE})"
                            f"{extra}; ensemble rank-1 on the synthetic test split {r['rank1']:.4f} vs FP32 "
                            f"{base:.4f}, {r['top1_changed']} of {n_test} top-1 persons changed")
            entry = {**m, "rank1_fp32": base, f"rank1_{p}": r["rank1"], "top1_changed": r["top1_changed"],
                     "parity_clips": len(parity), "data": "synthetic clips (no real micro-expression data)"}
            if p == "int8":
                made = {"calibration_clips": len(calib)} if name in to_quantise else {}
                write_gate(repo, name, {**entry, **made, "quantised_here": name in to_quantise}, measured[name])
            else:
                write_bf16_part(repo, name, IDENTIFICATION, entry, measured[name])
        out[p] = {"members": r["members"], f"rank1_{p}": r["rank1"], "top1_changed": r["top1_changed"]}
    if detector is not None:
        out["detector_bf16"] = detector
    if not bf16:
        log.info("this CPU has no bf16 arithmetic: no bf16 gate runs (bf16 is never served here)")
    return out


def stale(repository: Path) -> list[str]:
    """The verdicts this gate writes that do not hold for the served ensemble on this type of CPU (missing, for
    other models, another CPU type, another INT8 file): ``model precision`` each, [] when there is nothing to do."""
    repo, ens = ModelRepository(repository), find_ensemble(repository)
    if ens is None:
        return []
    judged = [(name, "int8") for name in ens.members]
    if has_bf16():
        judged += [(name, "bf16") for name in ens.members]
        # The detector serves bf16 only where the liveness pipeline's part passed too; where it did not, this
        # part would change nothing served, so it alone is no reason to run.
        if (repository / DETECTOR / METADATA_FILE).is_file() and passed_bf16(repo, DETECTOR, [LIVENESS])[0]:
            judged.append((DETECTOR, "bf16"))
    return [f"{name} {kind}" for name, kind in judged if not verdict_is_current(repo, name, kind, IDENTIFICATION)]


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, required=True, help="the (synthetic) CASME II layout the ensemble used")
    p.add_argument("--annotation", type=Path)
    p.add_argument("--cache", type=Path, default=Path(".cache/clips"))
    p.add_argument("--calibration", type=int, default=128, help="training-half clips to calibrate on")
    p.add_argument("--split", type=Path, help="the evaluation split (enrol2_gallery, test_probes, unknown_probes; "
                   "default: the ensemble's training report)")
    p.add_argument("--keep-int8", action="store_true",
                   help="gate the members' INT8 files as they are (an installed bundle's) instead of quantising")


def main(argv: list[str] | None = None) -> int:
    return gate_main(__doc__.splitlines()[0], argv, arguments, run)


if __name__ == "__main__":
    sys.exit(main())
