"""The Open Inference Protocol (KServe v2) endpoint: raw tensors in and out of every served model, through the
same dynamic batchers as the domain RPCs, plus Triton's ModelConfig and ModelStatistics extensions.

Validation follows the protocol: an unknown model is NOT_FOUND; a wrong input name, datatype, shape or raw
content length is INVALID_ARGUMENT with the offending field named.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext

import grpc
import numpy as np

from engines.errors import FieldViolation, InvalidArgumentError, NotFoundError
from engines.runtime.base import TensorSpec
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from server.admission import Budget
from server.batching.stats import Duration
from server.model_registry import ModelRegistry, ServedModel
from server.servicers.call_context import deadline_from
from server.tasks import gather_or_cancel

SERVER_NAME = "facegate"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["model_configuration", "statistics"]

_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.float64): "FP64",
              np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.uint8): "UINT8",
              np.dtype(np.int8): "INT8", np.dtype(np.bool_): "BOOL"}
_CONFIG_TYPES = {"FP32": pb.TYPE_FP32, "FP16": pb.TYPE_FP16, "FP64": pb.TYPE_FP64, "INT64": pb.TYPE_INT64,
                 "INT32": pb.TYPE_INT32, "UINT8": pb.TYPE_UINT8, "INT8": pb.TYPE_INT8, "BOOL": pb.TYPE_BOOL}
_CONTENTS_FIELD = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
                   "INT32": "int_contents", "INT8": "int_contents", "UINT8": "uint_contents",
                   "BOOL": "bool_contents"}


def datatype(dtype: np.dtype) -> str:
    return _DATATYPES.get(np.dtype(dtype), "BYTES")


def platform(served: ServedModel) -> str:
    runtime = served.engine.runtime
    if runtime.startswith("tensorrt"):
        return "tensorrt_plan"
    return "openvino" if runtime.startswith("openvino") else "onnxruntime_onnx"


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _field(i: int, name: str) -> str:
    return f"inputs[{i}]" + (f".{name}" if name else "")


def decode_inputs(req: pb.ModelInferRequest, specs: Sequence[TensorSpec], max_batch: int,
                  bounds: Mapping[int, tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Validate the request's tensors against the model (and the bounds of its dynamic axes) and return them as
    arrays (batch axis first)."""
    by_name = {s.name: s for s in specs}
    if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
        raise InvalidArgumentError(FieldViolation(
            "raw_input_contents", f"has {len(req.raw_input_contents)} entries for {len(req.inputs)} inputs"))
    given = [t.name for t in req.inputs]
    missing = sorted(set(by_name) - set(given))
    if missing:
        raise InvalidArgumentError(FieldViolation("inputs", f"missing input(s) {missing}; expected {sorted(by_name)}"))
    out: dict[str, np.ndarray] = {}
    batch = None
    for i, t in enumerate(req.inputs):
        spec = by_name.get(t.name)
        if spec is None:
            raise InvalidArgumentError(FieldViolation(_field(i, "name"),
                                                      f"unknown input {t.name!r}; expected {sorted(by_name)}"))
        want = datatype(spec.dtype)
        if t.datatype != want:
            raise InvalidArgumentError(FieldViolation(_field(i, "datatype"), f"is {t.datatype!r}; {t.name} is {want}"))
        shape = tuple(int(d) for d in t.shape)
        if any(d < 0 for d in shape):  # -1 is the model's wildcard, never a request's size
            raise InvalidArgumentError(FieldViolation(
                _field(i, "shape"), f"is {list(shape)}; a request's dimensions are sizes, 0 or more"))
        if len(shape) != len(spec.shape) or any(
                s >= 0 and d != s for d, s in zip(shape[1:], spec.shape[1:], strict=True)):
            raise InvalidArgumentError(FieldViolation(
                _field(i, "shape"), f"is {list(shape)}; {t.name} takes {list(spec.shape)} (-1: any size)"))
        for axis, (lo, hi) in (bounds or {}).items():
            if not lo <= shape[axis] <= hi:
                raise InvalidArgumentError(FieldViolation(
                    _field(i, "shape"), f"dimension {axis} is {shape[axis]}; {t.name} accepts {lo}..{hi}"))
        if not 1 <= shape[0] <= max_batch:
            raise InvalidArgumentError(FieldViolation(_field(i, "shape"),
                                                      f"batch {shape[0]} outside [1, {max_batch}]"))
        if batch is not None and shape[0] != batch:
            raise InvalidArgumentError(FieldViolation(_field(i, "shape"), "inputs disagree on the batch size"))
        batch = shape[0]
        n = math.prod(shape)
        if req.raw_input_contents:
            raw = req.raw_input_contents[i]
            expected = n * spec.dtype.itemsize
            if len(raw) != expected:
                raise InvalidArgumentError(FieldViolation(
                    f"raw_input_contents[{i}]",
                    f"has {len(raw)} bytes; shape {list(shape)} of {want} needs {expected}"))
            arr = np.frombuffer(raw, dtype=spec.dtype).reshape(shape)
        else:
            values = getattr(t.contents, _CONTENTS_FIELD.get(want, "bytes_contents"))
            if len(values) != n:
                raise InvalidArgumentError(FieldViolation(
                    _field(i, "contents"), f"has {len(values)} values; shape {list(shape)} needs {n}"))
            arr = np.asarray(values, dtype=spec.dtype).reshape(shape)
        out[t.name] = arr
    return out


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, registry: ModelRegistry, ready: Callable[[], bool], input_bytes: Budget | None = None
                 ) -> None:
        """``input_bytes``: what the input tensors of all ModelInfer calls in flight may hold (None: unbounded)."""
        self._registry = registry
        self._ready = ready
        self._input_bytes = input_bytes

    def _model(self, name: str) -> ServedModel:
        served = self._registry.models.get(name)
        if served is None:
            raise NotFoundError(f"unknown model {name!r}; served: {sorted(self._registry.models)}")
        return served

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext  # noqa: N802
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext  # noqa: N802
                          ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self._ready()) and not self._registry.broken)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext  # noqa: N802
                         ) -> pb.ModelReadyResponse:
        served = self._registry.models.get(request.name)
        return pb.ModelReadyResponse(ready=served is not None and not served.batcher.broken and bool(self._ready()))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext  # noqa: N802
                             ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext  # noqa: N802
                            ) -> pb.ModelMetadataResponse:
        served = self._model(request.name)
        e = served.engine
        return pb.ModelMetadataResponse(
            name=e.name, versions=[e.version], platform=platform(served),
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=datatype(t.dtype), shape=t.shape)
                    for t in e.inputs],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=datatype(t.dtype), shape=t.shape)
                     for t in e.outputs])

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext  # noqa: N802
                          ) -> pb.ModelConfigResponse:
        served = self._model(request.name)
        e, c = served.engine, served.batcher.config
        config = pb.ModelConfig(
            name=e.name, platform=platform(served), backend=platform(served).split("_")[0],
            max_batch_size=c.max_batch_size,
            input=[pb.ModelInput(name=t.name, data_type=_CONFIG_TYPES.get(datatype(t.dtype), pb.TYPE_INVALID),
                                 dims=t.shape[1:]) for t in e.inputs],
            output=[pb.ModelOutput(name=t.name, data_type=_CONFIG_TYPES.get(datatype(t.dtype), pb.TYPE_INVALID),
                                   dims=t.shape[1:]) for t in e.outputs],
            instance_group=[pb.ModelInstanceGroup(
                name=e.name, count=c.instances,
                kind=pb.ModelInstanceGroup.KIND_GPU if "CUDA" in e.runtime or "tensorrt" in e.runtime
                else pb.ModelInstanceGroup.KIND_CPU)],
        )
        if c.max_batch_size > 1:
            config.dynamic_batching.CopyFrom(pb.ModelDynamicBatching(
                preferred_batch_size=c.preferred_batch_sizes, max_queue_delay_microseconds=c.max_queue_delay_us))
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,  # noqa: N802
                              context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        names = [request.name] if request.name else list(self._registry.models)
        resp = pb.ModelStatisticsResponse()
        for n in names:
            served = self._model(n)
            s = served.batcher.stats
            msg = resp.model_stats.add(
                name=n, version=served.engine.version, last_inference=s.last_inference_ms,
                inference_count=s.inference_count, execution_count=s.execution_count,
                inference_stats=pb.InferStatistics(
                    success=_duration(s.success), fail=_duration(s.fail), queue=_duration(s.queue),
                    compute_input=_duration(s.compute_input), compute_infer=_duration(s.compute_infer),
                    compute_output=_duration(s.compute_output)))
            for size, b in sorted(s.batches.items()):
                msg.batch_stats.add(batch_size=size, compute_input=_duration(b.compute_input),
                                    compute_infer=_duration(b.compute_infer),
                                    compute_output=_duration(b.compute_output))
        return resp

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext  # noqa: N802
                         ) -> pb.ModelInferResponse:
        served = self._model(request.model_name)
        if request.model_version and request.model_version != served.engine.version:
            raise NotFoundError(f"model {request.model_name!r} has no version {request.model_version!r}; "
                                f"served: {served.engine.version}")
        e = served.engine
        inputs = decode_inputs(request, e.inputs, served.batcher.config.max_batch_size,
                               served.declaration.input_bounds(e.inputs[0].name))
        wanted = [o.name for o in request.outputs] or [t.name for t in e.outputs]
        known = {t.name: t for t in e.outputs}
        for i, name in enumerate(wanted):
            if name not in known:
                raise InvalidArgumentError(FieldViolation(f"outputs[{i}].name", f"unknown output {name!r}"))
        n = next(iter(inputs.values())).shape[0]
        deadline = deadline_from(context)
        held = sum(v.nbytes for v in inputs.values())
        with self._input_bytes.hold(held) if self._input_bytes is not None else nullcontext():
            # A request of batch n is n items to the dynamic batcher, which may merge them with other requests. The
            # common batch of one is awaited directly: no task per item on the event loop, no stacking.
            if n == 1:
                results = [await served.batcher.infer({k: v[0] for k, v in inputs.items()}, deadline)]
            else:
                results = await gather_or_cancel(*[
                    served.batcher.infer({k: v[j] for k, v in inputs.items()}, deadline) for j in range(n)])
        resp = pb.ModelInferResponse(model_name=e.name, model_version=e.version, id=request.id)
        for name in wanted:
            stacked = results[0][name][None] if n == 1 else np.stack([r[name] for r in results])
            arr = np.ascontiguousarray(stacked, dtype=known[name].dtype)
            resp.outputs.add(name=name, datatype=datatype(arr.dtype), shape=arr.shape)
            resp.raw_output_contents.append(arr.tobytes())
        return resp
