"""FP16 ONNX variants with FP32 inputs and outputs, made by a maintained converter (onnxconverter-common).

TensorRT 11 builds strongly typed networks only (the FP16 builder flag is gone), so reduced precision has to be
in the ONNX graph itself. Inputs and outputs stay FP32 so host buffers and clients are unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx

FP16_FILE = "model.fp16.onnx"


def convert_fp16(src: Path, dst: Path, op_block_list: Sequence[str] = ()) -> Path:
    """Write an FP16 copy of ``src`` (FP32 I/O kept) to ``dst`` atomically."""
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    kwargs: dict[str, object] = {"keep_io_types": True}
    if op_block_list:
        kwargs["op_block_list"] = list(op_block_list)
    with warnings.catch_warnings():
        # The converter warns for every weight below FP16's smallest normal value that it clamps: expected.
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(model, **kwargs)  # type: ignore[arg-type]
    onnx.checker.check_model(half)
    tmp = dst.with_suffix(".tmp")
    onnx.save(half, str(tmp))
    tmp.replace(dst)
    return dst
