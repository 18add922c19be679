"""Search a collection the way every replica sees the same gallery: before each search, one indexed read of the
collection's change sequence; if another process changed it, only the changes since the cached sequence are
applied (appends and deletions, in sequence order); a deleted and re-created collection is reloaded whole.

So once DeletePerson or DeleteCollection has returned, no replica returns that person (the deletion committed
with its sequence bump before the reply, and every later search reads the sequence first), and an enrolment is
visible to every replica on its next search. Blocking: runs on worker threads, never the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from engines.errors import NotFoundError
from server.gallery.index import MemberIndex
from server.gallery.store import Changes, GalleryStore


@dataclass
class CollectionIndex:
    generation: str
    seq: int
    members: dict[str, MemberIndex] = field(default_factory=dict)

    def apply(self, changes: Changes) -> None:
        events: list[tuple[int, int, str, str, bytes]] = [(s, 0, p, "", b"") for s, p in changes.deleted]
        events += [(s, 1, p, m, e) for s, p, m, e in changes.added]
        if changes.deleted:  # sequence order matters only around deletions (a full load has none)
            events.sort(key=lambda ev: (ev[0], ev[1]))
        run: dict[str, tuple[list[str], list[bytes]]] = {}
        for _, kind, person, member, emb in events:
            if kind == 0:  # a deletion removes what the person had before it: flush the additions first
                self._add(run)
                for index in self.members.values():
                    index.remove(person)
            elif member in self.members:
                persons, embs = run.setdefault(member, ([], []))
                persons.append(person)
                embs.append(emb)
        self._add(run)
        self.seq = changes.seq

    def _add(self, run: dict[str, tuple[list[str], list[bytes]]]) -> None:
        for member, (persons, embs) in run.items():
            self.members[member].add_many(persons, np.frombuffer(b"".join(embs), np.float32))
        run.clear()


class Gallery:
    def __init__(self, store: GalleryStore) -> None:
        self.store = store
        self._indexes: dict[str, CollectionIndex] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, collection: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(collection, threading.Lock())

    def _sync(self, collection: str) -> CollectionIndex:
        try:
            state = self.store.state(collection)
        except NotFoundError:
            self._indexes.pop(collection, None)
            raise
        idx = self._indexes.get(collection)
        if idx is None or idx.generation != state.generation:
            coll = self.store.collection(collection)
            idx = CollectionIndex(state.generation, 0, {m: MemberIndex(coll.embedding_dim) for m in coll.members})
            for part in self.store.templates_in_chunks(collection):
                idx.apply(part)
            self._indexes[collection] = idx
        elif idx.seq < state.seq:
            idx.apply(self.store.changes_since(collection, idx.seq))
        return idx

    def search(self, collection: str, probe: Mapping[str, np.ndarray], candidates: int
               ) -> dict[str, dict[str, float]]:
        """Per member, the scores of the union of every member's top ``candidates`` persons (exact scores, so the
        ensemble's mean and votes are computed over the same persons)."""
        with self._lock(collection):
            idx = self._sync(collection)
            tops = {m: idx.members[m].top_persons(probe[m], candidates) for m in idx.members}
            union = set().union(*tops.values()) if tops else set()
            out = {}
            for m, top in tops.items():
                missing = union - top.keys()
                out[m] = {**top, **idx.members[m].person_scores(probe[m], missing)} if missing else top
            return out

    def templates(self) -> int:
        """Templates held in memory over every cached collection and member (for the metrics)."""
        return sum(len(i) for idx in list(self._indexes.values()) for i in idx.members.values())
