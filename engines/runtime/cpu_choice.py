"""``auto`` on the CPU: run each CPU runtime (and each reduced-precision variant that passed its parity gate) on
the model's warm-up input at batch 1 and at its largest measured batch, and keep the fastest over both, per model
and machine class (CPU model and core count), measured once and cached beside the model, with the numbers that
decided it (they become the reason ListModels shows)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.atomic_write import write_atomically
from engines.declarations import BF16, IDENTIFICATION, INT8, ONNXRUNTIME, OPENVINO, ModelDeclaration
from engines.file_lock import once
from engines.identify.ensemble import find_ensemble
from engines.machine import machine_class
from engines.precision import INT8_FILE, passed_bf16, passed_int8
from engines.repository import ModelRepository
from engines.runtime.base import EngineInstance, Model

log = logging.getLogger(__name__)
CHOICE_FILE = "cpu-runtime.json"
# OpenVINO serving the INT8 variant (model.int8.onnx); measured, so chosen, only when its gate passed (checked on
# every choice, cached or not: a cached entry's key names the INT8 file the gate passed).
OPENVINO_INT8 = "openvino-int8"
# OpenVINO with its bf16 inference precision (the FP32 file): only where the CPU has bf16 arithmetic and the gate
# of every pipeline using the model passed on this machine class.
OPENVINO_BF16 = "openvino-bf16"
# Below this advantage the more exact candidate stays (ONNX Runtime over OpenVINO, FP32 over bf16, bf16 over INT8):
# a few per cent is within run-to-run noise.
MIN_GAIN = 1.10
# auto's measurement: each candidate runs each batch size for a slice of SLICE_S in each of ROUNDS rounds (0.4 s a
# size in all, as two rounds of 0.2 s were).
ROUNDS = 8
SLICE_S = 0.05


def items_per_s(model: Model, decl: ModelDeclaration, batch: int, seconds: float) -> float:
    inst = model.new_instance()
    inputs = decl.warmup_batch(batch)
    inst.infer(inputs)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        inst.infer(inputs)
        n += 1
    rate = n * batch / (time.perf_counter() - t0)
    inst.close()
    return rate


def measured_batches(decl: ModelDeclaration) -> list[int]:
    """Batch 1 and the largest batch measured: 8, or less where the model's batches are smaller."""
    return sorted({1, max(1, min(8, decl.batching.max_batch_size))})


def measure(repo: ModelRepository, decl: ModelDeclaration, threads: int, seconds: float = SLICE_S,
            int8: Path | None = None, bf16: bool = False, rounds: int = ROUNDS,
            static: Sequence[int] = ()) -> dict[str, Any]:
    """Items/s of each candidate at each of ``measured_batches`` (``fastest_rates``). OpenVINO runs the sizes in
    ``static`` on static-shape models, as the server will."""
    from engines.runtime.onnxruntime_engine import OnnxRuntimeModel
    from engines.runtime.openvino_engine import OpenVinoModel

    meta = repo.load(decl.name)
    batches = measured_batches(decl)
    candidates: list[tuple[str, Any]] = [
        (ONNXRUNTIME, lambda: OnnxRuntimeModel(repo.onnx_path(decl.name), meta, ["CPUExecutionProvider"], threads)),
        (OPENVINO, lambda: OpenVinoModel(repo.onnx_path(decl.name), meta, threads, static_batches=static))]
    if int8 is not None:
        candidates.append((OPENVINO_INT8, lambda: OpenVinoModel(int8, meta, threads, precision="int8",
                                                                static_batches=static)))
    if bf16:
        candidates.append((OPENVINO_BF16, lambda: OpenVinoModel(repo.onnx_path(decl.name), meta, threads,
                                                                precision="bf16", static_batches=static)))
    models: dict[str, Model] = {}
    for name, make in candidates:
        try:
            models[name] = make()
        except Exception as exc:  # a runtime that cannot load the model simply loses
            log.warning("%s: %s cannot run it: %s", decl.name, name, exc)
    try:
        rates = fastest_rates(models, {b: decl.warmup_batch(b) for b in batches}, rounds, seconds)
    finally:
        for model in models.values():
            model.close()
    return {"batches": batches, "threads": threads, "items_per_s": rates, "measured_at": time.time(),
            "method": f"fastest call in {rounds} interleaved rounds of {seconds * 1e3:.0f} ms slices"}


