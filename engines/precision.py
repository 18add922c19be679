"""Reduced-precision CPU variants of a model, served only behind a parity gate.

INT8: post-training static quantisation with ONNX Runtime's quantiser (QDQ format, per-channel signed weights,
unsigned activations, calibrated on the model's own inputs), written beside the FP32 model as ``model.int8.onnx``.
OpenVINO reads the QDQ graph and runs the convolutions in INT8. A variant is offered to the runtime choice only
if its gate passed, the result of which is written at model preparation to ``precision.json`` with the numbers
that decided it and the hash of the FP32 model it was made from (a retrained model invalidates it).

bf16 needs no file: it is OpenVINO's inference precision hint, offered only where the CPU has bf16 arithmetic
(AVX512-BF16 or AMX, as OpenVINO detects it). Its gate is run by each pipeline that uses the model, on this
type of CPU, and each writes its own part of the model's ``bf16`` entry (the detector serves both pipelines,
so it needs both parts where an identification ensemble is served); bf16 is offered only where every part it
needs passed, for the current FP32 model, on this type of CPU.

Verdicts are kept per CPU type (``{"format": 2, "cpu_types": {type: {"int8": ..., "bf16": {"parts": ...}}}}``): a
gate writes its own type's and keeps the others', so pods of two CPU types sharing one models volume each find
their own verdicts current instead of re-running the gates after each other. Verdicts for an FP32 model (or an INT8
file) the repository no longer has are dropped on the next write, which bounds the file. The INT8 file is one per
model, whatever the type: a gate on another type gates the file another type's verdict vouches for as it is
(``int8_vouched``) rather than quantising again, which would void those verdicts.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.atomic_write import write_atomically
from engines.file_lock import exclusive
from engines.machine import cpu_type, has_bf16, is_this_type
from engines.repository import ModelRepository
from engines.weights import sha256_file

INT8_FILE = "model.int8.onnx"
GATE_FILE = "precision.json"
GATE_LOCK = ".gate.lock"  # in the repository: held by each gate while it runs, and by an ensemble install
log = logging.getLogger(__name__)
_UNREADABLE: set[Path] = set()  # verdict files this process warned of
FORMAT = 2  # verdicts kept per CPU type (format 1, with no "format" key: one verdict each, of one type)


def quantize_int8(src: Path, dst: Path, calibration: Iterable[Mapping[str, np.ndarray]],
                  method: str = "MinMax", keep_fp32: Sequence[str] = ()) -> None:
    """Write the INT8 (QDQ) variant of ``src`` to ``dst``, calibrated on ``calibration`` (input name -> batch)
    with ONNX Runtime's calibration ``method`` (MinMax, Entropy or Percentile); the nodes named in ``keep_fp32``
    are left unquantised."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = iter([dict(b) for b in calibration])

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)  # shapes and folding the quantiser needs
        out = dst.with_suffix(".tmp.onnx")
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod[method], nodes_to_exclude=list(keep_fp32))
        out.replace(dst)


def _entries(path: Path) -> dict[str, Any]:
    """The file's JSON object; {} where there is none or it cannot be read (a hand edit, a disk error): its
    models then serve FP32 until a gate runs and writes the file afresh."""
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        if path not in _UNREADABLE:  # once a process: every model choice reads the file again
            _UNREADABLE.add(path)
            log.warning("%s cannot be read (%s): no verdicts are taken from it", path, exc)
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_entries(path: Path, entries: Mapping[str, Any]) -> None:
    write_atomically(path, json.dumps(entries, indent=2))


def stored_verdicts(directory: Path) -> dict[str, dict[str, Any]]:
    """Every CPU type's verdicts for the model in ``directory``: type -> ``{"int8": entry, "bf16": {"parts":
    {pipeline: entry}}}``. A file written before verdicts were kept per type (a bundle packed then, a volume
    written then) held one INT8 entry and one bf16 part per pipeline, each naming its type or machine class: each is
    read under the name it recorded (one naming none, under "")."""
    raw = _entries(directory / GATE_FILE)
    if "cpu_types" in raw:
        blocks = raw["cpu_types"] if isinstance(raw["cpu_types"], dict) else {}
        return {str(t): _well_formed(block) for t, block in blocks.items() if isinstance(block, dict)}
    types: dict[str, dict[str, Any]] = {}
    for kind, pipeline, entry in _each(_well_formed(raw)):
        _put(types.setdefault(str(entry.get("machine", "")), {}), kind, pipeline, entry)
    return types


