"""bench-cpu's peaks: each precision's fraction is taken of a peak that the arithmetic can reach on this CPU."""

from __future__ import annotations

from typing import Any

from benchmarks.cpu_engines import markdown, peaks_gflops, reference_peaks


def _report(peaks: dict[str, float]) -> dict[str, Any]:
    return {"machine": {"date": "today"}, "machine_class": "a CPU", "peaks_gflops": peaks, "models": []}


def test_int8_is_held_to_the_fp32_peak_where_its_gemm_runs_slower() -> None:
    # The AVX2-only Zen 1 of 2026-12-04: no integer dot products, and the INT8 GEMM below FP32.
    p = reference_peaks(fp32_numpy=34.7, fp32_openvino=33.3, bf16=None, int8_gemm=16.1)
    assert p["fp32"] == 34.7 and p["int8"] == 34.7 and p["int8_gemm"] == 16.1 and "bf16" not in p
    assert "the INT8 GEMM ran at 16.1, below FP32, so INT8 is held to the FP32 peak" in markdown(_report(p))


def test_int8_keeps_its_own_peak_where_the_cpu_has_integer_dot_products() -> None:
    # The AMX Xeon of 2026-12-04.
    p = reference_peaks(fp32_numpy=120.0, fp32_openvino=143.1, bf16=564.7, int8_gemm=894.6)
    assert p["fp32"] == 143.1 and p["bf16"] == 564.7 and p["int8"] == 894.6
    assert "held to the FP32 peak" not in markdown(_report(p))


def test_the_measured_peaks_on_this_machine_follow_the_rule() -> None:
    p = peaks_gflops(seconds=0.2)
    assert p["fp32"] == max(p["fp32_numpy"], p["fp32_openvino"]) > 0
    assert p["int8"] == max(p["int8_gemm"], p["fp32"])
