"""Inference runtimes behind one interface: ONNX Runtime (CPU default, CUDA provider where installed)."""
