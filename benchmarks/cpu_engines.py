"""``make bench-cpu``: raw CPU engines against the machine's measured peak.

1. Peak: a single-thread float32 GEMM (numpy's BLAS, 1024^3, one thread) gives the arithmetic one core reaches.
2. Each served model's multiply-adds per item, counted from its ONNX graph (Conv, ConvTranspose, Gemm, MatMul at
   the warm-up shape, batch 1, after ONNX shape inference).
3. Items/s per model and runtime (ONNX Runtime, OpenVINO; FP32; one thread; batch 8), and the fraction of the
   peak that is: 2 * MACs * items/s / peak FLOP/s.

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
from engines.precision import int8_variant
from engines.repository import ModelRepository
from engines.runtime.cpu_choice import items_per_s


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


def macs_per_item(onnx_path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-adds of the compute layers for one item, from ONNX shape inference at ``shapes`` (batch 1)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(onnx_path))
    for inp in model.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, (1, *shapes[inp.name]), strict=True):
                d.ClearField("dim_param")
                d.dim_value = v
    model = shape_inference.infer_shapes(model, data_prop=True)
    known: dict[str, list[int]] = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        known[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        out = known.get(node.output[0])
        if not out or 0 in out:
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            w = inits.get(node.input[1]) or known.get(node.input[1])
            if not w:
                continue
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            per_out = int(np.prod(w[1:])) if node.op_type == "Conv" else int(np.prod(w[2:])) * w[0] // group
            total += int(np.prod(out)) * per_out
        elif node.op_type in ("Gemm", "MatMul"):
            a = known.get(node.input[0]) or inits.get(node.input[0])
            if a:
                total += int(np.prod(out)) * a[-1]
    return total


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['date']}. One thread per engine, batch 8, FP32. Peak: a "
           f"single-thread float32 GEMM, **{r['peak_gflops']:.1f} GFLOP/s** per core.", "",
           "| model | M MACs/item | ONNX Runtime items/s (% of peak) | OpenVINO items/s (% of peak) | OpenVINO / ORT "
           "| OpenVINO INT8 items/s (% of FP32 peak) | INT8 gate |", "|---|---|---|---|---|---|---|"]
    for row in r["models"]:
        ort, ov = row["onnxruntime"], row["openvino"]
        i8 = row.get("openvino_int8")
        int8 = f"{i8['items_per_s']:.0f} ({100 * i8['fraction_of_peak']:.1f} %)" if i8 else "-"
        out.append(f"| {row['model']} | {row['macs'] / 1e6:.0f} | {ort['items_per_s']:.0f} "
                   f"({100 * ort['fraction_of_peak']:.1f} %) | {ov['items_per_s']:.0f} "
                   f"({100 * ov['fraction_of_peak']:.1f} %) | {ov['items_per_s'] / ort['items_per_s']:.2f} | {int8} "
                   f"| {row.get('int8_gate', '-')} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--seconds", type=float, default=2.0)
    a = p.parse_args(argv)
    from engines.runtime.onnxruntime_engine import OnnxRuntimeModel
    from engines.runtime.openvino_engine import OpenVinoModel

    peak = gemm_peak_gflops()
    repo = ModelRepository(a.repository)
    rows = []
    for name in repo.names():
        meta = repo.load(name)
        decl = declaration_for(meta)
        macs = macs_per_item(repo.onnx_path(name), {k: v.shape for k, v in decl.warmup_item().items()})
        row: dict[str, Any] = {"model": name, "macs": macs}
        int8, why = int8_variant(repo, name)
        row["int8_gate"] = why
        variants: list[tuple[str, Any]] = [
            ("onnxruntime", lambda: OnnxRuntimeModel(repo.onnx_path(name), meta,  # noqa: B023
                                                     ["CPUExecutionProvider"], 1)),
            ("openvino", lambda: OpenVinoModel(repo.onnx_path(name), meta, 1))]  # noqa: B023
        if int8 is not None:
            variants.append(("openvino_int8", lambda: OpenVinoModel(int8, meta, 1, precision="int8")))  # noqa: B023
        for runtime, make in variants:
            rate = items_per_s(make(), decl, 8, a.seconds)
            # INT8 against the FP32 peak too: this CPU has no int8 dot-product instructions (no VNNI), so its
            # INT8 convolutions run on the same FMA units (measured speed-up below, not an INT8 peak).
            row[runtime] = {"items_per_s": rate, "fraction_of_peak": 2 * macs * rate / (peak * 1e9)}
        rows.append(row)
        print(f"[bench-cpu] {name}: {row['onnxruntime']['items_per_s']:.0f} / {row['openvino']['items_per_s']:.0f} "
              f"items/s", file=sys.stderr)
    write_report(a.out, "cpu-engines", {"machine": machine_info(), "peak_gflops": peak, "threads": 1,
                                        "cpu_count": os.cpu_count(), "models": rows}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
