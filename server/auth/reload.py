"""Credentials replaced while the server runs: the callers and their token hashes, the token file, and the TLS
certificate, key and client CA, without a restart and without dropping a call or a connection.

A reload is asked for with SIGHUP, or found by checking the files every ``[auth] reload_poll_s``: a Kubernetes
Secret mounted as a volume is updated in place and the process gets no signal, and cert-manager renews a
certificate the same way, so a server that read its files only at start-up went on serving the old certificate
until it expired. A reload goes through the same loader and checks as a start, and is applied whole or not at
all: on any error the credentials in force stay, and the error is logged, counted and audited (file names and the
reason; never a token, a hash or a key). Whether TLS and mutual TLS are on is fixed at start-up (it decides how the
port listens). A reload also applies, through ``adjust``, the trace sampling (``[tracing] sample_ratio`` and
``stage_spans``), so that every call can be traced through an incident and no longer after it, and the admission
limits (server.admission_reload: calls in flight, the memory budgets, the wait before shedding); everything else
the new settings change is reported as needing a restart. The settings in force after a reload (those of the start
with what a reload applies) are checked as a whole, as a start's are.

New TLS material reaches gRPC through its dynamic server credentials: gRPC asks for it at each new handshake, so
connections already open keep their session and new ones get the new certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from server.admission_reload import RELOADED as _RELOADED_ADMISSION
from server.auth.callers import AuthConfig, Authenticator
from server.auth.certificates import TlsFilesError, Validity, validity
from server.auth.chain import check_chain

if TYPE_CHECKING:
    from server.config import ServerConfig

log = logging.getLogger(__name__)

# What a reload applies; every other setting takes effect at the next start.
_RELOADED_AUTH = frozenset({"callers", "token_file", "token_file_caller", "token_file_scopes",
                            "token_file_max_in_flight", "client_ca", "call_costs"})
_RELOADED_SERVER = frozenset({"auth", "tracing", "tls_cert", "tls_key", "tls_server_names", "tls_trust_roots",
                              *_RELOADED_ADMISSION})
_RELOADED_TRACING = frozenset({"sample_ratio", "stage_spans"})


@dataclass(frozen=True)
class TlsMaterial:
    key: bytes
    cert: bytes
    client_ca: bytes | None
    validity: tuple[Validity, ...] = ()
    """When the served certificate and the client CA are valid (server.auth.certificates)."""

    def certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], root_certificates=self.client_ca)


def read_tls(cert: Path, key: Path, client_ca: Path | None, names: Sequence[str] = (),
             trust_roots: Path | None = None) -> TlsMaterial:
    """The TLS files, checked as OpenSSL will use them: a key that does not match its certificate, a file that is
    not PEM, a certificate that is not valid now, not for a server, or that does not name each of ``names``
    (server.auth.certificates), and with ``trust_roots`` a chain that clients trusting them would refuse
    (server.auth.chain), is refused here instead of failing every later handshake."""

    def read() -> TlsMaterial:
        return TlsMaterial(key.read_bytes(), cert.read_bytes(), client_ca.read_bytes() if client_ca else None)

    files = ", ".join(str(p) for p in (cert, key, client_ca) if p is not None)
    try:
        first = read()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.load_verify_locations(cafile=client_ca)
        # Files replaced one by one (by hand, not as a mounted Secret) can be read half old, half new: checked
        # above from disk, they must still be what was read before the check.
        if read() != first:
            raise TlsFilesError(f"the TLS files ({files}) changed while they were read")
    except ssl.SSLError as exc:  # its reason alone, e.g. KEY_VALUES_MISMATCH
        raise TlsFilesError(f"OpenSSL refused the TLS files ({files}): {exc.reason or exc}"
                            ) from None
    except OSError as exc:
        raise TlsFilesError(f"cannot read the TLS files ({files}): {exc.strerror or exc}") from None
    dates = validity(first.cert, cert, first.client_ca, client_ca, names=names)
    if trust_roots is not None:  # (after the checks above, whose reasons are more precise)
        check_chain(context, cert, first.cert, trust_roots, names)  # (the context that loaded them above)
    return replace(first, validity=dates)


def watched_files(config: ServerConfig, config_path: Path | None) -> tuple[Path, ...]:
    paths = (config_path, config.auth.token_file, config.tls_cert, config.tls_key, config.auth.client_ca,
             config.tls_trust_roots)
    return tuple(p for p in paths if p is not None)


def fingerprint(paths: tuple[Path, ...]) -> tuple[tuple[str, int, int, int], ...]:
    """What changes when a file is rewritten or a mounted Secret's symlinks are swapped (stat follows them)."""
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((str(p), st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(p), -1, -1, -1))
    return tuple(out)


