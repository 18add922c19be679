"""NVIDIA Triton (via PyTriton) serving one of facegate's ONNX models, configured like facegate's batcher.

Runs in the benchmark virtualenv (PyTriton pins numpy<2 and protobuf<7):
``.venv-bench/bin/python -m benchmarks.triton_peer --onnx model_repository/minifasnet_v2/model.onnx --port P``.
The model runs inside a ``@batch`` function on ``--engine onnxruntime`` (a session with the given intra-op
threads) or ``--engine openvino`` (a compiled CPU model, as Triton's OpenVINO backend would run it), Triton's
dynamic batcher in front (max batch, queue delay as given); bound to 127.0.0.1 only. Stop it with SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    from engines.runtime_telemetry import keep_local

    keep_local()  # the peer loads the same runtimes: their telemetry stays off here too
    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", required=True)
    p.add_argument("--model", default="minifasnet_v2")
    p.add_argument("--port", type=int, required=True, help="gRPC port; HTTP and metrics use the next two")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-us", type=int, default=1000)
    p.add_argument("--intra-op-threads", type=int, default=1)
    p.add_argument("--engine", choices=["onnxruntime", "openvino"], default="onnxruntime")
    a = p.parse_args(argv)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.intra_op_threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(a.onnx, opts, providers=["CPUExecutionProvider"])
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    run = lambda x: session.run([out.name], {inp.name: x})[0]  # noqa: E731
    if a.engine == "openvino":
        import openvino as ov

        from engines.runtime.openvino_engine import cpu_config  # compiled exactly as facegate compiles it

        core = ov.Core()
        compiled = core.compile_model(core.read_model(a.onnx), "CPU", cpu_config(a.intra_op_threads))
        request = compiled.create_infer_request()
        run = lambda x: np.array(request.infer({inp.name: x})[compiled.output(0)], copy=True)  # noqa: E731

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {out.name: run(inputs[inp.name])}

    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=a.port, http_address="127.0.0.1",
                          http_port=a.port + 1, metrics_address="127.0.0.1", metrics_port=a.port + 2)
    # Statistics must be readable by perf_analyzer's server section (PyTriton protects them by default).
    security = TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=a.model, infer_func=infer,
            inputs=[Tensor(name=inp.name, dtype=np.float32, shape=tuple(inp.shape[1:]))],
            outputs=[Tensor(name=out.name, dtype=np.float32, shape=tuple(out.shape[1:]))],
            config=ModelConfig(max_batch_size=a.max_batch_size,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=a.max_queue_delay_us)),
        )
        signal.signal(signal.SIGTERM, lambda *_: triton.stop())
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
