"""The TensorRT path: FP16 ONNX variants, optimisation profiles, the engine cache and the engine build.

Nothing here imports ``tensorrt`` or ``cuda`` at module import time: the modules that need them import them
inside functions, so the CPU path (and CI) never requires either.
"""