def _well_formed(block: Mapping[str, Any]) -> dict[str, Any]:
    """A type's verdicts with only what has the shape the readers expect (an entry is an object): a hand-edited
    file loses what it broke, and nothing else."""
    out: dict[str, Any] = {}
    if isinstance(block.get("int8"), dict):
        out["int8"] = block["int8"]
    bf16 = block.get("bf16")
    parts = bf16.get("parts") if isinstance(bf16, dict) else None
    if isinstance(parts, dict) and (kept := {str(p): e for p, e in parts.items() if isinstance(e, dict)}):
        out["bf16"] = {"parts": kept}
    return out


def _split(types: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(this type's verdicts, the other types'): an old file may name this type twice, by its type and by its
    machine class (the type and a CPU count), so this type's blocks are merged."""
    here: dict[str, Any] = {}
    others: dict[str, dict[str, Any]] = {}
    for recorded, block in types.items():
        if not is_this_type(recorded):
            others[recorded] = dict(block)
            continue
        for kind, pipeline, entry in _each(block):
            _put(here, kind, pipeline, entry)
    return here, others


def verdicts_here(directory: Path) -> dict[str, Any]:
    """This CPU type's verdicts for the model in ``directory`` ({} where none)."""
    return _split(stored_verdicts(directory))[0]


def _each(block: Mapping[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(kind, pipeline, entry) of every verdict in one type's block: its INT8 entry ("int8", "") and its bf16
    parts ("bf16", pipeline)."""
    if "int8" in block:
        yield "int8", "", block["int8"]
    for pipeline, part in block.get("bf16", {}).get("parts", {}).items():
        yield "bf16", pipeline, part


def _put(block: dict[str, Any], kind: str, pipeline: str, entry: dict[str, Any]) -> None:
    """Set one verdict of a type's block (``_each``'s inverse)."""
    if kind == "int8":
        block["int8"] = entry
    else:
        block.setdefault("bf16", {"parts": {}})["parts"][pipeline] = entry


def _still_valid(block: Mapping[str, Any], onnx_sha256: str, int8_sha256: str) -> dict[str, Any]:
    """The verdicts of ``block`` that are about the FP32 model (and INT8 file) the repository has now: no other can
    hold again."""
    kept: dict[str, Any] = {}
    for kind, pipeline, entry in _each(block):
        if entry.get("source_onnx_sha256") == onnx_sha256 and (
                kind != "int8" or entry.get("int8_sha256") == int8_sha256):
            _put(kept, kind, pipeline, entry)
    return kept


def _record(repo: ModelRepository, name: str, kind: str, pipeline: str, result: Mapping[str, Any],
            measured: str | None) -> bool:
    """Record a gate's outcome (``passed`` and its numbers) for ``name`` on this CPU type: its INT8 verdict
    (``kind`` "int8") or one pipeline's bf16 part. The entry names the FP32 model, the CPU type and, for INT8, the
    file it was measured on; every other verdict of this type and of the others is kept where it still holds.
    Where the FP32 model is no longer the one the gate ``measured`` (its sha256 when the gate began; another process
    replaced it while the gate ran, as a pod of another image version on a shared volume could), nothing is
    written: the verdict would name a model it was not measured on. False then."""
    directory = repo.model_dir(name)
    onnx_sha256, int8_sha256 = _files_now(repo, name)
    if measured is not None and measured != onnx_sha256:
        log.warning("%s: its FP32 model changed while the gate ran (measured %s, now %s); its verdict is not recorded",
                    name, measured[:12], onnx_sha256[:12])
        return False
    entry = {**result, "source_onnx_sha256": onnx_sha256, "machine": cpu_type()}
    if kind == "int8":
        entry["int8_sha256"] = int8_sha256
    here, types = _split(stored_verdicts(directory))
    _put(here, kind, pipeline, entry)
    types[cpu_type()] = here
    kept = {t: v for t, v in ((t, _still_valid(b, onnx_sha256, int8_sha256)) for t, b in types.items()) if v}
    _write_entries(directory / GATE_FILE, {"format": FORMAT, "cpu_types": kept})
    return True


def write_gate(repo: ModelRepository, name: str, result: Mapping[str, Any], measured: str | None = None) -> bool:
    """Record an INT8 gate's outcome for this CPU type (``_record``; ``measured``: the FP32 model's sha256 when the
    gate began)."""
    return _record(repo, name, "int8", "", result, measured)


def adopt_verdicts(repo: ModelRepository, name: str, source: Path) -> list[str]:
    """Add to ``name``'s verdicts those in the model folder ``source`` (a bundle's copy of the same model) for CPU
    types the repository has none for, where they are about its files (an INT8 verdict about another INT8 file is
    not); the types added."""
    directory = repo.model_dir(name)
    onnx_sha256, int8_sha256 = _files_now(repo, name)
    have = stored_verdicts(directory)
    added = {t: v for t, b in stored_verdicts(source).items()
             if t not in have and (v := _still_valid(b, onnx_sha256, int8_sha256))}
    if added:
        _write_entries(directory / GATE_FILE, {"format": FORMAT, "cpu_types": {**have, **added}})
    return sorted(added)


def _int8_digest(directory: Path) -> str:
    """The sha256 of the model's INT8 file, "" where there is none."""
    file = directory / INT8_FILE
    return sha256_file(file) if file.is_file() else ""


