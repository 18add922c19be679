"""Reduced-precision CPU variants of a model, served only behind a parity gate.

INT8: post-training static quantisation with ONNX Runtime's quantiser (QDQ format, per-channel signed weights,
unsigned activations, calibrated on the model's own inputs), written beside the FP32 model as ``model.int8.onnx``.
OpenVINO reads the QDQ graph and runs the convolutions in INT8. A variant is offered to the runtime choice only
if its gate passed, the result of which is written at model preparation to ``precision.json`` with the numbers
that decided it and the hash of the FP32 model it was made from (a retrained model invalidates it).

bf16 needs no file: it is OpenVINO's inference precision hint, offered only where the CPU lists BF16.
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


def write_gate(repo: ModelRepository, name: str, result: Mapping[str, Any]) -> None:
    """Record an INT8 gate's outcome (``passed`` and its numbers) beside the model."""
    directory = repo.model_dir(name)
    entry = {**result, "source_onnx_sha256": repo.load(name).onnx_sha256,
             "int8_sha256": sha256_file(directory / INT8_FILE) if (directory / INT8_FILE).is_file() else ""}
    path = directory / GATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"int8": entry}, indent=2))
    tmp.replace(path)


def passed_int8(repo: ModelRepository, name: str) -> tuple[dict[str, Any] | None, str]:
    """(gate entry, why): the INT8 gate's entry if it passed for the current FP32 model and its file is the one
    the gate passed (hashed here, once), else None and the reason."""
    directory = repo.model_dir(name)
    path = directory / GATE_FILE
    if not path.is_file():
        return None, "no INT8 gate has run for this model"
    entry = json.loads(path.read_text()).get("int8", {})
    if entry.get("source_onnx_sha256") != repo.load(name).onnx_sha256:
        return None, "the INT8 gate ran on another version of the model"
    if not entry.get("passed"):
        return None, f"INT8 failed its parity gate ({entry.get('summary', 'see precision.json')})"
    file = directory / INT8_FILE
    if not file.is_file() or sha256_file(file) != entry.get("int8_sha256"):
        return None, "the INT8 file is missing or not the one the gate passed"
    return entry, f"INT8 passed its parity gate ({entry.get('summary', '')})"


def int8_variant(repo: ModelRepository, name: str) -> tuple[Path | None, str]:
    """(path, why): the INT8 file if its gate passed for the current FP32 model, else None and the reason."""
    entry, why = passed_int8(repo, name)
    return (repo.model_dir(name) / INT8_FILE if entry is not None else None), why


def gate_main(description: str, argv: list[str] | None, add_arguments: Callable[[argparse.ArgumentParser], None],
              run: Callable[[argparse.Namespace], Mapping[str, Any]]) -> int:
    """The command line every INT8 gate shares: its own arguments, then --repository and --method; prints the
    outcome as JSON."""
    p = argparse.ArgumentParser(description=description)
    add_arguments(p)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--method", choices=["MinMax", "Entropy", "Percentile"], default="Entropy",
                   help="ONNX Runtime's calibration method")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(run(args), indent=1))
    return 0
