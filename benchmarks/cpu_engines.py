"""``make bench-cpu``: raw CPU engines against the machine's measured peak.

1. Peaks: a single-thread 1024^3 GEMM per precision, the arithmetic one core reaches: FP32 (numpy's BLAS and
   OpenVINO, the higher), bf16 (OpenVINO's bf16 hint, where the CPU has bf16 arithmetic) and INT8 (a QDQ MatMul
   that OpenVINO runs as u8 x s8; on a CPU with VNNI, its int8 dot products; never taken below the FP32 peak).
2. Each served model's multiply-adds per item, counted from its ONNX graph (Conv, ConvTranspose, Gemm, MatMul at
   the warm-up shape, batch 1, with the shapes of one run of the graph).
3. Items/s per model and runtime (ONNX Runtime and OpenVINO FP32; OpenVINO bf16 where the CPU has it and the
   model declares it; OpenVINO INT8 where the variant file exists, passed or not; one thread; batch 8, which
   OpenVINO runs on a model compiled for batch 8 where the model's other axes are fixed, as the server does), and the
   fraction of the peak of its own precision that is: 2 * MACs * items/s / peak FLOP/s. The gates' verdicts say
   which of them may be served.

Writes benchmarks/results/cpu-engines.json and .md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import machine_info, write_report
from engines.declarations import declaration_for
from engines.machine import has_bf16, machine_class
from engines.precision import INT8_FILE, int8_variant, passed_bf16
from engines.repository import ModelRepository
from engines.runtime.cpu_choice import gated_pipelines, items_per_s


def gemm_model(n: int, int8: bool) -> bytes:
    """An ONNX [n, n] x [n, n] MatMul with a constant weight; ``int8``: both operands quantised (QDQ)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        inits = [numpy_helper.from_array(rng.integers(-127, 127, (n, n), dtype=np.int8), "wq"),
                 numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
                 numpy_helper.from_array(np.array(0, np.int8), "wz"),
                 numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
                 numpy_helper.from_array(np.array(128, np.uint8), "xz")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]),
                 helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    else:
        inits = [numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], inits)
    return bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


def openvino_gemm_gflops(precision: str, n: int = 1024, seconds: float = 2.0) -> float:
    """One thread, compiled as every served model is (engines.runtime.openvino_engine.cpu_config)."""
    import openvino as ov

    from engines.runtime.openvino_engine import cpu_config

    core = ov.Core()
    model = core.read_model(model=gemm_model(n, precision == "int8"), weights=ov.Tensor(np.empty(0, np.uint8)))
    request = core.compile_model(model, "CPU", cpu_config(1, precision)).create_infer_request()
    x = np.random.default_rng(2).random((n, n), dtype=np.float32)
    request.infer({0: x})
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        request.infer({0: x})
        k += 1
    return 2 * n**3 * k / (time.perf_counter() - t0) / 1e9


def peaks_gflops(seconds: float = 2.0) -> dict[str, float]:
    """The single-core peak of each precision this CPU runs (bf16 only where it has bf16 arithmetic)."""
    return reference_peaks(fp32_numpy=gemm_peak_gflops(seconds=seconds),
                           fp32_openvino=openvino_gemm_gflops("fp32", seconds=seconds),
                           bf16=openvino_gemm_gflops("bf16", seconds=seconds) if has_bf16() else None,
                           int8_gemm=openvino_gemm_gflops("int8", seconds=seconds))


def reference_peaks(fp32_numpy: float, fp32_openvino: float, bf16: float | None, int8_gemm: float
                    ) -> dict[str, float]:
    """The peak each precision's fraction is taken of. The INT8 peak is never below the FP32 one: INT8 work can
    always run at the FP32 rate, and on a CPU without integer dot products (VNNI, AMX) OpenVINO's INT8 GEMM is no
    peak. On an AVX2-only Zen 1 (2026-12-04) it ran at 16.1 GFLOP/s against FP32's 34.7, and the INT8 models
    beat it, reported as 117-128 % of that "peak"."""
    out = {"fp32_numpy": fp32_numpy, "fp32_openvino": fp32_openvino, "fp32": max(fp32_numpy, fp32_openvino),
           "int8_gemm": int8_gemm}
    if bf16 is not None:
        out["bf16"] = bf16
    out["int8"] = max(int8_gemm, out["fp32"])
    return out


