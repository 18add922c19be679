"""bench-cpu's multiply-add count, on a graph whose shapes only a run can tell: the fraction of peak it reports for
every model rests on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from benchmarks.cpu_engines import macs_per_item


def _crop_after_upsampling(path: Path) -> None:
    """RetinaFace's shape in small: conv, a stride-2 ConvTranspose, a Caffe crop back to the input's size (Shape ->
    Slice, sizes known only at run time), then a conv on the crop and a fully connected layer."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             (("w1", (8, 4, 3, 3)), ("up", (8, 8, 2, 2)), ("w2", (16, 8, 3, 3)), ("fc", (5, 16)))]
    inits += [numpy_helper.from_array(np.asarray(v, np.int64), n) for n, v in
              (("hw_from", [2]), ("hw_to", [4]), ("zeros", [0, 0]), ("axes", [2, 3]))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c1", "up"], ["u"], strides=[2, 2], kernel_shape=[2, 2]),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Slice", ["xs", "hw_from", "hw_to"], ["hw"]),
        helper.make_node("Slice", ["u", "zeros", "hw", "axes"], ["crop"]),
        helper.make_node("Conv", ["crop", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "crop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_shapes_known_only_at_run_time_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "crop.onnx"
    _crop_after_upsampling(path)
    # Shape inference alone does not know the last conv's output: what bench-cpu used to miss in RetinaFace.
    model = onnx.load(str(path))
    for d, v in zip(model.graph.input[0].type.tensor_type.shape.dim, (1, 4, 10, 12), strict=True):
        d.dim_value = v
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    dims = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    assert not dims.get("c2") or 0 in dims["c2"]
    h, w = 10, 12
    expected = (h * w * 8 * 4 * 9  # conv 4 -> 8, 3x3
                + h * w * 8 * 8 * 4  # ConvTranspose: each of the 8 x h x w inputs through 8 x 2 x 2 taps
                + h * w * 16 * 8 * 9  # conv 8 -> 16 on the crop
                + 16 * 5)  # Gemm 16 -> 5
    assert macs_per_item(path, {"x": (4, h, w)}) == expected
