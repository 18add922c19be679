"""Which scope each RPC needs, and whether a caller's scopes grant it.

Scopes: ``liveness`` (CheckLiveness), ``identify`` (IdentifyFromClip, ListPersons), ``enrol`` (gallery changes)
and ``operator`` (models, statistics, the inference protocol, reflection); ``identify`` and ``enrol`` may be
limited to one collection (``enrol:staff``). Health stays open for probes. An RPC not listed needs ``operator``:
new methods are closed until someone decides otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

LIVENESS = "liveness"
IDENTIFY = "identify"
ENROL = "enrol"
OPERATOR = "operator"
SCOPES = (LIVENESS, IDENTIFY, ENROL, OPERATOR)
COLLECTION_SCOPES = (IDENTIFY, ENROL)  # may be limited to one collection

_OPEN_SERVICES = ("grpc.health.v1.Health",)
_BY_METHOD = {
    "facegate.v1.LivenessService/CheckLiveness": LIVENESS,
    "facegate.v1.IdentificationService/IdentifyFromClip": IDENTIFY,
    "facegate.v1.IdentificationService/ListPersons": IDENTIFY,
    "facegate.v1.IdentificationService/ListCollections": IDENTIFY,
    "facegate.v1.IdentificationService/CreateCollection": ENROL,
    "facegate.v1.IdentificationService/EnrollFromClip": ENROL,
    "facegate.v1.IdentificationService/DeletePerson": ENROL,
    "facegate.v1.IdentificationService/DeleteCollection": ENROL,
}


@dataclass(frozen=True)
class Scope:
    name: str
    collection: str = ""  # "" = every collection

    @classmethod
    def parse(cls, text: str) -> Scope:
        name, _, collection = text.partition(":")
        if name not in SCOPES:
            raise ValueError(f"unknown scope {text!r}; known: {', '.join(SCOPES)} (identify/enrol may add "
                             f"':<collection>')")
        if collection and name not in COLLECTION_SCOPES:
            raise ValueError(f"scope {name!r} cannot be limited to a collection (in {text!r})")
        return cls(name, collection)

    def __str__(self) -> str:
        return f"{self.name}:{self.collection}" if self.collection else self.name


def required_scope(method: str) -> str | None:
    """The scope an RPC (``/package.Service/Method``) needs; None for open ones (health)."""
    path = method.lstrip("/")
    if path.split("/", 1)[0] in _OPEN_SERVICES:
        return None
    return _BY_METHOD.get(path, OPERATOR)


def grants(scopes: Iterable[Scope], needed: str, collection: str | None = None) -> bool:
    """Whether ``scopes`` allow ``needed``; ``collection`` is checked for collection-limited scopes (None: the
    request names no collection yet, so any grant of the scope will do at this stage)."""
    for s in scopes:
        if s.name != needed:
            continue
        if not s.collection or collection is None or s.collection == collection:
            return True
    return False