def gemm_peak_gflops(n: int = 1024, seconds: float = 2.0) -> float:
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    with threadpool_limits(1):
        a @ b
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            k += 1
        dt = time.perf_counter() - t0
    return 2 * n**3 * k / dt / 1e9


def useful_taps(kernel: np.ndarray) -> int:
    """Taps of a Conv3d weight [O, I, T, H, W] less its padding frames: a frame of an output channel that is zero in
    every input channel and position is what ``engines.models.slowfast.TimeFoldedConv3d`` adds around the
    original kernel. A single weight that happens to be 0.0 still counts (it is the model's own tap)."""
    if kernel.ndim != 5:
        return int(kernel.size)
    o, i, t = kernel.shape[:3]
    live_frames = np.any(kernel.reshape(o, i, t, -1) != 0, axis=(1, 3))  # [O, T]
    return int(live_frames.sum()) * i * int(np.prod(kernel.shape[3:]))


COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _run_shapes(model: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
    """The shapes of every compute node's inputs and output, from one run of the graph at batch 1.

    ONNX shape inference cannot follow shapes that the graph computes at run time: RetinaFace's Caffe crops after
    its upsampling (Shape -> Slice) left the sizes of its whole FPN, SSH and head branch unknown (0), and a count
    from inference alone found 40.3 of its 94.3 M multiply-adds."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    # Shapes known without running: the weights and the given inputs; the run adds every other tensor counted.
    known = {t.name: list(t.dims) for t in model.graph.initializer}
    known.update({name: [1, *shape] for name, shape in shapes.items()})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)  # (the caller's model keeps its outputs)
    have = {o.name for o in probe.graph.output}
    tensors = [t for n in probe.graph.node if n.op_type in COMPUTE_OPS for t in (n.output[0], *n.input[:2])]
    wanted = list(dict.fromkeys(t for t in tensors if t not in have and t not in known))
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in wanted)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros(known[i.name], np.float32) for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    known.update({name: list(v.shape) for name, v in zip(names, session.run(names, feeds), strict=True)})
    return known


def macs_per_item(onnx_path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-adds of the compute layers for one item: shapes from one run of the graph at ``shapes`` (batch 1).

    A convolution leaves out the padding a time-folded convolution adds (``useful_taps``): work the kernel does but
    the model does not need, so the fraction of peak is of the model's own multiply-adds. Every compute node is
    counted: a shape the run did not give fails the count (KeyError) instead of leaving the node out."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    known = _run_shapes(model, shapes)
    weights = {t.name: t for t in model.graph.initializer}
    total = 0
    for node in (n for n in model.graph.node if n.op_type in COMPUTE_OPS):
        out = known[node.output[0]]
        if node.op_type == "Conv" and node.input[1] in weights:  # outputs per channel x the taps that count
            total += int(np.prod(out)) // out[1] * useful_taps(numpy_helper.to_array(weights[node.input[1]]))
        elif node.op_type == "Conv":
            total += int(np.prod(out)) * int(np.prod(known[node.input[1]][1:]))
        elif node.op_type == "ConvTranspose":  # weight [C_in, C_out / group, k...]: each input value, every tap
            total += int(np.prod(known[node.input[0]])) * int(np.prod(known[node.input[1]][1:]))
        else:  # Gemm, MatMul: each output value, the inner dimension (A's columns, or its rows when transposed)
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            total += int(np.prod(out)) * known[node.input[0]][-2 if trans_a else -1]
    return total


def _cell(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    return f"{v['items_per_s']:.0f} ({100 * v['fraction_of_peak']:.1f} %)" if v else "-"


def _int8_note(p: dict[str, float]) -> str:
    if p["int8_gemm"] >= p["int8"]:
        return ""
    return f"; the INT8 GEMM ran at {p['int8_gemm']:.1f}, below FP32, so INT8 is held to the FP32 peak"


def markdown(r: dict[str, Any]) -> str:
    m, p = r["machine"], r["peaks_gflops"]
    peaks = ", ".join(f"{k} **{p[k]:.1f}**" for k in ("fp32", "bf16", "int8") if k in p)
    out = [f"Machine: {r['machine_class']}, {m['date']}. One thread per engine, batch 8. Peaks (single-thread "
           f"1024^3 GEMM, GFLOP/s per core): {peaks} (FP32: numpy {p['fp32_numpy']:.1f}, OpenVINO "
           f"{p['fp32_openvino']:.1f}{_int8_note(p)}). Each variant's fraction is of its own precision's peak.", "",
           "| model | M MACs/item | ONNX Runtime FP32 | OpenVINO FP32 | OpenVINO / ORT | OpenVINO bf16 | OpenVINO INT8 "
           "| served here | bf16 gate | INT8 gate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["models"]:
        ort, ov = row["onnxruntime"], row["openvino"]
        out.append(f"| {row['model']} | {row['macs'] / 1e6:.0f} | {_cell(row, 'onnxruntime')} | "
                   f"{_cell(row, 'openvino')} | {ov['items_per_s'] / ort['items_per_s']:.2f} | "
                   f"{_cell(row, 'openvino_bf16')} | {_cell(row, 'openvino_int8')} | {row.get('served', '-')} | "
                   f"{row.get('bf16_gate', '-')} | {row.get('int8_gate', '-')} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--seconds", type=float, default=2.0)
    a = p.parse_args(argv)
    from engines.runtime.factory import EngineFactory, RuntimeSettings
    from engines.runtime.onnxruntime_engine import OnnxRuntimeModel
    from engines.runtime.openvino_engine import OpenVinoModel

    peaks = peaks_gflops(a.seconds)
    print(f"[bench-cpu] peaks GFLOP/s: {peaks}", file=sys.stderr)
    repo = ModelRepository(a.repository)
    settings = RuntimeSettings(prefer_gpu=False)
    factory = EngineFactory(repo, settings)
    static = [8] if settings.openvino_static_batches >= 8 else []  # batch 8 on OpenVINO as the server runs it
    rows = []
    for name in repo.names():
        meta = repo.load(name)
        decl = declaration_for(meta)
        macs = macs_per_item(repo.onnx_path(name), {k: v.shape for k, v in decl.warmup_item().items()})
        row: dict[str, Any] = {"model": name, "macs": macs}
        row["int8_gate"] = int8_variant(repo, name)[1]
        row["bf16_gate"] = passed_bf16(repo, name, gated_pipelines(repo, decl))[1]
        row["served"] = factory.create(decl, decl.batching)[0].runtime
        int8_file = repo.model_dir(name) / INT8_FILE
        variants: list[tuple[str, str, Any]] = [
            ("onnxruntime", "fp32", lambda: OnnxRuntimeModel(repo.onnx_path(name), meta,  # noqa: B023
                                                             ["CPUExecutionProvider"], 1)),
            ("openvino", "fp32", lambda: OpenVinoModel(repo.onnx_path(name), meta, 1, static_batches=static))]  # noqa: B023
        if "bf16" in decl.cpu_precisions and has_bf16():
            variants.append(("openvino_bf16", "bf16",
                             lambda: OpenVinoModel(repo.onnx_path(name), meta, 1, precision="bf16",  # noqa: B023
                                                   static_batches=static)))
        if "int8" in decl.cpu_precisions and int8_file.is_file():
            variants.append(("openvino_int8", "int8",
                             lambda: OpenVinoModel(int8_file, meta, 1, precision="int8",  # noqa: B023
                                                   static_batches=static)))
        for runtime, precision, make in variants:
            rate = items_per_s(make(), decl, 8, a.seconds)
            row[runtime] = {"items_per_s": rate, "precision": precision,
                            "fraction_of_peak": 2 * macs * rate / (peaks[precision] * 1e9),
                            "fraction_of_fp32_peak": 2 * macs * rate / (peaks["fp32"] * 1e9)}
        rows.append(row)
        print(f"[bench-cpu] {name}: " + ", ".join(f"{k} {row[k]['items_per_s']:.0f}" for k, _, _ in variants)
              + " items/s", file=sys.stderr)
    write_report(a.out, "cpu-engines", {"machine": machine_info(), "machine_class": machine_class(),
                                        "peaks_gflops": peaks, "peak_gflops": peaks["fp32"], "threads": 1,
                                        "cpu_count": os.cpu_count(), "models": rows}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
