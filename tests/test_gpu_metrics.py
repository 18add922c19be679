"""GPU metrics through NVML: what the collector exports, checked against a stand-in for NVML's API on the CPU,
and against the real NVML where a GPU is (marked ``gpu``; self-contained: ``pytest --noconftest``)."""

from __future__ import annotations

import types

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from server.gpu_metrics import GpuCollector, nvml


def fake_nvml() -> types.SimpleNamespace:
    gpu = object()
    return types.SimpleNamespace(
        nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: gpu,
        nvmlDeviceGetName=lambda h: b"NVIDIA Test GPU",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=37),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 << 30, total=80 << 30))


def test_the_collector_exports_utilisation_and_memory_per_gpu() -> None:
    registry = CollectorRegistry()
    registry.register(GpuCollector(fake_nvml()))
    text = generate_latest(registry).decode()
    assert 'facegate_gpu_utilization_ratio{gpu="0",name="NVIDIA Test GPU"} 0.37' in text
    assert 'facegate_gpu_memory_used_bytes{gpu="0",name="NVIDIA Test GPU"} 3.221225472e+09' in text


def test_without_a_driver_it_exports_nothing() -> None:
    collector = GpuCollector(None) if nvml() is None else None
    if collector is None:
        pytest.skip("a GPU is present here")
    assert not collector.active and list(collector.collect()) == []


@pytest.mark.gpu
@pytest.mark.skipif(nvml() is None, reason="needs an NVIDIA driver and GPU (NVML)")
def test_real_nvml_reports_the_gpu() -> None:
    registry = CollectorRegistry()
    registry.register(GpuCollector())
    text = generate_latest(registry).decode()
    assert "facegate_gpu_memory_total_bytes{" in text and "facegate_gpu_utilization_ratio{" in text
    print(text)
