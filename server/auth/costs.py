"""What one call takes from its caller's ``rate_per_s`` bucket (``[auth.call_costs]``; 1 unless set).

An identification decodes and embeds a whole clip: 46-47 ms of the server's CPU a call, measured on the 2-core
machine, where a liveness check takes 9-10 ms (README). A rate that counts calls alike lets a caller of the
expensive method take five times the server of one with the same rate. Costs are set per method, by its name
(``IdentifyFromClip = 5``), for the server; each caller's rate and burst are then in units of a cost-1 call. A cost
of 0 leaves a method out of the rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cache

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
