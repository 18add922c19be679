"""Model weights, export to ONNX, the on-disk model repository and the inference runtimes."""
