"""What one call, or one clip or batch item of it, takes from its caller's ``rate_per_s`` bucket
(``[auth.call_costs]``; 1 unless set).

An identification decodes and embeds a whole clip: 46-47 ms of the server's CPU a call, measured on the 2-core
machine, where a liveness check takes 9-10 ms (README). A rate that counts calls alike lets a caller of the
expensive method take five times the server of one with the same rate. Costs are set per method, by its name
(``IdentifyFromClip = 5``), for the server; each caller's rate and burst are then in units of a cost-1 call. A cost
of 0 leaves a method out of the rate.

A request that carries several units of the same work pays the cost once for each: an enrolment for each of its
clips (up to 16 a request, each decoded and embedded as an identification's clip is), an inference request for
each item of its batch. Those calls are checked for one unit's cost when they open, before their request is
received, and charged in full once it is parsed (``units``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, NamedTuple

MAX_COST = 1000.0


@cache
def served_methods() -> dict[str, str]:
    """Every method the server serves that a caller calls, by its name: ``IdentifyFromClip`` ->
    ``/facegate.v1.IdentificationService/IdentifyFromClip`` (names are unique across the services)."""
    from facegate.v1 import identification_pb2, liveness_pb2, models_pb2
    from inference import grpc_service_pb2

    out: dict[str, str] = {}
    for module in (liveness_pb2, identification_pb2, models_pb2, grpc_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert method.name not in out, f"{method.name} is served twice"  # (then costs need full names)
                out[method.name] = f"/{service.full_name}/{method.name}"
    return out


def by_method(costs: Mapping[str, object]) -> dict[str, float]:
    """``costs`` checked and keyed by full method name; raises ValueError naming what is wrong."""
    known = served_methods()
    unknown = sorted(set(costs) - set(known))
    if unknown:
        raise ValueError(f"[auth.call_costs]: unknown method(s) {unknown}; known: {sorted(known)}")
    out: dict[str, float] = {}
    for name, cost in costs.items():
        if isinstance(cost, bool) or not isinstance(cost, int | float) or not (
                math.isfinite(cost) and 0 <= cost <= MAX_COST):
            raise ValueError(f"[auth.call_costs] {name} must be a number from 0 to {MAX_COST:g} (0: not counted), "
                             f"got {cost!r}")
        out[known[name]] = float(cost)
    return out


class Units(NamedTuple):
    """What one unit of a method's request is (``noun``, plural), the request field that carries them, and how to
    count them in a parsed request."""

    noun: str
    field: str
    count: Callable[[Any], int]


def _clips(request: Any) -> int:
    return len(request.clips)


def _batch(request: Any) -> int:
    # The first input's batch: the servicer refuses inputs that disagree, or a batch outside the model's.
    shape = request.inputs[0].shape if request.inputs else ()
    return int(shape[0]) if shape else 1


_UNITS = {"EnrollFromClip": Units("clips", "clips", _clips),
          "ModelInfer": Units("batch items", "inputs[0].shape", _batch)}


@cache
def units_by_method() -> dict[str, Units]:
    """The methods whose cost is per unit of their request, by full method name."""
    known = served_methods()
    return {known[name]: units for name, units in _UNITS.items()}
