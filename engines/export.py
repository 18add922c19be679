"""Export the framework models to ONNX with a dynamic batch axis, and verify them against the framework.

Used at set-up (``make models``) and by the tests; imports torch, so the server never imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

log = logging.getLogger(__name__)

OPSET = 18
STACK_TRACE = "pkg.torch.onnx.stack_trace"  # the node metadata where torch.onnx records the Python stack


@dataclass(frozen=True)
class VerifyReport:
    max_abs_diff: float
    batch_sizes: tuple[int, ...]


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str,
                output_names: Sequence[str], spatial: bool = False) -> None:
    """Export ``model`` (one input) with axis 0 dynamic (and axes 2, 3 with ``spatial``).

    Written atomically, so no half-written model is ever left where the server looks.
    """
    model = model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    dims: dict[int, object] = {0: torch.export.Dim("batch", min=1, max=1024)}
    if spatial:
        dims[2] = torch.export.Dim("height", min=32, max=4096)
        dims[3] = torch.export.Dim("width", min=32, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=[input_name], output_names=list(output_names),
            dynamic_shapes=(dims,), opset_version=OPSET, external_data=False, optimize=True,
        )
    assert program is not None
    program.save(str(tmp))
    proto = onnx.load(str(tmp))
    onnx.checker.check_model(proto)
    _name_batch_axis(proto)
    _drop_source_locations(proto)
    onnx.save(proto, str(tmp))
    tmp.replace(path)


def _name_batch_axis(proto: onnx.ModelProto) -> None:
    # The exporter may name the batch axis "s0" or similar; name it "batch" on every graph input and output so
    # TensorRT profiles and the Open Inference Protocol metadata read naturally.
    for value in list(proto.graph.input) + list(proto.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_value")
        dim0.dim_param = "batch"


def _drop_source_locations(proto: onnx.ModelProto) -> None:
    # The exporter records, on every node, the Python stack that made it: absolute paths of this checkout and line
    # numbers. They made the same weights a different file (so a different onnx_sha256 and ensemble version, other
    # gate verdicts and compiled caches) in every folder the code was checked out to, and after any edit of a
    # model's source file. Nothing reads them.
    for graph in (proto.graph, *proto.functions):
        for node in graph.node:
            kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def verify_onnx(model: torch.nn.Module, path: Path, sample: np.ndarray,
                batch_sizes: Sequence[int] = (1, 3, 8), seed: int = 0) -> VerifyReport:
    """Compare ONNX Runtime with the framework model on random inputs at several batch sizes.

    ``sample`` is one input item (no batch axis) giving the shape and value range to draw from.
    """
    rng = np.random.default_rng(seed)
    lo, hi = float(sample.min()), float(sample.max())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    worst = 0.0
    for n in batch_sizes:
        x = rng.uniform(lo, hi, size=(n, *sample.shape)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x))
        refs = ref if isinstance(ref, tuple) else (ref,)
        outs = session.run(None, {input_name: x})
        for r, o in zip(refs, outs, strict=True):
            worst = max(worst, float(np.abs(r.numpy() - o).max()))
    return VerifyReport(worst, tuple(batch_sizes))