def fastest_rates(models: Mapping[str, Model], inputs: Mapping[int, Mapping[str, np.ndarray]], rounds: int,
                  seconds: float) -> dict[str, dict[str, float]]:
    """Items/s of each model at each batch size in ``inputs``: batch / its fastest single call, over ``rounds``
    rounds in which every model runs every size for a slice of ``seconds``, in turn.

    The host's speed drifts by +-15 % within seconds and stalls for longer (other tenants), and a slow spell only
    ever adds time to a call, so each candidate's fastest call is its speed on a quiet machine; short slices in
    many rounds give every candidate calls in the quiet spells. Rates over a few long slices, as before, let one
    spell decide: on a noisy start a SlowFast member's INT8 read 1.16x its bf16 (454 / 311 against 312 / 335
    items/s at batch 1 / 8; quietly it is 0.88x) and was served."""
    instances = {name: model.new_instance() for name, model in models.items()}
    fastest = {name: dict.fromkeys(inputs, math.inf) for name in models}  # seconds a call, per batch size
    try:
        for inst in instances.values():  # first calls allocate and tune: not measured
            for x in inputs.values():
                inst.infer(x)
        for _ in range(rounds):
            for batch, x in inputs.items():
                for name, inst in instances.items():
                    fastest[name][batch] = min(fastest[name][batch], _fastest_call(inst, x, seconds))
    finally:
        for inst in instances.values():
            inst.close()
    return {name: {str(b): b / t for b, t in by_batch.items()} for name, by_batch in fastest.items()}


def _fastest_call(inst: EngineInstance, x: Mapping[str, np.ndarray], seconds: float) -> float:
    """The fastest of the calls made in a slice of ``seconds`` (at least one)."""
    fastest = math.inf
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        inst.infer(x)
        t1 = time.perf_counter()
        fastest = min(fastest, t1 - t0)
        if t1 >= end:
            return fastest


