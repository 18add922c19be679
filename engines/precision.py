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
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_entries(path: Path, entries: Mapping[str, Any]) -> None:
    write_atomically(path, json.dumps(entries, indent=2))


def write_gate(repo: ModelRepository, name: str, result: Mapping[str, Any]) -> None:
    """Record an INT8 gate's outcome (``passed`` and its numbers) beside the model (other precisions' entries
    are kept), with the FP32 model, the INT8 file and the CPU type it was measured on."""
    directory = repo.model_dir(name)
    entry = {**result, "source_onnx_sha256": repo.load(name).onnx_sha256, "int8_sha256": _int8_digest(directory),
             "machine": cpu_type()}
    path = directory / GATE_FILE
    _write_entries(path, {**_entries(path), "int8": entry})


def _int8_digest(directory: Path) -> str:
    """The sha256 of the model's INT8 file, "" where there is none."""
    file = directory / INT8_FILE
    return sha256_file(file) if file.is_file() else ""


def _not_here(entry: Mapping[str, Any] | None, gate: str, onnx_sha256: str) -> str | None:
    """Why a recorded verdict does not hold for the FP32 model the repository has now on this type of CPU
    (missing, another model, another CPU type), or None where it holds, whatever it said. Verdicts recorded with a
    machine class (the type and a CPU count, before the types) hold for that type."""
    if entry is None:
        return f"no {gate} has run for this model"
    if entry.get("source_onnx_sha256") != onnx_sha256:
        return f"the {gate} ran on another version of the model"
    if not is_this_type(str(entry.get("machine", ""))):
        return f"the {gate} ran on another CPU ({entry.get('machine', 'not recorded')})"
    return None


def write_bf16_part(repo: ModelRepository, name: str, pipeline: str, result: Mapping[str, Any]) -> None:
    """Record one pipeline's bf16 gate outcome for a model (its other pipelines' parts are kept), with the FP32
    model and the CPU type it was measured for."""
    path = repo.model_dir(name) / GATE_FILE
    entries = _entries(path)
    parts = dict(entries.get("bf16", {}).get("parts", {}))
    parts[pipeline] = {**result, "source_onnx_sha256": repo.load(name).onnx_sha256, "machine": cpu_type()}
    _write_entries(path, {**entries, "bf16": {"parts": parts}})


def passed_bf16(repo: ModelRepository, name: str, pipelines: Sequence[str]) -> tuple[bool, str]:
    """(passed, why): bf16 may serve the model only if this CPU has bf16 arithmetic and the gate of every pipeline
    in ``pipelines`` passed for the current FP32 model on this type of CPU."""
    if not has_bf16():
        return False, "bf16: this CPU has no bf16 arithmetic"
    parts = _entries(repo.model_dir(name) / GATE_FILE).get("bf16", {}).get("parts", {})
    sha = repo.load(name).onnx_sha256
    passed = []
    for pipeline in pipelines:
        part = parts.get(pipeline)
        if why := _not_here(part, f"{pipeline} gate", sha):
            return False, f"bf16: {why}"
        assert part is not None  # (_not_here)
        if not part.get("passed"):
            return False, f"bf16 failed its {pipeline} gate ({part.get('summary', 'see precision.json')})"
        passed.append(f"{pipeline}: {part.get('summary', '')}")
    return True, f"bf16 passed its gate ({'; '.join(passed)})"


def verdict_is_current(repo: ModelRepository, name: str, kind: str, pipeline: str = "") -> bool:
    """Whether a gate's verdict for ``name`` (``kind`` "int8", or "bf16" with its ``pipeline`` part) was measured
    on this type of CPU for the FP32 model (and INT8 file) the repository has now, whatever it said: a gate whose
    verdicts are all current has nothing to do."""
    entries = _entries(repo.model_dir(name) / GATE_FILE)
    entry = entries.get("int8") if kind == "int8" else entries.get("bf16", {}).get("parts", {}).get(pipeline)
    if entry is None or _not_here(entry, "gate", repo.load(name).onnx_sha256) is not None:
        return False
    return kind != "int8" or _int8_digest(repo.model_dir(name)) == entry.get("int8_sha256")


def passed_int8(repo: ModelRepository, name: str) -> tuple[dict[str, Any] | None, str]:
    """(gate entry, why): the INT8 gate's entry if it passed for the current FP32 model on this type of CPU and
    its file is the one the gate passed (hashed here, once), else None and the reason.

    The verdict holds for one type of CPU, as bf16's does: the CPU plugin picks its integer kernels by ISA, and
    without VNNI or AMX the u8 x s8 products go through VPMADDUBSW, which saturates each pair's sum to int16, where
    VNNI's VPDPBUSD and AMX accumulate in int32. A repository carried to another CPU serves FP32 (or bf16) until
    ``make`` runs its gates there (the stamp names the CPU type, so it does)."""
    directory = repo.model_dir(name)
    entry = _entries(directory / GATE_FILE).get("int8")
    if why := _not_here(entry, "INT8 gate", repo.load(name).onnx_sha256):
        return None, why
    assert entry is not None  # (_not_here)
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
    with exclusive(args.repository / ".gate.lock"):
        outcome = json.dumps(run(args), indent=1)
    print(outcome)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        _write_entries(args.report, json.loads(outcome))
    return 0
