"""Assemble and run the gRPC server: servicers, health, reflection, limits, warm-up and graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engines.identify.ensemble import find_ensemble
from engines.repository import ModelRepository
from engines.specs import DETECTOR, LIVENESS_SPECS
from engines.vision.oom_score import own_score
from facegate.v1 import (
    common_pb2,
    identification_pb2,
    identification_pb2_grpc,
    liveness_pb2,
    liveness_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from inference import grpc_service_pb2, grpc_service_pb2_grpc
from server.admission import Budget, PerCaller, WaitGate
from server.admission_reload import adjust as adjust_admission
from server.audit import AuditLog
from server.auth.callers import Authenticator
from server.auth.deployment_rates import DeploymentRates, DeploymentShare, replica_id
from server.auth.interceptor import AuthInterceptor
from server.auth.reload import CredentialReloader
from server.config import ServerConfig
from server.gallery.store import GalleryStore
from server.health_port import HealthPort
from server.memory_budgets import BudgetFit, budget_floors
from server.memory_limit import describe, own_memory_group
from server.metrics import Metrics, MetricsInterceptor
from server.model_registry import ModelRegistry
from server.pipelines.identification import ClipPipeline
from server.pipelines.liveness import LivenessPipeline
from server.priority import lower_compute_threads, lower_this_thread
from server.servicers.error_interceptor import ErrorMappingInterceptor
from server.servicers.identification import IdentificationServicer
from server.servicers.inference import InferenceServicer
from server.servicers.liveness import LivenessServicer
from server.servicers.models import ModelServicer, model_version
from server.services.identification import IdentificationService
from server.shared_admission import SharedCallerState
from server.tracing import Tracing, package_version
from server.workers import caller_table, worker_index

log = logging.getLogger(__name__)

LIVENESS_SERVICE = liveness_pb2.DESCRIPTOR.services_by_name["LivenessService"].full_name
MODEL_SERVICE = models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
IDENTIFICATION_SERVICE = identification_pb2.DESCRIPTOR.services_by_name["IdentificationService"].full_name
INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVICES = ("", LIVENESS_SERVICE, MODEL_SERVICE, IDENTIFICATION_SERVICE, INFERENCE_SERVICE)


class FacegateServer:
    """Lifecycle: ``start()`` binds and answers health (NOT_SERVING); ``load()`` loads and warms the models and
    flips health to SERVING; ``stop()`` drains."""

    def __init__(self, config: ServerConfig, load: Callable[[], ServerConfig] | None = None,
                 config_path: Path | None = None) -> None:
        """``load`` reads the configuration again (as it was read for ``config``, from ``config_path`` and the
        command line): credentials can then be reloaded while serving (server.auth.reload)."""
        self.config = config
        self.registry = ModelRegistry(ModelRepository(config.model_repository), config)
        # The first pool placed, before any model's: its threads begin on the first CPU.
        self.cpu_pool = ThreadPoolExecutor(config.cpu_workers, thread_name_prefix="cpu",
                                           initializer=self.registry.compute_pool_init())
        lower = partial(lower_this_thread, config.compute_nice)  # gallery threads wait on the database: not placed
        self.health = health.aio.HealthServicer()
        self.liveness: LivenessPipeline | None = None
        self.identification: IdentificationService | None = None
        self._loading = True
        # Gallery reads and writes (each thread has its own SQLite connection; PostgreSQL uses a pool of 4).
        self.db_pool = ThreadPoolExecutor(4, thread_name_prefix="gallery-db", initializer=lower)
        self._versions: list[common_pb2.ModelVersion] = []
        self._identify_versions: list[common_pb2.ModelVersion] = []
        self.audit = AuditLog(config.audit)
        self.memory_group = own_memory_group()  # (for the start-up log and the budgets' fit to its limit)
        self.request_bytes = Budget("in-flight request bytes", config.max_inflight_request_bytes, "bytes")
        self.pixels = Budget("decoded pixels", config.max_inflight_pixels, "pixels")
        self.infer_bytes = Budget("ModelInfer input bytes", config.max_inflight_infer_bytes, "bytes")
        self.budget_fit = BudgetFit((self.pixels, self.request_bytes, self.infer_bytes), budget_floors(config),
                                    self.memory_group, config.fit_memory_budgets, config.workers)
        self._limit_task: asyncio.Task[None] | None = None
        # Threads that wait on video decodes in worker processes: compute work at the compute threads' priority, not
        # placed on one CPU, and never the CPU pool's threads (waiting there stalled every other call's decoding).
        # A worker process takes its CPUs and nice value from its waiting thread.
        self.video_pool = ThreadPoolExecutor(config.clip_limits.videos_at_once(config.max_inflight_pixels),
                                             thread_name_prefix="video-wait", initializer=lower)
        self.calls = Budget("calls in flight", config.max_inflight_calls, "calls")
        self.gates = {name: WaitGate(name, config.max_queue_wait_s, config.admit_min_in_flight)
                      for name in ("liveness", "identification")}
        gated = {f"/{LIVENESS_SERVICE}/CheckLiveness": self.gates["liveness"],
                 f"/{IDENTIFICATION_SERVICE}/IdentifyFromClip": self.gates["identification"],
                 f"/{IDENTIFICATION_SERVICE}/EnrollFromClip": self.gates["identification"]}
        side = Budget("health checks and streams", config.max_health_and_stream_calls, "calls")
        streams = Budget("streams", config.stream_calls(), "calls")
        table = caller_table()  # with --workers, each caller's own limits hold for the set of workers
        self.per_caller = SharedCallerState(table) if table is not None else PerCaller()
        # With rate_scope = "deployment", the buckets refill at this replica's share of each caller's rate.
        self.rates = (DeploymentRates(config.shared_rates_url, config.auth.rate_sync_s, replica_id(),
                                      worker_index() or 0, on_sync=self._rates_synced)
                      if config.shared_rates_url else None)
        self._rates_task: asyncio.Task[None] | None = None
        self._shares_shown: set[str] = set()  # callers whose share the metrics read
        self.auth = AuthInterceptor(Authenticator(config.auth), self.audit, self.request_bytes, self.calls, gated,
                                    side, config.default_deadline_s,
                                    self.per_caller if self.rates is None else DeploymentShare(self.per_caller,
                                                                                               self.rates), streams)
        self.metrics = Metrics()
        self.metrics.watch_models(self.registry)
        self.metrics.watch_gates(self.gates)
        self.metrics.watch_budgets({"calls": self.calls, "request_bytes": self.request_bytes,
                                    "decoded_pixels": self.pixels, "infer_input_bytes": self.infer_bytes,
                                    "health_and_streams": side, "streams": streams})
        self.reloader = CredentialReloader(
            config, self.auth.install, load, config_path, on_outcome=self._reloaded,
            audit=lambda why, outcome, reason: self.audit.record(rpc="ReloadCredentials", caller=f"operator ({why})",
                                                                 outcome=outcome, reason=reason),
            adjust=self._adjust)
        self.metrics.credentials_loaded.set(self.reloader.loaded_at)
        self.metrics.gallery_templates.set_function(
            lambda: self.identification.gallery.templates() if self.identification is not None else 0)
        self._draining = False
        self.tracing = Tracing(config.tracing, package_version()) if config.tracing.enabled else None
        if (tracing := self.tracing) is not None:
            self.metrics.watch_tracing(tracing.counts, lambda: tracing.sample_ratio)
        self.server = grpc.aio.server(
            # Metrics and spans outermost (they see the final status); then errors mapped, so refusals from the auth
            # interceptor get the same status details.
            # Without a metrics port nothing is counted, without a collector nothing traced: off costs nothing.
            interceptors=[*([MetricsInterceptor(self.metrics)] if config.metrics_port else []),
                          *([self.tracing.interceptor()] if self.tracing is not None else []),
                          ErrorMappingInterceptor(on_unrecoverable=self._unrecoverable), self.auth],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_concurrent_streams", config.max_concurrent_streams),
                # Off unless several workers share the port: a second server on a busy port must fail, not share.
                ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
            ],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        liveness_pb2_grpc.add_LivenessServiceServicer_to_server(
            LivenessServicer(lambda: self.liveness, lambda: self._versions, self.metrics), self.server)
        models_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.registry), self.server)
        identification_pb2_grpc.add_IdentificationServiceServicer_to_server(
            IdentificationServicer(lambda: self.identification, lambda: self._loading,
                                   lambda: self._identify_versions, self.metrics), self.server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.registry, lambda: not self._loading and not self._draining, self.infer_bytes),
            self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICES[1:], health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = 0
        self.health_port = (HealthPort(self.health, config.host, config.health_port, config.max_health_and_stream_calls,
                                       reuse_port=config.workers > 1) if config.health_port else None)

    async def start(self) -> int:
        address = f"{self.config.host}:{self.config.port}"
        creds = self.reloader.server_credentials()  # TLS material gRPC asks for again at each new handshake
        for name in self.reloader.certificates:  # (read at each scrape, so a reload's new certificate shows at once)
            self.metrics.certificate_expiry.labels(name).set_function(partial(self.reloader.not_after, name))
            self.metrics.certificate_start.labels(name).set_function(partial(self.reloader.not_before, name))
        self.port = (self.server.add_secure_port(address, creds) if creds is not None
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"could not bind {self.config.host}:{self.config.port}")
        if self._loading:  # a worker that binds after loading is already SERVING
            for service in SERVICES:
                await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.health_port is not None:
            await self.health_port.start()
        if self.rates is not None:
            self._rates_task = asyncio.get_running_loop().create_task(self.rates.run(self.db_pool))
        if self.config.metrics_port:
            try:
                self.metrics.serve(self.config.metrics_port, self.config.metrics_host)
                log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, self.config.metrics_port)
            except OSError as exc:  # serving matters more than its metrics
                log.error("metrics endpoint %s:%d not started: %s", self.config.metrics_host,
                          self.config.metrics_port, exc)
        log.info("%s", describe(self.memory_group, own_score()))
        auth = self.config.auth
        log.info("listening on %s:%d (%s; authentication %s; %s)", self.config.host,
                 self.port, "mutual TLS" if auth.client_ca else "TLS" if self.config.tls_cert else "plaintext",
                 "on" if auth.enabled else "OFF (loopback only)" if not auth.insecure_public else
                 "OFF on a public address (--insecure-public)",
                 # (a worker joining others binds once warm: it is SERVING already)
                 "NOT_SERVING until models are warm" if self._loading else "SERVING")
        return self.port

    async def load(self) -> None:
        names = [DETECTOR, *(s.name for s in LIVENESS_SPECS)]
        await self.registry.load(names)
        await self.registry.warmup(names)
        self._versions = [model_version(self.registry.models[n]) for n in names]
        self.liveness = LivenessPipeline(
            self.registry.batcher(DETECTOR),
            [(spec, self.registry.batcher(spec.name)) for spec in LIVENESS_SPECS],
            self.config.liveness, self.cpu_pool, pixels=self.pixels, gate=self.gates["liveness"],
        )
        await self._load_identification()
        self.budget_fit.start()  # (once warm: what the models hold is known)
        if self.config.memory_limit_check_s > 0 and self.memory_group is not None and self.config.fit_memory_budgets:
            self._limit_task = asyncio.get_running_loop().create_task(
                self.budget_fit.watch(self.config.memory_limit_check_s))
        # The runtimes' own thread pools exist now (made while loading): they compute, so they yield to the loop.
        lowered = lower_compute_threads(self.config.compute_nice, keep={threading.get_native_id()})
        log.info("%d compute threads at nice %d (the event loop, grpc.aio's poller and gRPC I/O at 0)", lowered,
                 self.config.compute_nice)
        self._loading = False
        for service in SERVICES:
            if service != IDENTIFICATION_SERVICE or self.identification is not None:
                await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("models warm; SERVING")

    async def _load_identification(self) -> None:
        ensemble = find_ensemble(self.config.model_repository, self.config.identification_ensemble)
        if ensemble is None:
            log.warning("no identification ensemble in %s/ensembles: IdentificationService answers "
                        "FAILED_PRECONDITION (run `make identify-models`)", self.config.model_repository)
            return
        members = list(ensemble.members)
        await self.registry.load_ensemble(members)
        loop = asyncio.get_running_loop()
        store = await loop.run_in_executor(self.db_pool, GalleryStore, self.config.gallery_target())
        clips = ClipPipeline(self.registry.batcher(DETECTOR), [self.registry.batcher(m) for m in members],
                             ensemble, self.cpu_pool, self.config.clip_limits, self.pixels,
                             self.gates["identification"], self.config.clip_reduced_decode, self.video_pool)
        self._identify_versions = [model_version(self.registry.models[n]) for n in (DETECTOR, *members)]
        self.identification = IdentificationService(clips, store, self.db_pool, self.liveness, self.audit)
        log.info("identification: ensemble %s v%s (%d members), gallery %s", ensemble.name, ensemble.version,
                 len(members), store.url)

    def _rates_synced(self, outcome: str) -> None:
        self.metrics.rate_syncs.labels(outcome).inc()
        if self.rates is not None:  # each new caller's share, read at each scrape (so it shows going stale too)
            for caller in set(self.rates.callers) - self._shares_shown:
                self.metrics.rate_share.labels(caller).set_function(partial(self.rates.fraction, caller))
                self._shares_shown.add(caller)

    def _adjust(self, new: ServerConfig) -> str:
        """What a reload applies beyond the credentials; says what changed, for its log line."""
        parts = [("admission", adjust_admission(new, self.calls, self.gates, self.budget_fit)),
                 ("tracing", self.tracing.adjust(new.tracing) if self.tracing is not None else "")]
        return "; ".join(f"{name}: {changed}" for name, changed in parts if changed)

    def _reloaded(self, outcome: str) -> None:
        self.metrics.credential_reloads.labels(outcome).inc()
        self.metrics.credentials_reload_ok.set(outcome == "applied")
        if outcome == "applied":
            self.metrics.credentials_loaded.set(self.reloader.loaded_at)

    def _unrecoverable(self) -> None:
        broken = set(self.registry.broken)
        log.error("a model is broken (%s); health -> NOT_SERVING where it is needed", ", ".join(sorted(broken)))
        needs = {LIVENESS_SERVICE: {DETECTOR, *(s.name for s in LIVENESS_SPECS)},
                 IDENTIFICATION_SERVICE: {DETECTOR, *(self.identification.ensemble.members
                                                      if self.identification is not None else ())}}
        down = ["", *(service for service, models in needs.items() if models & broken)]  # each follows its models

        async def mark() -> None:
            for service in down:
                await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

        self._health_task = asyncio.get_running_loop().create_task(mark())

    async def stop(self, grace_s: float | None = None, delay_s: float | None = None) -> None:
        """Drain: health NOT_SERVING while still accepting for ``drain_delay_s``, then refuse new RPCs and let
        those in flight finish within ``drain_grace_s``, then release the models."""
        self._draining = True  # ServerReady / ModelReady say false from now on
        await self.health.enter_graceful_shutdown()
        delay = self.config.drain_delay_s if delay_s is None else delay_s
        if delay > 0:
            await asyncio.sleep(delay)
        await self.reloader.close()
        self.auth.close_streams()  # watchers were told NOT_SERVING; the grace period is for calls in flight
        await self.server.stop(self.config.drain_grace_s if grace_s is None else grace_s)
        if self.health_port is not None:  # (it answered NOT_SERVING through the drain)
            await self.health_port.stop()
        await self.registry.stop()
        if self.identification is not None:
            await self.identification.close()
        for task in (self._rates_task, self._limit_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.rates is not None:
            await asyncio.get_running_loop().run_in_executor(self.db_pool, self.rates.close)
        self.db_pool.shutdown(wait=True)
        self.video_pool.shutdown(wait=True)
        self.cpu_pool.shutdown(wait=True)
        self.audit.close()
        if self.tracing is not None:
            self.tracing.close()


async def serve(config: ServerConfig, bind_after_load: bool = False, load: Callable[[], ServerConfig] | None = None,
                config_path: Path | None = None) -> None:
    """Listen, load and warm the models, serve until SIGTERM/SIGINT, then drain. ``bind_after_load``: listen only
    once warm (a worker joining others on a shared port). With ``load``, SIGHUP and changed credential files
    reload the credentials."""
    server = FacegateServer(config, load, config_path)
    if not bind_after_load:
        await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watching: asyncio.Task[None] | None = None
    if server.reloader.enabled:
        loop.add_signal_handler(signal.SIGHUP, server.reloader.request, "SIGHUP")
        if config.auth.reload_poll_s > 0:
            watching = asyncio.create_task(server.reloader.watch(config.auth.reload_poll_s))
    load_task = asyncio.create_task(server.load())
    stop_task = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if load_task in done and load_task.exception() is not None:
        if not bind_after_load:
            await server.stop(0, 0)
        raise load_task.exception()  # type: ignore[misc]
    if bind_after_load:
        if stop.is_set():  # asked to stop before it ever listened
            load_task.cancel()
            return
        await server.start()
    await stop.wait()
    log.info("signal received: draining (%.1f s accepting, then up to %.1f s for calls in flight)",
             config.drain_delay_s, config.drain_grace_s)
    load_task.cancel()
    if watching is not None:
        watching.cancel()
    await server.stop()
    log.info("stopped")
