"""Server configuration: typed, validated dataclasses; read from an optional TOML file plus command-line flags.

Nothing here reads the environment or argv at import time; ``server.__main__`` does that once.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from engines.batching import BatcherConfig
from engines.declarations import DECLARATIONS
from engines.machine import usable_cpus
from engines.runtime.factory import RuntimeSettings
from engines.tensorrt.cache import BuilderSettings
from engines.vision.imaging import ImageLimits
from server.audit import AuditConfig
from server.auth.callers import AuthConfig, CallerConfig
from server.gallery.dialects import is_postgresql
from server.pipelines.clip_input import ClipLimits
from server.pipelines.liveness import LivenessConfig
from server.pipelines.quality import QualityConfig
from server.tracing import TracingConfig


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to listen on (loopback by default: exposing biometrics is a deliberate choice)."""
    port: int = 50051
    model_repository: Path = Path("model_repository")
    tls_cert: Path | None = None
    """PEM certificate chain: with tls_key, the server listens with TLS instead of plaintext."""
    tls_key: Path | None = None
    tls_server_names: tuple[str, ...] = ()
    """DNS names and IP addresses clients dial: the certificate must name each in its SANs, checked at start-up and
    at every reload (a certificate that does not is refused: every client's handshake would fail). Empty: no
    check."""
    tls_trust_roots: Path | None = None
    """PEM certificates that clients trust as roots (a cert-manager Secret's ``ca.crt``, or the bundle the clients
    use): the served chain must verify up to one of them for each of tls_server_names, every certificate in it
    valid now, checked by a TLS handshake in memory at start-up and at every reload (a chain that fails is
    refused: every client's handshake would fail). Unset: the chain is not checked."""
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest request accepted by gRPC; larger ones get RESOURCE_EXHAUSTED from the transport."""
    max_inflight_calls: int = 256
    """Calls (all but health) being served at once; more are refused at once with RESOURCE_EXHAUSTED and
    RetryInfo, so overload is shed instead of queued past every deadline."""
    max_health_and_stream_calls: int = 64
    """Health checks and streaming calls (health watches, reflection) in flight. Health needs no credential, and a
    stream stays open as long as its client likes, each holding one of gRPC's max_concurrent_rpcs slots; so they
    are bounded apart from the calls, and the two bounds together fit in gRPC's: no number of health checks,
    watches or slow uploads to them can lock the biometric calls out. More are refused at once with
    RESOURCE_EXHAUSTED. Streams may hold only ``stream_calls`` of them: the rest stay free for health checks, so
    that no number of open watches can make the probes fail."""
    max_concurrent_rpcs: int = 512
    """gRPC's own limit (a backstop above max_inflight_calls + max_health_and_stream_calls): beyond it
    RESOURCE_EXHAUSTED before any work."""
    max_concurrent_streams: int = 1024
    """HTTP/2 streams one connection may have open (grpc.max_concurrent_streams; gRPC's own default is unbounded).
    Kept above the call limits: a stream over it is refused with REFUSED_STREAM, which clients see as UNAVAILABLE
    instead of a clean RESOURCE_EXHAUSTED."""
    max_inflight_request_bytes: int = 256 * 1024 * 1024
    """Encoded request bytes all calls in flight may hold together; over it -> RESOURCE_EXHAUSTED (RetryInfo)."""
    max_inflight_pixels: int = 250_000_000
    """Decoded pixels all calls in flight may hold together (3 bytes each); over it -> RESOURCE_EXHAUSTED. With
    ``workers``, this and the two other memory budgets hold for the set: each worker gets 1/N of each, and at
    least one largest request (server.workers.memory_budget_share)."""
    max_inflight_infer_bytes: int = 64 * 1024 * 1024
    """Input tensor bytes all ModelInfer calls in flight may hold together; over it -> RESOURCE_EXHAUSTED. The
    pixel budget does not cover them, and a model's activations grow with its inputs: the detector at its largest
    inputs (640x640) took about 37 MB an input, and 16 callers of its largest requests took the server to 77 % of
    the Deployment's memory limit with only the request bytes to hold them (benchmarks/README.md, *Memory at the
    limits*). 64 MiB is 13 such inputs, or 838 of a liveness model's."""
    fit_memory_budgets: bool = True
    """Lower the three max_inflight_* budgets at start, once the models are warm, so that the worst load measured
    stays 10 % under the memory limit the server's control group runs under (server/memory_budgets.py): never above
    their settings, never below one largest request; fitted again when the limit changes (memory_limit_check_s).
    The log and facegate_budget_capacity say what they became. Default budgets under the Deployment's 4 GiB are not
    changed. False keeps them as set."""
    memory_limit_check_s: float = 5.0
    """How often the server reads its group's memory limit again, to fit the budgets anew when it has changed (a
    Kubernetes in-place resize changes it under a running container); 0 fits them once, at start."""
    max_queue_wait_s: float = 0.5
    """Longest a liveness or identification call is expected to take (calls in flight over the measured
    completion rate) before new calls are refused at once with RESOURCE_EXHAUSTED and RetryInfo: overload is
    shed at the door instead of queued until deadlines pass. Also: no call is admitted that would miss its own
    deadline."""
    workers: int = 1
    """Serving processes sharing the port (Linux SO_REUSEPORT; the kernel spreads connections over them). Each
    has its own event loop, models and compute threads, so more than one refuses overload at several times the
    rate one Python event loop can; each holds its own copy of the models (memory x workers). Worker i serves
    metrics on metrics_port + i and writes its own audit file (audit.jsonl, audit.w1.jsonl, ...)."""
    admit_min_in_flight: int = 32
    """Calls per pipeline always admitted, whatever the estimate (a burst on an idle server is not refused)."""
    default_deadline_s: float = 30.0
    """Deadline applied to calls that set none, so no request holds resources forever."""
    metrics_port: int = 8002
    """Prometheus metrics over HTTP (GET /metrics) on this port; 0 turns them off."""
    metrics_host: str = "127.0.0.1"
    """Where the metrics endpoint listens (loopback by default; 0.0.0.0 for a scraper in the cluster)."""
    health_port: int = 0
    """A second port on ``host``, always plaintext, that serves health checks (grpc.health.v1 Check) alone: for
    probes that cannot present TLS or a client certificate (Kubernetes' gRPC probes; server.health_port). 0: none
    (health is served on the main port in any case)."""
    auth: AuthConfig = field(default_factory=AuthConfig)
    """Caller identity and scopes ([auth], [[auth.callers]]). Off is allowed only on a loopback address."""
    audit: AuditConfig = field(default_factory=AuditConfig)
    """Where the audit log goes ([audit])."""
    tracing: TracingConfig = field(default_factory=TracingConfig)
    """OpenTelemetry spans to a collector ([tracing]; off unless otlp_endpoint is set)."""
    drain_delay_s: float = 1.0
    """On SIGTERM: health turns NOT_SERVING at once but RPCs are still accepted for this long, so load balancers
    stop routing here and calls already on the wire are taken in (grpc cancels calls not yet accepted)."""
    drain_grace_s: float = 10.0
    """Then: refuse new RPCs, let those in flight finish for up to this long, and cancel the rest."""
    compute_nice: int = 19
    """Nice value of the compute threads (inference, decoding, gallery) relative to the event loop and gRPC's I/O
    threads at 0: when every core is busy, the loop that admits, sheds and answers calls runs first. Changes nothing
    while a core is idle; 0 turns it off (Linux only). The threads also yield to any busy process in the server's
    own scheduling group (its container or session): give it one of its own, or use 10 where it cannot have one
    (README, *Sharing the machine*)."""
    pin_compute_threads: bool = True
    """Put each compute thread (decoding, engine instances) on a CPU of its own, each pool's threads spread over the
    CPUs the process may use; false leaves placement to the OS, which stacks nice-19 threads on one core while the
    event loop's idles (``server/placement.py``: CheckLiveness and IdentifyFromClip 1.2x at saturation, measured on
    2 cores). Linux only."""
    cpu_workers: int = field(default_factory=lambda: max(2, min(8, usable_cpus())))
    """Threads for decoding, resizing and the gallery search: one per CPU this process may use (its container's
    CPU limit or cpuset, ``engines.machine.usable_cpus``), 2 to 8. They release the GIL in native code but
    take it back between frames, and every extra thread is one more waiting for it: with 4 on 2 cores the cores
    stood ~25 % idle at 16 clips in flight; 2 served 1.02-1.15x the clips at c4-c16, c1 p50 0.99-1.05x
    (side by side, Zen 4 EPYC). On the AMX Xeon, 3 served 0.93-0.96x the clips of 2 at c16."""
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    """Which runtime serves the models and how ([runtime] in TOML)."""
    batching_enabled: bool = True
    """False runs every request alone (the no-batching baseline of the benchmarks)."""
    batching: dict[str, BatcherConfig] = field(default_factory=dict)
    """Per-model overrides of the batcher defaults in each model's declaration ([batching.<model>])."""
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    gallery_url: str = ""
    """Where the gallery lives: ``sqlite:///data/gallery.sqlite`` (embedded) or
    ``postgresql://user@host:5432/facegate`` (shared by replicas; ``?host=/socket/dir`` for a Unix socket).
    Empty: the SQLite file gallery_path. Also --gallery-url and FACEGATE_GALLERY_URL."""
    gallery_path: Path = Path("data/gallery.sqlite")
    """SQLite file of the gallery when gallery_url is empty (created on first start)."""
    identification_ensemble: str = ""
    """Ensemble manifest under <model_repository>/ensembles/ to serve; empty = the only (or first) one."""
    clip_limits: ClipLimits = field(default_factory=ClipLimits)
    """A clip's limits, in IdentifyFromClip and each clip of EnrollFromClip ([identification] and
    [identification.frame] in TOML)."""
    clip_reduced_decode: bool = True
    """Decode clip frames only as large as needed (JPEG scaled down inside libjpeg): the detection frames whole,
    the rest at the largest scale-down that keeps the face crop as large as its use needs. False decodes every
    frame whole (the baseline of the benchmarks)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must lie in [0, 65535], got {self.port}")
        if not 0 <= self.health_port <= 65535 or (self.health_port and self.health_port in (
                self.port, self.metrics_port)):
            raise ValueError(f"health_port must lie in [1, 65535] and differ from port and metrics_port (0: none), "
                             f"got {self.health_port}")
        if self.auth.rate_scope == "deployment" and not is_postgresql(self.gallery_url):
            raise ValueError('[auth] rate_scope = "deployment" shares callers\' rates through the gallery\'s '
                             "PostgreSQL database: set gallery_url to a postgresql:// URL")
        if self.max_message_bytes < self.liveness.image.max_bytes:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) must be at least liveness.image.max_bytes "
                f"({self.liveness.image.max_bytes}), or valid images could never arrive"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"tls_cert ({self.tls_cert}) and tls_key ({self.tls_key}) must be given together")
        if not isinstance(self.tls_server_names, tuple):
            raise ValueError(f"tls_server_names must be a list of names, got {self.tls_server_names!r}")
        if self.tls_server_names and self.tls_cert is None:
            raise ValueError(f"tls_server_names ({list(self.tls_server_names)}) needs tls_cert and tls_key")
        if self.tls_trust_roots is not None and self.tls_cert is None:
            raise ValueError(f"tls_trust_roots ({self.tls_trust_roots}) needs tls_cert and tls_key")
        for name in self.tls_server_names:
            if not isinstance(name, str) or not name or "*" in name or any(c.isspace() for c in name):
                raise ValueError(f"tls_server_names: {name!r} is not a name a client dials (a DNS name or an IP "
                                 f"address, no wildcard)")
        if self.runtime.tensorrt_precision not in ("fp16", "fp32"):
            raise ValueError(f"tensorrt_precision must be fp16 or fp32, got {self.runtime.tensorrt_precision!r}")
        if not 0 <= self.compute_nice <= 19:
            raise ValueError(f"compute_nice must lie in [0, 19], got {self.compute_nice}")
        if not 1 <= self.workers <= 64:
            raise ValueError(f"workers must lie in [1, 64], got {self.workers}")
        if self.workers > 1 and self.port == 0:
            raise ValueError("workers > 1 needs a fixed port: every worker binds the same one")
        if self.cpu_workers < 1:
            raise ValueError(f"cpu_workers must be >= 1, got {self.cpu_workers}")
        if not self.auth.enabled and not is_loopback(self.host) and not self.auth.insecure_public:
            raise ValueError(
                f"refusing to serve biometric RPCs on {self.host} without authentication: configure callers "
                f"([[auth.callers]] with token hashes, --token-file, or --client-ca for mutual TLS), bind a "
                f"loopback address, or pass --insecure-public if the network itself is trusted")
        if self.auth.client_ca is not None and self.tls_cert is None:
            raise ValueError(f"client_ca ({self.auth.client_ca}) needs tls_cert and tls_key: mutual TLS is TLS")
        if self.memory_limit_check_s < 0:
            raise ValueError(f"memory_limit_check_s must be >= 0 (0: fit the budgets once), got "
                             f"{self.memory_limit_check_s}")
        if self.max_queue_wait_s <= 0 or self.admit_min_in_flight < 1:
            raise ValueError(f"max_queue_wait_s must be > 0 and admit_min_in_flight >= 1, got "
                             f"{self.max_queue_wait_s}, {self.admit_min_in_flight}")
        side = self.max_health_and_stream_calls
        if side < 1 or self.max_inflight_calls + side > self.max_concurrent_rpcs:
            raise ValueError(f"max_health_and_stream_calls ({side}) must be >= 1, and with max_inflight_calls "
                             f"({self.max_inflight_calls}) at most max_concurrent_rpcs ({self.max_concurrent_rpcs}), "
                             f"or health checks and streams could take the slots calls need")
        if self.max_message_bytes < self.clip_limits.frame.max_bytes:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) must be at least identification.frame.max_bytes "
                f"({self.clip_limits.frame.max_bytes}), or valid frames could never arrive")
        if self.max_inflight_infer_bytes < self.max_message_bytes:
            raise ValueError(f"max_inflight_infer_bytes ({self.max_inflight_infer_bytes}) must be at least "
                             f"max_message_bytes ({self.max_message_bytes}), or a valid ModelInfer could never run")
        if self.max_inflight_pixels < self.clip_limits.max_request_pixels:
            raise ValueError(f"max_inflight_pixels ({self.max_inflight_pixels}) must be at least "
                             f"identification.max_request_pixels ({self.clip_limits.max_request_pixels})")

    def stream_calls(self) -> int:
        """Of max_health_and_stream_calls, what streams may hold: a quarter (at least one) is kept for health
        checks. A kubelet's probe is a check, and 64 watches held open had taken every slot: the probes failed."""
        side = self.max_health_and_stream_calls
        return side - max(1, side // 4) if side > 1 else side

    @property
    def shared_rates_url(self) -> str:
        """The database the replicas share callers' rates through ("" when each holds them on its own)."""
        return self.gallery_url if self.auth.rate_scope == "deployment" else ""

    def gallery_target(self) -> Path | str:
        """The gallery's database: a SQLite path, or a URL."""
        return self.gallery_url or self.gallery_path

    def batcher_for(self, model: str, declared: BatcherConfig | None = None) -> BatcherConfig:
        """The override for ``model`` if configured, else its declared defaults (``declared`` for models only the
        repository knows, such as trained ensemble members)."""
        cfg = self.batching.get(model) or declared or _declared_batching(model)
        return cfg if self.batching_enabled else cfg.unbatched()


def is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _declared_batching(model: str) -> BatcherConfig:
    decl = DECLARATIONS.get(model)
    return decl.batching if decl is not None else BatcherConfig()


# TOML scalars against the plain types settings declare: ``compute_nice = "19"`` or ``int8 = "maybe"`` is refused
# by name instead of being taken as truthy or failing later (a float setting takes an integer too).
_SCALARS: dict[Any, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _build(cls: type, data: Any, where: str, base: Any = None) -> Any:
    """``cls`` from a TOML table, its settings checked by name and type; what the table leaves out comes from
    ``base`` (an instance of ``cls``) where one is given, else from the field defaults."""
    if not isinstance(data, dict):  # e.g. ``image = 3`` where the table [liveness.image] belongs
        raise ValueError(f"{where} must be a table, got {data!r}")
    if base is not None:
        data = {**_asdict(base), **data}
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    hints = get_type_hints(cls)
    for name, value in data.items():
        allowed = _SCALARS.get(hints.get(name))
        if allowed is not None and (not isinstance(value, allowed) or (bool not in allowed and
                                                                        isinstance(value, bool))):
            raise ValueError(f"{where}: {name} must be {hints[name].__name__}, got {value!r}")
    return cls(**data)


_SECTIONS = frozenset({"server", "auth", "audit", "tracing", "liveness", "identification", "runtime", "batching"})


def load_config(path: Path | None, auth_overrides: dict[str, Any] | None = None, **overrides: Any) -> ServerConfig:
    """Read a TOML file (sections: [server], [runtime], [runtime.tensorrt_builder], [liveness], [liveness.image],
    [liveness.quality], [identification], [identification.frame], [batching.<model>]) and apply keyword overrides
    (from the command line) on top."""
    data: dict[str, Any] = tomllib.loads(path.read_text()) if path else {}
    # A setting outside its section, or a misspelt section, would otherwise be read by nothing and silently keep
    # its default (``max_queue_wait_s = 0.1`` above every section header did exactly that).
    stray = sorted(k for k, v in data.items() if k not in _SECTIONS or not isinstance(v, dict))
    if stray:
        raise ValueError(f"{path}: {stray} outside the known sections {sorted(_SECTIONS)}; every setting belongs to "
                         f"one (e.g. [server] max_queue_wait_s = 0.5)")
    server = dict(data.get("server", {}))
    for key in ("model_repository", "gallery_path", "tls_cert", "tls_key", "tls_trust_roots"):
        if key in server:
            server[key] = Path(server[key])
    if isinstance(server.get("tls_server_names"), list):
        server["tls_server_names"] = tuple(server["tls_server_names"])
    auth_section = dict(data.get("auth", {}))
    callers = tuple(_build(CallerConfig, {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()},
                           "[[auth.callers]]") for c in auth_section.pop("callers", []))
    for key in ("client_ca", "token_file"):
        if key in auth_section:
            auth_section[key] = Path(auth_section[key])
    if "token_file_scopes" in auth_section:
        auth_section["token_file_scopes"] = tuple(auth_section["token_file_scopes"])
    auth_section.update({k: v for k, v in (auth_overrides or {}).items() if v is not None})
    auth = _build(AuthConfig, {**auth_section, "callers": callers}, "[auth]")
    audit_section = dict(data.get("audit", {}))
    if "path" in audit_section:
        audit_section["path"] = Path(audit_section["path"]) if audit_section["path"] != "-" else None
    audit = _build(AuditConfig, audit_section, "[audit]")
    tracing_section = dict(data.get("tracing", {}))
    if "ca_file" in tracing_section:
        tracing_section["ca_file"] = Path(tracing_section["ca_file"])
    tracing = _build(TracingConfig, tracing_section, "[tracing]")
    live = dict(data.get("liveness", {}))
    image = _build(ImageLimits, live.pop("image", {}), "[liveness.image]")
    quality = _build(QualityConfig, live.pop("quality", {}), "[liveness.quality]")
    liveness = _build(LivenessConfig, {**live, "image": image, "quality": quality}, "[liveness]")
    ident = dict(data.get("identification", {}))
    # A frame's defaults are the clip's own (4 MB, 4 MP), not a CheckLiveness image's: the section changes only
    # what it names.
    frame = _build(ImageLimits, ident.pop("frame", {}), "[identification.frame]", ClipLimits().frame)
    clip_limits = _build(ClipLimits, {**ident, "frame": frame}, "[identification]")
    rt = dict(data.get("runtime", {}))
    builder = _build(BuilderSettings, rt.pop("tensorrt_builder", {}), "[runtime.tensorrt_builder]")
    runtime = _build(RuntimeSettings, {**rt, "tensorrt_builder": builder}, "[runtime]")
    batching: dict[str, BatcherConfig] = {}
    for model, section in data.get("batching", {}).items():
        section = dict(section)
        if "preferred_batch_sizes" in section:
            section["preferred_batch_sizes"] = tuple(section["preferred_batch_sizes"])
        batching[model] = _build(BatcherConfig, section, f"[batching.{model}]", _declared_batching(model))
    given = {k: v for k, v in overrides.items() if v is not None}
    return _build(ServerConfig, {**server, "batching": batching, "liveness": liveness, "runtime": runtime,
                                 "auth": auth, "audit": audit, "tracing": tracing, "clip_limits": clip_limits, **given},
                  "[server]")


def _asdict(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}