def restart_needed(old: ServerConfig, new: ServerConfig) -> list[str]:
    """The settings that differ between ``old`` and ``new`` and that a reload does not apply."""
    changed = [f.name for f in fields(old) if f.name not in _RELOADED_SERVER
               and getattr(old, f.name) != getattr(new, f.name)]
    changed += [f"auth.{f.name}" for f in fields(AuthConfig) if f.name not in _RELOADED_AUTH
                and getattr(old.auth, f.name) != getattr(new.auth, f.name)]
    # (off at the start, there is no tracer to adjust: any change of [tracing] waits for a start)
    reloaded = _RELOADED_TRACING if old.tracing.enabled else frozenset()
    changed += [f"tracing.{f.name}" for f in fields(old.tracing) if f.name not in reloaded
                and getattr(old.tracing, f.name) != getattr(new.tracing, f.name)]
    return changed


@dataclass(frozen=True)
class Prepared:
    config: ServerConfig
    authenticator: Authenticator
    tls: TlsMaterial | None


class CredentialReloader:
    """Reads new credentials (``prepare``, off the event loop) and puts them in force (``apply``)."""

    def __init__(self, config: ServerConfig, install: Callable[[Authenticator], None],
                 load: Callable[[], ServerConfig] | None = None, config_path: Path | None = None,
                 on_outcome: Callable[[str], None] | None = None,
                 audit: Callable[[str, str, str], None] | None = None,
                 adjust: Callable[[ServerConfig], str] | None = None) -> None:
        self._current = config
        self._adjust = adjust or (lambda _: "")  # the other settings a reload applies; says what changed
        self._started = config  # what the settings a reload does not apply stay at until the next start
        self._install = install
        self._load = load
        self._config_path = config_path
        self._on_outcome = on_outcome or (lambda _: None)
        self._audit = audit or (lambda *_: None)
        self._lock = threading.Lock()
        self._pending_tls: grpc.ServerCertificateConfiguration | None = None
        self._seen = fingerprint(watched_files(config, config_path))
        self._running = asyncio.Lock()  # one reload at a time
        self._tls: TlsMaterial | None = None  # what gRPC was given last (None: plaintext)
        self._tasks: set[asyncio.Task[bool]] = set()
        self.loaded_at = time.time()

    @property
    def enabled(self) -> bool:
        return self._load is not None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """The port's TLS credentials (None: plaintext), fetched again by gRPC at each new handshake."""
        c = self._current
        if c.tls_cert is None or c.tls_key is None:
            return None
        self._tls = tls = read_tls(c.tls_cert, c.tls_key, c.auth.client_ca, c.tls_server_names, c.tls_trust_roots)
        return grpc.dynamic_ssl_server_credentials(tls.certificate_configuration(), self._fetch_tls,
                                                   require_client_authentication=tls.client_ca is not None)

    @property
    def certificates(self) -> tuple[str, ...]:
        """The certificates in force whose dates ``not_before`` and ``not_after`` give: ``server`` and, with mutual
        TLS, ``client_ca`` (fixed from start-up: a reload cannot turn TLS or mutual TLS on or off)."""
        return tuple(v.certificate for v in self._tls.validity) if self._tls is not None else ()

    def _dates(self, certificate: str) -> Validity | None:
        return next((v for v in self._tls.validity if v.certificate == certificate), None) if self._tls else None

    def not_after(self, certificate: str) -> float:
        """When the ``server`` certificate or the ``client_ca`` in force stops being valid (Unix time; 0: none)."""
        v = self._dates(certificate)
        return v.not_after if v is not None else 0.0

    def not_before(self, certificate: str) -> float:
        """When it became valid (Unix time; 0: none)."""
        v = self._dates(certificate)
        return v.not_before if v is not None else 0.0

    def _fetch_tls(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC on one of its threads at each handshake: None keeps the configuration it has.
        with self._lock:
            pending, self._pending_tls = self._pending_tls, None
        return pending

    def prepare(self) -> Prepared:
        """The new settings read and checked whole; raises ValueError or OSError, with nothing changed."""
        if self._load is None:
            raise ValueError("this server was not started from a configuration it can read again")
        new = self._load()
        old = self._current
        if (old.tls_cert is None) != (new.tls_cert is None):
            raise ValueError("turning TLS on or off needs a restart")
        if (old.auth.client_ca is None) != (new.auth.client_ca is None):
            raise ValueError("turning mutual TLS on or off needs a restart")
        # What will be in force: the start's settings, with what a reload applies. Checked whole (a reload's
        # max_inflight_calls against the start's max_concurrent_rpcs, say), as a start's are; raises ValueError.
        replace(self._started, **{name: getattr(new, name) for name in _RELOADED_SERVER})
        authenticator = Authenticator(new.auth)
        tls = None
        if new.tls_cert is not None and new.tls_key is not None:
            tls = read_tls(new.tls_cert, new.tls_key, new.auth.client_ca, new.tls_server_names,
                           new.tls_trust_roots)
        return Prepared(new, authenticator, tls)

    def apply(self, prepared: Prepared, why: str) -> None:
        self._install(prepared.authenticator)
        if prepared.tls is not None and prepared.tls != self._tls:  # (unchanged files: gRPC keeps what it has)
            self._tls = prepared.tls
            with self._lock:
                self._pending_tls = prepared.tls.certificate_configuration()
        later = restart_needed(self._started, prepared.config)
        adjusted = self._adjust(prepared.config)
        self._current = prepared.config
        self.loaded_at = time.time()
        log.info("credentials reloaded (%s): %d caller(s)%s%s%s", why, len(prepared.authenticator.caller_names),
                 "; TLS files read again" if prepared.tls is not None else "",
                 f"; {adjusted}" if adjusted else "",
                 f"; these changed settings take effect at the next start: {', '.join(later)}" if later else "")
        self._on_outcome("applied")
        self._audit(why, "applied", "")

    async def reload_async(self, why: str) -> bool:
        """Prepare (the files read on a worker thread) and apply, one reload at a time; or keep the credentials
        in force. True when applied."""
        async with self._running:
            self._seen = fingerprint(watched_files(self._current, self._config_path))
            try:
                prepared = await asyncio.to_thread(self.prepare)
            except (ValueError, OSError) as exc:
                log.error("credentials reload (%s) refused, the credentials in force are kept: %s", why, exc)
                self._on_outcome("refused")
                self._audit(why, "refused", str(exc))
                return False
            self.apply(prepared, why)  # on the event loop, between two calls' checks
            return True

    def request(self, why: str) -> None:
        """From a signal handler on the event loop: reload soon."""
        task = asyncio.get_running_loop().create_task(self.reload_async(why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def watch(self, poll_s: float) -> None:
        """Reload whenever a watched file changes (checked every ``poll_s``). A change that was refused is not
        tried again until the files change again (or SIGHUP)."""
        while True:
            await asyncio.sleep(poll_s)
            now = fingerprint(watched_files(self._current, self._config_path))
            if now != self._seen:
                await self.reload_async("files changed")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
