"""Model weights, export to ONNX, the on-disk model repository and the inference runtimes."""

from engines.runtime_telemetry import keep_local

# Before any module of the package loads a runtime: every entry point (the server, the gates, prepare, the
# benchmarks) imports a module of this package first.
keep_local()
