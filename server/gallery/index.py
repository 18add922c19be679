"""In-memory search over one collection's templates for one ensemble member: incremental and vectorised.

Enrolment appends rows (amortised doubling, no rebuild); deletion masks a person's rows, and the arrays are
compacted once a quarter of them are dead. A search is one matrix-vector product, then the top persons by their
best template from an ``argpartition`` of the template scores: the top-m persons' best templates are always among
the top ``m * (most templates of any person)`` templates, so this is exact without scoring every person.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_COMPACT_AT = 0.25


class MemberIndex:
    def __init__(self, dim: int, dtype: type = np.float32) -> None:
        self.dim = dim
        self._emb: np.ndarray = np.empty((0, dim), dtype)
        self._owner = np.empty(0, np.int32)
        self._alive = np.empty(0, bool)
        self._n = 0
        self._dead = 0
        self._slot: dict[str, int] = {}
        self._names: list[str] = []
        # A person's rows as a tuple, not a list: tuples of ints leave the garbage collector's lists after its
        # first pass, lists never do. With 500k per-person lists at 1M templates every full collection walked
        # them all (97 ms with every thread stopped, the event loop included).
        self._rows: dict[int, tuple[int, ...]] = {}
        self._most = 1  # an upper bound of any person's row count (exact after compaction)

    def __len__(self) -> int:
        return self._n - self._dead

    @property
    def bytes_per_template(self) -> float:
        return self._emb.itemsize * self.dim + self._owner.itemsize + self._alive.itemsize

    def _grow(self, need: int) -> None:
        cap = len(self._owner)
        if need <= cap:
            return
        new = max(need, 2 * cap, 1024)
        emb = np.empty((new, self.dim), self._emb.dtype)
        emb[: self._n] = self._emb[: self._n]
        owner = np.empty(new, np.int32)
        owner[: self._n] = self._owner[: self._n]
        alive = np.zeros(new, bool)
        alive[: self._n] = self._alive[: self._n]
        self._emb, self._owner, self._alive = emb, owner, alive

    def add(self, person: str, embeddings: np.ndarray) -> None:
        """Append rows for ``person`` (float32 [k, dim], L2-normalised)."""
        e = np.asarray(embeddings, np.float32).reshape(-1, self.dim)
        self.add_many([person] * len(e), e)

    def add_many(self, persons: list[str], embeddings: np.ndarray) -> None:
        """Append one row per entry of ``persons`` (float32 [len(persons), dim], L2-normalised) at once: a whole
        collection loads with a few array copies, not a loop per template (which held the GIL for seconds at 1M)."""
        e = np.asarray(embeddings, np.float32).reshape(len(persons), self.dim)
        slot_of, names = self._slot, self._names
        slots = []
        for person in persons:
            slot = slot_of.get(person)
            if slot is None:
                slot = slot_of[person] = len(names)
                names.append(person)
            slots.append(slot)
        start, end = self._n, self._n + len(persons)
        self._grow(end)
        self._emb[start:end] = e
        self._owner[start:end] = slots
        self._alive[start:end] = True
        rows = self._rows
        for row, slot in enumerate(slots, start):
            rows[slot] = (*rows.get(slot, ()), row)
        self._most = max(self._most, max((len(rows[s]) for s in set(slots)), default=1))
        self._n = end

    def remove(self, person: str) -> int:
        slot = self._slot.get(person)
        rows = self._rows.pop(slot, ()) if slot is not None else ()
        if rows:
            self._alive[list(rows)] = False
            self._dead += len(rows)
            if self._dead > _COMPACT_AT * self._n:
                self.compact()
        return len(rows)

    def compact(self) -> None:
        keep = np.flatnonzero(self._alive[: self._n])
        self._emb = np.ascontiguousarray(self._emb[keep])
        self._owner = self._owner[keep].copy()
        self._alive = np.ones(len(keep), bool)
        self._n, self._dead = len(keep), 0
        grouped: dict[int, list[int]] = {}
        for row, slot in enumerate(self._owner.tolist()):
            grouped.setdefault(slot, []).append(row)
        self._rows = {slot: tuple(rows) for slot, rows in grouped.items()}
        del grouped
        self._most = max((len(r) for r in self._rows.values()), default=1)

    def top_persons(self, probe: np.ndarray, m: int) -> dict[str, float]:
        """The ``m`` persons with the highest best-template cosine similarity, with that similarity."""
        n = self._n
        if n == 0 or not self._rows:
            return {}
        sims = self._emb[:n] @ np.asarray(probe, self._emb.dtype)
        if self._dead:
            sims = np.where(self._alive[:n], sims, -np.inf)
        take = min(n, m * self._most)
        idx = np.argpartition(-sims, take - 1)[:take] if take < n else np.arange(n)
        idx = idx[np.argsort(-sims[idx], kind="stable")]
        out: dict[str, float] = {}
        owners = self._owner
        for i in idx.tolist():
            if not np.isfinite(sims[i]):
                break
            name = self._names[owners[i]]
            if name not in out:
                out[name] = float(sims[i])
                if len(out) == m:
                    break
        return out

    def person_scores(self, probe: np.ndarray, persons: Iterable[str]) -> dict[str, float]:
        """The exact best-template similarity of the given persons (absent ones are left out)."""
        q = np.asarray(probe, self._emb.dtype)
        out = {}
        for p in persons:
            rows = self._rows.get(self._slot.get(p, -1))
            if rows:
                out[p] = float((self._emb[list(rows)] @ q).max())
        return out
