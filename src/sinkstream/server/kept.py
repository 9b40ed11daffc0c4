"""Kept turns: the states conversations reached, by the digest of their messages, for any request to resume.

After every committed chat turn the server keeps its state — the sink cache and the conversation's
bookkeeping — under the digest of the conversation through the answer (``history``). A request whose
first messages are a kept turn's resumes from a copy of that state and feeds only the rest: a stock
client that resends the whole history pays for its new messages only, and "regenerate" or "edit"
resume from the turn before.

The records (``records``: the ``turns`` table) say which turns are kept and are the truth every replica
shares; the snapshots hold the states. Each conversation (lineage) keeps its last ``per_lineage`` turns,
and all of them together at most ``disk_bytes`` (least recently used out first; a session's current
turn stays). Recently used states also stay in memory, up to ``memory_bytes``, so the next turn of a
conversation that was just served resumes without reading its snapshot back. A state in memory is
never changed: a request resumes from a copy.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from .records import Retention, SqlRecords, TurnRow
from .snapshots import LocalSnapshots


@dataclass
class Kept:
    snapshot: str
    state: object  # a ``store.Session`` (its cache is never changed)
    nbytes: int


class KeptTurns:
    def __init__(
        self, records: SqlRecords, snapshots: LocalSnapshots, *, load, retention: Retention, memory_bytes: int
    ):
        self.records, self.snapshots, self.load = records, snapshots, load  # load(snapshot name) -> Session
        self.retention, self.memory_bytes = retention, memory_bytes
        self.lock = threading.Lock()
        self.memory: OrderedDict[str, Kept] = OrderedDict()  # least recently used first
        self.held = 0  # bytes of the states in memory

    def find(self, candidates: list[tuple[int, str]]):
        """The deepest of ``candidates`` — (message index, digest through it) — that is a kept turn:
        (index, a copy of its state, its row), or None. The turn becomes the most recently used."""
        rows = {r.key: r for r in self.records.turns([key for _, key in candidates])}
        for index, key in sorted(candidates, reverse=True):
            row = rows.get(key)
            if row is None:
                continue
            state = self._state(row)
            if state is None:  # its snapshot went (another replica evicted it meanwhile)
                continue
            self.records.touch(key, time.time())
            return index, state.copy(), row
        return None

    def _state(self, row: TurnRow):
        with self.lock:
            kept = self.memory.get(row.key)
            if kept is not None and kept.snapshot == row.snapshot:
                self.memory.move_to_end(row.key)
                return kept.state
        try:
            state = self.load(row.snapshot)
        except FileNotFoundError:
            return None
        self.remember(row.key, row.snapshot, state)
        return state

    def remember(self, key: str, snapshot: str, state) -> None:
        """Hold ``state`` (committed as ``snapshot``) in memory; it must not change from now on."""
        nbytes = state.cache_bytes()
        if nbytes > self.memory_bytes:
            return
        with self.lock:
            old = self.memory.pop(key, None)
            self.held -= old.nbytes if old else 0
            self.memory[key] = Kept(snapshot, state, nbytes)
            self.held += nbytes
            while self.held > self.memory_bytes:
                _, gone = self.memory.popitem(last=False)
                self.held -= gone.nbytes

    def forget(self, keys) -> None:
        with self.lock:
            for key in keys:
                gone = self.memory.pop(key, None)
                self.held -= gone.nbytes if gone else 0

    def forget_snapshots(self, names) -> None:
        with self.lock:
            keys = [k for k, kept in self.memory.items() if kept.snapshot in names]
        self.forget(keys)

    @property
    def in_memory(self) -> int:
        return len(self.memory)
