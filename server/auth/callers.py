"""Who may call: the configured callers, and how a call's credentials map to one of them.

A call identifies its caller by a bearer token (``authorization: Bearer <token>`` metadata), else by its client
certificate (mutual TLS; the identity is the certificate's first SAN URI, else a SAN DNS name, else the CN,
matched against the callers' names). With no callers configured, authentication is off: the server then
accepts calls only on loopback (refused at start-up elsewhere unless ``insecure_public``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from server.admission import bucket_size
from server.auth.costs import by_method
from server.auth.scopes import SCOPES, Scope, grants, required_scope
from server.auth.tokens import hash_token, matches, parse_hash


class CredentialFilesError(ValueError):
    """A credential file (the token file, the TLS files) that cannot be read or holds nothing usable. At start-up
    the server does not start (named, with the reason and never the file's content); a reload keeps what is in
    force."""


@dataclass(frozen=True)
class CallerConfig:
    name: str
    """The caller's identity: the name a token stands for, and what a client certificate's SAN URI / SAN DNS / CN
    must equal. It appears in the audit log."""
    scopes: tuple[str, ...] = ()
    """liveness, identify, enrol, operator; identify and enrol may be limited to one collection (enrol:staff)."""
    token_hashes: tuple[str, ...] = ()
    """Salted hashes of the caller's bearer tokens (``facegate token hash``); never the tokens themselves."""
    max_in_flight: int = 0
    """Calls this caller may have in flight at once (every RPC but health checks and streams); one more is
    RESOURCE_EXHAUSTED for this caller alone. 0: only the server-wide limits."""
    rate_per_s: float = 0.0
    """Calls this caller may start a second, on average (the same calls as max_in_flight); one over is
    RESOURCE_EXHAUSTED for this caller alone, with the time until it may call again. 0: no rate of its own."""
    burst: int = 0
    """Calls it may start at once above ``rate_per_s`` after a quiet spell. 0: one second's worth (at least 1)."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.isprintable() or len(self.name) > 256:
            raise ValueError(f"caller name must be 1 to 256 printable characters, got {self.name!r}")
        if self.max_in_flight < 0:
            raise ValueError(f"caller {self.name!r}: max_in_flight must be >= 0 (0: no limit of its own), got "
                             f"{self.max_in_flight}")
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s >= 0) or self.burst < 0:
            raise ValueError(f"caller {self.name!r}: rate_per_s must be a finite number >= 0 and burst >= 0 (0: "
                             f"none of its own / one second's worth), got {self.rate_per_s} and {self.burst}")
        for s in self.scopes:
            Scope.parse(s)
        for h in self.token_hashes:
            parse_hash(h)


@dataclass(frozen=True)
class AuthConfig:
    client_ca: Path | None = None
    """PEM CA bundle: clients must present a certificate signed by it (mutual TLS; needs tls_cert and tls_key)."""
    callers: tuple[CallerConfig, ...] = ()
    token_file: Path | None = None
    """A file of bearer tokens (a mounted secret), one a line (``#`` lines and blank lines skipped), all for caller
    ``token_file_caller``; hashed when read. Two lines let a rotation overlap: old and new both work until the old
    line is removed."""
    token_file_caller: str = "default"  # noqa: S105 - a caller name, not a secret
    token_file_scopes: tuple[str, ...] = SCOPES
    token_file_max_in_flight: int = 0
    """The token file's caller's own limit on calls in flight, as a caller's ``max_in_flight``. 0: none."""
    insecure_public: bool = False
    """Allow serving a non-loopback address without authentication (never the default)."""
    reload_poll_s: float = 10.0
    """How often the credential files (the --config file, the token file, the TLS files) are checked for changes
    while serving; a change is reloaded (server.auth.reload). 0: only on SIGHUP."""
    call_costs: Mapping[str, float] = field(default_factory=dict)
    """What one call of a method takes from its caller's ``rate_per_s`` bucket, by method name
    (``IdentifyFromClip = 5``), or one unit of it where a request carries several (each clip of an EnrollFromClip,
    each batch item of a ModelInfer); 1 unless set, 0: not counted (server.auth.costs)."""

    rate_scope: str = "replica"
    """What each caller's ``rate_per_s`` holds for: ``replica`` (each server on its own: a caller spread over N
    replicas may start N times its rate) or ``deployment`` (the replicas share it through the gallery's PostgreSQL
    database; server.auth.deployment_rates). ``max_in_flight`` and ``burst`` stay per replica."""
    rate_sync_s: float = 1.0
    """With ``rate_scope = "deployment"``: how often each server exchanges what its callers ask for with the others
    (the shares follow a change of load within one or two of these)."""

    def __post_init__(self) -> None:
        if self.rate_scope not in ("replica", "deployment"):
            raise ValueError(f'rate_scope must be "replica" or "deployment", got {self.rate_scope!r}')
        if not (math.isfinite(self.rate_sync_s) and 0.05 <= self.rate_sync_s <= 60):
            raise ValueError(f"rate_sync_s must lie in [0.05, 60] seconds, got {self.rate_sync_s}")
        for s in self.token_file_scopes:
            Scope.parse(s)
        if self.token_file_max_in_flight < 0:
            raise ValueError(f"token_file_max_in_flight must be >= 0 (0: no limit of its own), got "
                             f"{self.token_file_max_in_flight}")
        if self.reload_poll_s < 0:
            raise ValueError(f"reload_poll_s must be >= 0 (0: reload only on SIGHUP), got {self.reload_poll_s}")
        names = [c.name for c in self.callers]
        if len(set(names)) != len(names):
            raise ValueError(f"caller names must be unique, got {names}")
        costs = self.costs
        for c in self.callers:  # a bucket smaller than a call the caller may make would refuse that call for good
            scopes = [Scope.parse(s) for s in c.scopes]
            top = max((cost for method, cost in costs.items() if grants(scopes, required_scope(method) or "")),
                      default=1.0)
            if c.rate_per_s > 0 and bucket_size(c.rate_per_s, c.burst) < top:
                raise ValueError(f"caller {c.name!r}: its bucket ({bucket_size(c.rate_per_s, c.burst)} at "
                                 f"rate_per_s = {c.rate_per_s:g}, burst = {c.burst}) is smaller than the costliest "
                                 f"call in [auth.call_costs] it may make ({top:g}), which it could then never make")

    @cached_property
    def costs(self) -> dict[str, float]:
        """``call_costs`` checked and keyed by full method name (``/package.Service/Method``)."""
        return by_method(self.call_costs)

    @property
    def enabled(self) -> bool:
        return bool(self.callers or self.token_file or self.client_ca)


@dataclass(frozen=True)
class Caller:
    name: str
    scopes: tuple[Scope, ...]
    via: str  # "token", "mtls" or "loopback" (authentication off)
    max_in_flight: int = 0  # 0: no limit of its own
    rate_per_s: float = 0.0  # 0: no rate of its own
    burst: int = 0  # 0: one second's worth


@dataclass
class _Entry:
    caller: Caller
    hashes: list[tuple[bytes, bytes]] = field(default_factory=list)


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self.enabled = config.enabled
        self._entries: dict[str, _Entry] = {}
        callers = list(config.callers)
        if config.token_file is not None:
            callers.append(CallerConfig(config.token_file_caller, config.token_file_scopes,
                                        read_token_file(config.token_file), config.token_file_max_in_flight))
        for c in callers:
            scopes = tuple(Scope.parse(s) for s in c.scopes)
            entry = self._entries.setdefault(c.name, _Entry(Caller(c.name, scopes, "token", c.max_in_flight,
                                                                   c.rate_per_s, c.burst)))
            entry.hashes.extend(parse_hash(h) for h in c.token_hashes)
        self._anonymous = Caller("anonymous (loopback, authentication off)", tuple(Scope(s) for s in SCOPES),
                                 "loopback")
        self._costs = config.costs

    def cost(self, method: str) -> float:
        """What a call of ``method`` (``/package.Service/Method``) takes from its caller's rate."""
        return self._costs.get(method, 1.0)

    @property
    def caller_names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def from_token(self, token: str) -> Caller | None:
        # Every entry is checked (no early exit) so the time taken does not tell which caller came close.
        found = None
        for entry in self._entries.values():
            for h in entry.hashes:
                if matches(token, h) and found is None:
                    found = entry.caller
        return found

    def from_certificate(self, identities: Sequence[str]) -> Caller | None:
        for ident in identities:
            entry = self._entries.get(ident)
            if entry is not None:
                return replace(entry.caller, via="mtls")
        return None

    def anonymous(self) -> Caller:
        return self._anonymous


def token_lines(text: str) -> list[str]:
    """The tokens of a token file: one a line; blank lines and ``#`` comments skipped (a token never starts with
    ``#``: ``facegate token new`` makes URL-safe base64)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_token_file(path: Path) -> tuple[str, ...]:
    """The salted hashes of the tokens in ``path`` (one a line, see ``token_lines``)."""
    try:
        tokens = token_lines(path.read_text())
        if not tokens:
            raise ValueError("it holds no token")
        return tuple(hash_token(t) for t in tokens)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # (a token's own text is never in these messages)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CredentialFilesError(f"the token file {path}: {reason}") from None


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def certificate_identities(auth_context: Mapping[str, Sequence[bytes]]) -> list[str]:
    """A verified client certificate's identities, most specific first: SAN URIs, SAN DNS names, then the CN."""
    out: list[str] = []
    for key in ("peer_uri", "peer_dns", "x509_common_name"):
        out.extend(v.decode(errors="replace") for v in auth_context.get(key, ()))
    return out