def overall(rates: dict[str, float]) -> float:
    """One number per candidate: the geometric mean of its items/s over the batch sizes measured, so a runtime
    that is faster at batch 8 but slower at batch 1 (where a lightly loaded server runs) does not win on the
    batch-8 figure alone."""
    values = [v for v in rates.values() if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 0.0


# From the most exact to the least: each candidate is served only if clearly faster than every more exact one.
EXACTNESS = (ONNXRUNTIME, OPENVINO, OPENVINO_BF16, OPENVINO_INT8)


def decide(rates: dict[str, dict[str, float]]) -> str:
    """The most exact candidate that is not clearly slower, by MIN_GAIN on ``overall``: down ``EXACTNESS``, ONNX
    Runtime FP32 (the incumbent) stays unless OpenVINO FP32 beats it, bf16 is served only if it beats both FP32
    runtimes, and INT8 only if it beats those and bf16. A passed gate bounds a variant's error but does not make it
    zero, and measurements a few per cent apart swap places from one start to the next (on the Zen 1 EPYC the
    members' INT8 and OpenVINO FP32 measured 95-105 and 97-121 items/s; on an AMX Xeon one member's INT8 read 1.07x
    its bf16 on one start and 0.88-0.89x on two others: judged on the reading alone, either was served)."""
    scores = {name: overall(by_batch) for name, by_batch in rates.items()}
    chosen, best_exact = ONNXRUNTIME, scores.get(ONNXRUNTIME, 0.0)
    for name in EXACTNESS[1:]:
        if name in scores:
            if scores[name] > MIN_GAIN * best_exact:
                chosen = name
            best_exact = max(best_exact, scores[name])
    return chosen


def gated_pipelines(repo: ModelRepository, decl: ModelDeclaration) -> tuple[str, ...]:
    """The pipelines whose gates a variant of this model must pass here: those that use it and are served (the
    identification pipeline only where the repository has an ensemble)."""
    served = find_ensemble(repo.root) is not None
    return tuple(p for p in decl.pipelines if p != IDENTIFICATION or served)


def _int8_offer(repo: ModelRepository, decl: ModelDeclaration, allowed: bool) -> tuple[dict[str, Any] | None, str]:
    """(gate entry, why): the INT8 variant may be measured only if allowed, declared and its gate passed."""
    if not allowed:
        return None, "INT8 not allowed by the settings"
    if INT8 not in decl.cpu_precisions:
        return None, "INT8 not declared for this model"
    return passed_int8(repo, decl.name)


def _bf16_offer(repo: ModelRepository, decl: ModelDeclaration, allowed: bool) -> tuple[bool, str]:
    """(offered, why): bf16 may be measured only if allowed, declared and the gates of its served pipelines
    passed here."""
    if not allowed:
        return False, "bf16 not allowed by the settings"
    if BF16 not in decl.cpu_precisions:
        return False, "bf16 not declared for this model"
    return passed_bf16(repo, decl.name, gated_pipelines(repo, decl))


def _cached(path: Path) -> dict[str, Any]:
    """The measurements kept beside the model; one that cannot be read (a hand edit, a disk error) is only a
    cache miss: the model is measured again and the file replaced."""
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s: cannot read %s (%s); measuring again", path.parent.name, path.name, exc)
        return {}
    return entries if isinstance(entries, dict) else {}


def _write(path: Path, entries: dict[str, Any]) -> None:
    """Replace the file whole (a reader sees the old entries or the new, never half); a repository that cannot be
    written only costs measuring again at the next start."""
    try:
        write_atomically(path, json.dumps(entries, indent=2))
    except OSError as exc:
        log.warning("%s: auto's measurements are not kept (%s); the next start measures again", path.parent.name,
                    exc)


def choose_cpu_runtime(repo: ModelRepository, decl: ModelDeclaration, threads: int, allow_int8: bool = True,
                       allow_bf16: bool = True, static_batches: int = 0) -> tuple[str, str]:
    """(runtime, why) for this model on this machine class; measured on first use, then read from the cache."""
    if OPENVINO not in decl.runtimes:
        return ONNXRUNTIME, "onnxruntime (the only CPU runtime the model declares)"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return ONNXRUNTIME, "onnxruntime (openvino is not installed)"
    gate, int8_why = _int8_offer(repo, decl, allow_int8)
    bf16, bf16_why = _bf16_offer(repo, decl, allow_bf16)
    int8 = repo.model_dir(decl.name) / INT8_FILE if gate is not None else None
    path = repo.model_dir(decl.name) / CHOICE_FILE
    static = [b for b in measured_batches(decl) if b <= static_batches]
    # "choice=4": entries from before the choice measured batch 1 as well (2), before OpenVINO ran those batch
    # sizes on static-shape models as the server does (3), or before it timed the fastest call (4) are measured
    # again.
    key = (f"{machine_class()}|threads={threads}|onnx={repo.load(decl.name).onnx_sha256[:12]}"
           f"|int8={gate['int8_sha256'][:12] if gate is not None else 'none'}|bf16={'yes' if bf16 else 'no'}"
           f"|static={','.join(map(str, static)) or 'none'}|choice=4")

    def measure_and_keep() -> dict[str, Any]:
        entry = measure(repo, decl, threads, int8=int8, bf16=bf16, static=static)
        _write(path, {**_cached(path), key: entry})
        return entry

    # One process measures; the others starting on this repository (--workers, replicas on one volume) wait for its
    # entry and read it, so they serve the same choice and no measurement shares the cores with another.
    entry = once(path.with_name(f".{CHOICE_FILE}.lock"), lambda: _cached(path).get(key), measure_and_keep)
    rates = entry["items_per_s"]
    chosen = decide(rates)
    batches = [str(b) for b in entry["batches"]]
    measured = ", ".join(f"{r} " + " / ".join(f"{v[b]:.0f}" for b in batches if b in v)
                         for r, v in sorted(rates.items(), key=lambda kv: -overall(kv[1])))
    why = (f"{chosen} (auto: {measured} items/s at batch {' / '.join(batches)}, {entry['threads']} thread(s), "
           f"measured on {machine_class()}; {int8_why}; {bf16_why})")
    return chosen, why
