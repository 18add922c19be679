# facegate on an NVIDIA GPU (deploy/kubernetes/overlays/gpu; CPU nodes: Dockerfile.cpu): TensorRT base image;
# engines are built on first start (they are tied to the GPU and the TensorRT version, so they cannot be built into
# the image) and cached in the model volume.
#   docker build -t facegate .
#   facegate token new    # on a trusted machine: keep the token secret, give it to the calling service
#   docker run --gpus all -p 50051:50051 -v facegate-models:/app/model_repository \
#       -v /path/to/weights:/weights -e FACEGATE_WEIGHTS_DIR=/weights \
#       -v /path/to/token:/run/secrets/facegate_token:ro facegate
# The entrypoint always starts with authentication (a token secret, caller config and/or mutual TLS; see it).
# IdentifyFromClip: name the ensemble `make ensemble-bundle` packed, pinned by its sha256 (-e FACEGATE_ENSEMBLE=<URL
# or mounted path> -e FACEGATE_ENSEMBLE_SHA256=<hex>); it is installed before the engine build, so its members get
# engines too.
# Pick a base whose TensorRT matches what you want to run (NGC tags are YY.MM; 25.xx ships TensorRT 10.x).
ARG BASE=nvcr.io/nvidia/tensorrt:25.10-py3
FROM ${BASE}

# HOME: Kubernetes runs the image as a user with no home (runAsUser 10001), and libraries write caches under it.
# No FACEGATE_WEIGHTS_DIR: set it where weights are mounted; without it the entrypoint downloads them (pinned,
# sha256-checked) into the model volume.
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HOME=/tmp
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY proto proto
COPY server server
COPY engines engines
COPY clients/python clients/python
COPY benchmarks benchmarks
# torch (pinned) is only used to export ONNX on first start: its CPU wheel, installed first so the project's pin is
# met (PyPI's Linux wheel of the same version pulls gigabytes of CUDA packages that the export never uses, as here
# on Python 3.12: nvidia-cublas, -cudnn-cu13, -nccl-cu13, ...). Without its dependencies: they come next, from PyPI
# at the lock's versions (constraints.txt, what CI tested). cuda-python drives the TensorRT runtime; the base image
# already provides tensorrt.
RUN python3 -m pip install --no-deps --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
 && python3 -m pip install -c constraints.txt -e '.[export]' "cuda-python>=12.6" \
 && python3 -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(find proto -name '*.proto') \
 && python3 -m pip install --no-deps -e .
COPY docker/entrypoint.sh /entrypoint.sh
EXPOSE 50051
ENTRYPOINT ["/entrypoint.sh"]
