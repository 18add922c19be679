"""ModelService: the operator's view of loaded models, batcher settings and statistics."""

from __future__ import annotations

import grpc

from engines.errors import NotFoundError
from facegate.v1 import common_pb2, models_pb2, models_pb2_grpc
from server.batching.stats import Duration, ModelStats
from server.model_registry import ModelRegistry, ServedModel


def model_version(served: ServedModel) -> common_pb2.ModelVersion:
    return common_pb2.ModelVersion(name=served.meta.name, version=served.meta.version,
                                   sha256=served.meta.onnx_sha256, runtime=served.engine.runtime)


def _duration(d: Duration) -> models_pb2.Duration:
    return models_pb2.Duration(count=d.count, total_ns=d.ns)


def stats_to_proto(name: str, stats: ModelStats, queued_now: int) -> models_pb2.ModelStatistics:
    msg = models_pb2.ModelStatistics(
        model=name, inference_count=stats.inference_count, execution_count=stats.execution_count,
        success=_duration(stats.success), fail=_duration(stats.fail), queue=_duration(stats.queue),
        compute_input=_duration(stats.compute_input), compute_infer=_duration(stats.compute_infer),
        compute_output=_duration(stats.compute_output), rejected_queue_full=stats.rejected_queue_full,
        expired_before_run=stats.expired_before_run, queued_now=queued_now,
    )
    for size, b in sorted(stats.batches.items()):
        msg.batch_sizes.add(batch_size=size, executions=b.executions, compute_input=_duration(b.compute_input),
                            compute_infer=_duration(b.compute_infer), compute_output=_duration(b.compute_output))
    return msg


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: models_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        resp = models_pb2.ListModelsResponse()
        for served in self._registry.models.values():
            c = served.batcher.config
            resp.models.add(
                version=model_version(served),
                batching=models_pb2.BatchingConfig(
                    max_batch_size=c.max_batch_size, preferred_batch_sizes=c.preferred_batch_sizes,
                    max_queue_delay_us=c.max_queue_delay_us, max_queue_size=c.max_queue_size,
                    instances=c.instances),
                ready=not served.batcher.broken,
                runtime_reason=served.runtime_reason,
            )
        return resp

    async def GetModelStatistics(  # noqa: N802 - gRPC method name
        self, request: models_pb2.GetModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.GetModelStatisticsResponse:
        models = self._registry.models
        if request.model and request.model not in models:
            raise NotFoundError(f"no model named {request.model!r}; loaded: {sorted(models)}")
        names = [request.model] if request.model else list(models)
        return models_pb2.GetModelStatisticsResponse(models=[
            stats_to_proto(n, models[n].batcher.stats, models[n].batcher.queued) for n in names
        ])
