"""Train and evaluate a SlowFast ensemble for person identification from micro-expression clips.

``python -m engines.identify.train --dataset casme2 --root DIR --out model_repository --ensemble NAME``

Protocols:
- ``paper``: per subject, a 50/50 clip-level split (same people in train and test); rank-1 accuracy.
- ``sessions``: the stricter one a user needs: networks and gallery from some recording sessions, probes from
  the others; rank-k (CMC).
In both, a validation split is carved from the training half and is the only data used to choose the ensemble
members and the open-set threshold; subjects held out entirely (``--unknown``) provide the impostors for the
threshold (validation half) and for the reported NO_MATCH rate (test half). The test split is used once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engines.atomic_write import write_atomically
from engines.declarations import slowfast_member
from engines.identify.datasets import READERS
from engines.identify.ensemble import ensemble_version
from engines.identify.matching import choose_threshold, person_scores, rank
from engines.identify.preprocess import PreparedClip, prepare_all
from engines.models.slowfast import PRESETS, SlowFast, SlowFastConfig
from engines.repository import ModelMetadata, ModelRepository
from engines.vision.clip_window import ClipSpec
from engines.weights import sha256_file

log = logging.getLogger("engines.identify.train")


@dataclass(frozen=True)
class Member:
    name: str
    optimizer: str  # adam | adamw
    lr: float
    weight_decay: float
    seed: int


DEFAULT_MEMBERS = (
    Member("m0", "adam", 1e-3, 0.0, 0),
    Member("m1", "adamw", 1e-3, 0.05, 1),
    Member("m2", "adam", 2e-3, 0.0, 2),
)


@dataclass
class Split:
    train: list[int]
    val: list[int]
    test: list[int]
    val_impostors: list[int]
    test_impostors: list[int]
    known: list[str]


def make_split(clips: Sequence[PreparedClip], protocol: str, unknown: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    subjects = sorted({c.record.subject for c in clips})
    unknown_subjects = subjects[-unknown:] if unknown else []
    known = [s for s in subjects if s not in unknown_subjects]
    split = Split([], [], [], [], [], known)
    for i, s in enumerate(unknown_subjects):
        idx = [k for k, c in enumerate(clips) if c.record.subject == s]
        (split.val_impostors if i % 2 == 0 else split.test_impostors).extend(idx)
    for s in known:
        idx = [k for k, c in enumerate(clips) if c.record.subject == s]
        if protocol == "sessions":
            sessions = sorted({clips[k].record.session for k in idx})
            first = sessions[0]
            half = [k for k in idx if clips[k].record.session == first]
            test = [k for k in idx if clips[k].record.session != first]
        else:
            perm = list(rng.permutation(idx))
            half, test = perm[: len(perm) // 2], perm[len(perm) // 2:]
        n_val = max(1, len(half) // 4)
        split.val.extend(half[:n_val])
        split.train.extend(half[n_val:])
        split.test.extend(test)
    return split


def _batch(clips: Sequence[PreparedClip], idx: Sequence[int], spec: ClipSpec, rng: np.random.Generator | None
           ) -> torch.Tensor:
    """Random temporal/spatial offsets when training (rng given), centre crops otherwise."""
    out = np.empty((len(idx), 3, spec.clip_len, spec.size, spec.size), np.float32)
    for j, k in enumerate(idx):
        t = clips[k].tensor
        dt = int(rng.integers(0, 2 * spec.margin_frames + 1)) if rng is not None else spec.margin_frames
        dy, dx = ((int(rng.integers(0, spec.margin_px + 1)), int(rng.integers(0, spec.margin_px + 1)))
                  if rng is not None else (spec.margin_px // 2, spec.margin_px // 2))
        out[j] = t[:, dt:dt + spec.clip_len, dy:dy + spec.size, dx:dx + spec.size]
    return torch.from_numpy(out)


def static_variant(batch: torch.Tensor) -> torch.Tensor:
    """The control: every frame replaced by the middle (apex) frame, so no motion is left."""
    mid = batch.shape[2] // 2
    return batch[:, :, mid:mid + 1].expand_as(batch).contiguous()


@torch.no_grad()
def embed(model: SlowFast, clips: Sequence[PreparedClip], idx: Sequence[int], spec: ClipSpec,
          static: bool = False) -> np.ndarray:
    model.eval()
    outs = []
    for i in range(0, len(idx), 32):
        x = _batch(clips, idx[i:i + 32], spec, None)
        outs.append(model(static_variant(x) if static else x).numpy())
    return np.concatenate(outs) if outs else np.zeros((0, model.cfg.embed_dim), np.float32)


def identify(gallery: list[np.ndarray], gallery_labels: Sequence[str], probes: list[np.ndarray],
             members: Sequence[str]) -> list[list[tuple[str, float]]]:
    """For each probe, the ensemble's ranked candidates (person, score), using the server's matching code."""
    ranked = []
    for p in range(len(probes[0])):
        scores = [person_scores(probes[m][p], gallery[m], gallery_labels) for m in range(len(members))]
        cands, _ = rank(scores, members)
        ranked.append([(c.person, c.score) for c in cands])
    return ranked


def cmc(ranked: list[list[tuple[str, float]]], truth: Sequence[str], k_max: int = 5) -> list[float]:
    hits = np.zeros(k_max)
    for cands, t in zip(ranked, truth, strict=True):
        names = [c[0] for c in cands]
        if t in names:
            pos = names.index(t)
            hits[pos:] += pos < k_max
    return (hits / max(1, len(truth))).tolist()


def train_member(member: Member, cfg: SlowFastConfig, clips: list[PreparedClip], split: Split, spec: ClipSpec,
                 epochs: int, batch_size: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    torch.manual_seed(member.seed)
    rng = np.random.default_rng(member.seed)
    classes = {s: i for i, s in enumerate(split.known)}
    labels = torch.tensor([classes[clips[k].record.subject] for k in split.train])
    model = SlowFast(cfg, num_classes=len(classes))
    opt_cls = torch.optim.AdamW if member.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=member.lr, weight_decay=member.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=member.lr, total_steps=epochs * (
        (len(split.train) + batch_size - 1) // batch_size), pct_start=0.2)
    best: tuple[float, int, dict[str, torch.Tensor]] = (-1.0, -1, {})
    history = []
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(split.train))
        losses = []
        for i in range(0, len(order), batch_size):
            sel = order[i:i + batch_size]
            x = _batch(clips, [split.train[j] for j in sel], spec, rng)
            y = labels[sel]
            loss = F.cross_entropy(model.logits(model(x), y), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        if epoch >= epochs // 3 or epoch == epochs - 1:
            gal = embed(model, clips, split.train, spec)
            val = embed(model, clips, split.val, spec)
            ranked = identify([gal], [clips[k].record.subject for k in split.train], [val], [member.name])
            acc = cmc(ranked, [clips[k].record.subject for k in split.val], 1)[0]
            history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_rank1": acc})
            if acc >= best[0]:
                best = (acc, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
            log.info("%s epoch %d loss %.3f val rank-1 %.3f (%.0fs)", member.name, epoch, np.mean(losses), acc,
                     time.time() - t0)
    return best[2], {"member": asdict(member), "best_epoch": best[1], "val_rank1": best[0], "history": history,
                     "train_seconds": time.time() - t0}


def load_member(cfg: SlowFastConfig, state: dict[str, torch.Tensor]) -> SlowFast:
    model = SlowFast(cfg, num_classes=state["centres"].shape[0])
    model.load_state_dict(state)
    return model.eval()


def evaluate_ensemble(models: dict[str, SlowFast], clips: list[PreparedClip], split: Split, spec: ClipSpec,
                      gallery_idx: list[int], probe_idx: list[int], static: bool = False) -> dict[str, Any]:
    names = list(models)
    gal = [embed(models[n], clips, gallery_idx, spec) for n in names]
    prb = [embed(models[n], clips, probe_idx, spec, static=static) for n in names]
    gl = [clips[k].record.subject for k in gallery_idx]
    truth = [clips[k].record.subject for k in probe_idx]
    per_member = {n: cmc(identify([gal[i]], gl, [prb[i]], [n]), truth, 1)[0] for i, n in enumerate(names)}
    ranked = identify(gal, gl, prb, names)
    return {"members": per_member, "cmc": cmc(ranked, truth), "rank1": cmc(ranked, truth, 1)[0],
            "probes": len(probe_idx), "gallery_clips": len(gallery_idx), "ranked": ranked, "truth": truth}


def export_members(models: dict[str, SlowFast], cfg: SlowFastConfig, spec: ClipSpec, repo: ModelRepository,
                   ensemble: str, report: dict[str, Any]) -> dict[str, Any]:
    from engines.export import export_onnx, verify_onnx

    names = []
    for member, model in models.items():
        name = f"{ensemble}_{member}"
        path = repo.onnx_path(name)
        serving = SlowFast(cfg)
        serving.load_state_dict({k: v for k, v in model.state_dict().items() if k != "centres"}, strict=True)
        serving.eval()
        example = torch.rand(2, 3, cfg.clip_len, cfg.size, cfg.size) * 255
        # The exported graph is the inference form (time-folded fast stem); it is checked against the trained one.
        export_onnx(serving.for_inference(), example, path, "clip", ["embedding"])
        sample = np.zeros((3, cfg.clip_len, cfg.size, cfg.size), np.float32)
        sample.flat[1] = 255.0
        diff = verify_onnx(serving, path, sample, batch_sizes=(1, 3)).max_abs_diff
        if diff > 1e-4:
            raise RuntimeError(f"{name}: ONNX differs from torch by {diff:.2e}")
        decl = slowfast_member(name, cfg.clip_len, cfg.size, cfg.embed_dim)
        repo.save(ModelMetadata(
            name=name, version="1", inputs=decl.inputs, outputs=decl.outputs,
            onnx_sha256=sha256_file(path), preprocessing={"kind": decl.kind, "slowfast": cfg.to_dict(),
                                                          "clip": asdict(spec), "verified_max_abs_diff": diff},
            max_batch_size=64,
        ))
        names.append(name)
    version = ensemble_version([repo.load(n).onnx_sha256 for n in names])
    manifest = {"name": ensemble, "version": version, "members": names, "threshold": report["threshold"],
                "margin": report["margin"], "clip": asdict(spec), "slowfast": cfg.to_dict(),
                "trained_on": report["dataset"], "evaluation": report["summary"]}
    d = repo.root / "ensembles"
    d.mkdir(parents=True, exist_ok=True)
    write_atomically(d / f"{ensemble}.json", json.dumps(manifest, indent=2))
    return manifest


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = PRESETS[args.preset]
    spec = ClipSpec(clip_len=cfg.clip_len, fps=cfg.fps, size=cfg.size)
    records = READERS[args.dataset](args.root, args.annotation)
    if not records:
        raise SystemExit(f"no clips found under {args.root}")
    repo = ModelRepository(args.out)
    detector = repo.onnx_path("retinaface")
    t0 = time.time()
    clips = prepare_all(records, detector, spec, args.cache)
    log.info("prepared %d of %d clips in %.0fs", len(clips), len(records), time.time() - t0)
    split = make_split(clips, args.protocol, args.unknown, args.seed)
    torch.set_num_threads(args.threads)
    members = [replace(m, seed=m.seed + args.seed) for m in DEFAULT_MEMBERS[: args.members]]
    trained: dict[str, SlowFast] = {}
    member_reports = []
    for m in members:
        state, rep = train_member(m, cfg, clips, split, spec, args.epochs, args.batch_size)
        trained[m.name] = load_member(cfg, state)
        member_reports.append(rep)
    # Ensemble: the subset of members with the best validation rank-1 (ties: the larger ensemble).
    best_subset, best_acc = None, -1.0
    for r in range(len(trained), 0, -1):
        for subset in itertools.combinations(trained, r):
            acc = evaluate_ensemble({n: trained[n] for n in subset}, clips, split, spec, split.train,
                                    split.val)["rank1"]
            if acc > best_acc:
                best_subset, best_acc = subset, acc
    assert best_subset is not None
    chosen = {n: trained[n] for n in best_subset}
    gallery = split.train + split.val  # the whole training half enrols at test time
    # Open-set threshold on validation only: genuine = correct top-1 scores of validation probes,
    # impostor = top-1 scores of the validation-only unknown subjects.
    val_eval = evaluate_ensemble(chosen, clips, split, spec, split.train, split.val + split.val_impostors)
    n_val = len(split.val)
    genuine = [c[0][1] for c, t in zip(val_eval["ranked"][:n_val], val_eval["truth"][:n_val], strict=True)
               if c and c[0][0] == t]
    impostor = [c[0][1] for c in val_eval["ranked"][n_val:] if c]
    threshold = choose_threshold(genuine, impostor)
    test = evaluate_ensemble(chosen, clips, split, spec, gallery, split.test)
    static = evaluate_ensemble(chosen, clips, split, spec, gallery, split.test, static=True)
    # The server check: enrol 2 clips per person (the first two of the training half), identify the test half.
    enrol2 = [k for s in split.known for k in [i for i in gallery if clips[i].record.subject == s][:2]]
    test_enrol2 = evaluate_ensemble(chosen, clips, split, spec, enrol2, split.test)
    unknown_eval = (evaluate_ensemble(chosen, clips, split, spec, gallery, split.test_impostors)
                    if split.test_impostors else None)
    no_match_rate = (float(np.mean([not c or c[0][1] < threshold for c in unknown_eval["ranked"]]))
                     if unknown_eval else None)
    summary = {
        "protocol": args.protocol, "identities": len(split.known), "unknown_subjects": args.unknown,
        "ensemble": list(best_subset), "val_rank1": best_acc, "threshold": threshold,
        "test_rank1": test["rank1"], "test_cmc": test["cmc"], "test_members": test["members"],
        "static_control_rank1": static["rank1"], "enrol2_rank1": test_enrol2["rank1"],
        "unknown_no_match_rate": no_match_rate, "chance": 1 / max(1, len(split.known)),
    }
    report = {"dataset": {"name": args.dataset, "root": str(args.root), "clips": len(clips),
                          "synthetic": (args.root / "synthetic.json").is_file()},
              "threshold": threshold, "margin": args.margin, "summary": summary, "members": member_reports,
              "enrol2_gallery": [clips[k].record.key for k in enrol2],
              "test_probes": [clips[k].record.key for k in split.test],
              "unknown_probes": [clips[k].record.key for k in split.test_impostors]}
    if args.ensemble:
        report["manifest"] = export_members(chosen, cfg, spec, repo, args.ensemble, report)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(READERS), default="casme2")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--annotation", type=Path)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--protocol", choices=["paper", "sessions"], default="paper")
    p.add_argument("--unknown", type=int, default=0, help="subjects held out entirely as impostors")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--margin", type=float, default=0.05, help="UNCERTAIN band below the threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("model_repository"))
    p.add_argument("--ensemble", help="export the chosen ensemble under this name into --out")
    p.add_argument("--cache", type=Path, default=Path(".cache/clips"))
    p.add_argument("--report", type=Path, help="write the evaluation report (JSON) here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report = run(args)
    text = json.dumps(report, indent=1, default=str)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text)
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
