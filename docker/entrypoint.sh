#!/usr/bin/env bash
# First start: export ONNX from the weights (sha256-checked), then build the TensorRT engines for this GPU.
# Later starts find both cached in /app/model_repository and start at once.
set -euo pipefail
python3 -m engines.prepare --repository model_repository
python3 -m engines.tensorrt.build --repository model_repository --precision "${FACEGATE_PRECISION:-fp16}"
exec python3 -m server --host 0.0.0.0 --port "${PORT:-50051}" --model-repository model_repository "$@"
