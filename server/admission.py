"""Server-wide budgets that bound what requests in flight may hold: request bytes and decoded pixels.

Taking from a budget never waits: a request that does not fit is refused at once with RESOURCE_EXHAUSTED (and
RetryInfo), before it decodes anything, so overload is shed instead of queued into memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from engines.errors import ResourceExhaustedError


class Budget:
    """A non-blocking counting budget, used from the event loop only (so no lock is needed)."""

    def __init__(self, name: str, capacity: int, unit: str) -> None:
        if capacity <= 0:
            raise ValueError(f"{name} budget must be > 0, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.unit = unit
        self.in_use = 0
        self.refused = 0

    @asynccontextmanager
    async def hold(self, amount: int) -> AsyncIterator[None]:
        if amount > self.capacity:
            self.refused += 1
            raise ResourceExhaustedError(f"request needs {amount} {self.unit}, over the server's {self.name} "
                                         f"budget of {self.capacity}")
        if self.in_use + amount > self.capacity:
            self.refused += 1
            raise ResourceExhaustedError(f"server busy: {self.name} budget in use ({self.in_use}/{self.capacity} "
                                         f"{self.unit}); retry shortly")
        self.in_use += amount
        try:
            yield
        finally:
            self.in_use -= amount