def _files_now(repo: ModelRepository, name: str) -> tuple[str, str]:
    """(FP32 model sha256, INT8 file sha256 or ""): the files a verdict must name to hold for ``name`` now."""
    return repo.load(name).onnx_sha256, _int8_digest(repo.model_dir(name))


def int8_vouched(repo: ModelRepository, name: str) -> bool:
    """Whether the model's INT8 file is one an INT8 gate measured, on any CPU type, for the FP32 model the
    repository has now. A gate then keeps it as it is: quantising again (the calibration runs in FP32 on this CPU,
    so the file need not come out byte for byte the same) would void the other types' verdicts on a shared
    volume."""
    onnx_sha256, digest = _files_now(repo, name)
    return bool(digest) and any("int8" in _still_valid(b, onnx_sha256, digest)
                                for b in stored_verdicts(repo.model_dir(name)).values())


def _entry(block: Mapping[str, Any], kind: str, pipeline: str = "") -> Any:
    """A block's INT8 entry (``kind`` "int8") or its bf16 part for ``pipeline``; None where it has none."""
    return block.get("int8") if kind == "int8" else block.get("bf16", {}).get("parts", {}).get(pipeline)


def _why_not(types: Mapping[str, Mapping[str, Any]], gate: str, onnx_sha256: str, kind: str,
             pipeline: str = "") -> tuple[dict[str, Any] | None, str]:
    """(this type's entry, None if it holds): the verdict of ``gate`` for the FP32 model the repository has now on
    this type of CPU, whatever it said; else None and why not (another model, other types' verdicts only, named as
    they recorded themselves, or none at all). ``types`` is ``stored_verdicts``, read once by the caller."""
    here, others = _split(types)
    entry = _entry(here, kind, pipeline)
    if entry is None:
        names = sorted({str(e.get("machine", "not recorded")) for b in others.values()
                        if isinstance(e := _entry(b, kind, pipeline), Mapping)})
        return None, (f"the {gate} ran on another CPU ({'; '.join(names)})" if names
                      else f"no {gate} has run for this model")
    if entry.get("source_onnx_sha256") != onnx_sha256:
        return None, f"the {gate} ran on another version of the model"
    return entry, ""


def write_bf16_part(repo: ModelRepository, name: str, pipeline: str, result: Mapping[str, Any],
                    measured: str | None = None) -> bool:
    """Record one pipeline's bf16 gate outcome for a model on this CPU type (``_record``; ``measured``: as for
    ``write_gate``)."""
    return _record(repo, name, "bf16", pipeline, result, measured)


def passed_bf16(repo: ModelRepository, name: str, pipelines: Sequence[str]) -> tuple[bool, str]:
    """(passed, why): bf16 may serve the model only if this CPU has bf16 arithmetic and the gate of every pipeline
    in ``pipelines`` passed for the current FP32 model on this type of CPU."""
    if not has_bf16():
        return False, "bf16: this CPU has no bf16 arithmetic"
    types, sha = stored_verdicts(repo.model_dir(name)), repo.load(name).onnx_sha256
    passed = []
    for pipeline in pipelines:
        part, why = _why_not(types, f"{pipeline} gate", sha, "bf16", pipeline)
        if part is None:
            return False, f"bf16: {why}"
        if not part.get("passed"):
            return False, f"bf16 failed its {pipeline} gate ({part.get('summary', 'see precision.json')})"
        passed.append(f"{pipeline}: {part.get('summary', '')}")
    return True, f"bf16 passed its gate ({'; '.join(passed)})"


def verdict_is_current(repo: ModelRepository, name: str, kind: str, pipeline: str = "") -> bool:
    """Whether a gate's verdict for ``name`` (``kind`` "int8", or "bf16" with its ``pipeline`` part) was measured
    on this type of CPU for the FP32 model (and INT8 file) the repository has now, whatever it said: a gate whose
    verdicts are all current has nothing to do."""
    entry, _ = _why_not(stored_verdicts(repo.model_dir(name)), "gate", repo.load(name).onnx_sha256, kind, pipeline)
    if entry is None:
        return False
    return kind != "int8" or _int8_digest(repo.model_dir(name)) == entry.get("int8_sha256")


def passed_int8(repo: ModelRepository, name: str) -> tuple[dict[str, Any] | None, str]:
    """(gate entry, why): the INT8 gate's entry if it passed for the current FP32 model on this type of CPU and
    its file is the one the gate passed (hashed here, once), else None and the reason.

    The verdict holds for one type of CPU, as bf16's does: the CPU plugin picks its integer kernels by ISA, and
    without VNNI or AMX the u8 x s8 products go through VPMADDUBSW, which saturates each pair's sum to int16, where
    VNNI's VPDPBUSD and AMX accumulate in int32. A repository carried to another CPU serves FP32 (or bf16) until
    its gates run there (``make``, or the entrypoint's), which add that type's verdicts to the others'."""
    directory = repo.model_dir(name)
    entry, why = _why_not(stored_verdicts(directory), "INT8 gate", repo.load(name).onnx_sha256, "int8")
    if entry is None:
        return None, why
    if not entry.get("passed"):
        return None, f"INT8 failed its parity gate ({entry.get('summary', 'see precision.json')})"
    digest = _int8_digest(directory)
    if not digest or digest != entry.get("int8_sha256"):
        return None, "the INT8 file is missing or not the one the gate passed"
    return entry, f"INT8 passed its parity gate ({entry.get('summary', '')})"


def int8_variant(repo: ModelRepository, name: str) -> tuple[Path | None, str]:
    """(path, why): the INT8 file if its gate passed for the current FP32 model, else None and the reason."""
    entry, why = passed_int8(repo, name)
    return (repo.model_dir(name) / INT8_FILE if entry is not None else None), why


def gate_parser(description: str, add_arguments: Callable[[argparse.ArgumentParser], None]
                ) -> argparse.ArgumentParser:
    """A gate's arguments and those every gate shares, with their defaults: also how a gate run in process (not
    from its command line) gets them."""
    p = argparse.ArgumentParser(description=description)
    add_arguments(p)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--method", choices=["MinMax", "Entropy", "Percentile"], default="Entropy",
                   help="ONNX Runtime's calibration method")
    p.add_argument("--report", type=Path, help="also write the outcome (JSON) to this file")
    return p


def gate_main(description: str, argv: list[str] | None, add_arguments: Callable[[argparse.ArgumentParser], None],
              run: Callable[[argparse.Namespace], Mapping[str, Any]]) -> int:
    """The command line every parity gate shares: its own arguments, then --repository, --method and --report;
    prints the outcome as JSON (and writes it to --report: the quantiser prints on stdout too)."""
    args = gate_parser(description, add_arguments).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Replicas on one volume run the gate at their first start together: one measures, the others then find its
    # verdicts current (--if-stale) instead of rewriting them.
    with exclusive(args.repository / GATE_LOCK):
        outcome = json.dumps(run(args), indent=1)
    print(outcome)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        _write_entries(args.report, json.loads(outcome))
    return 0
