"""Endless sessions that survive restarts: each session's record (counters, transcript, the name of
its cache snapshot) in a database, its sink cache in a snapshot.

Every completed turn is committed in this order:

1. the session's cache is written as a new snapshot ``<id>.<turn>.safetensors`` (whole or not at all:
   ``snapshots``);
2. one transaction appends the turn's messages and points the session's record at the new snapshot
   (``records``: SQLite by default, PostgreSQL for a store that several replicas share);
3. the previous snapshot is deleted.

A crash between 1 and 2 leaves an orphan snapshot, which a later start removes; the record still names
the previous snapshot, which step 3 had not deleted yet. So a session is always at its last committed
turn, with the cache that belongs to it. A turn that fails or is abandoned is rolled back by
forgetting the in-memory copy: the next request reloads the last commit.

At most ``max_sessions`` idle sessions keep their cache in memory (least recently used first out);
the others are in the store only and come back on their next request. A session is leased to one
request at a time: ``acquire`` raises ``SessionBusy`` for a second one (the server answers 409, or
queues it: ``leases``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..cache import SinkCache
from ..chat import Conversation
from .records import MessageRow, SessionRow, SqlRecords, open_records
from .snapshots import LocalSnapshots


class SessionBusy(Exception):
    """The session is serving another request."""


class SessionNotFound(KeyError):
    pass


@dataclass
class Session:
    id: str
    conversation: Conversation
    cache: SinkCache | None  # None for a session that has not committed a turn yet
    snapshot: str | None = None
    created: float = field(default_factory=time.time)
    fed_len: list[int] = field(default_factory=list)  # len(fed_text) after each message (to split it)

    def mark(self) -> None:
        """Messages added since the last mark fed the text up to here (call before and after a turn's
        feeds: history sent with a new session's first request gets no text of its own)."""
        while len(self.fed_len) < len(self.conversation.messages):
            self.fed_len.append(len(self.conversation.fed_text))

    @property
    def turns(self) -> int:
        return self.conversation.turns

    @property
    def new(self) -> bool:
        return self.snapshot is None


class SessionStore:
    """``state_dir`` holds the SQLite records and the snapshots unless ``records`` (a ``--store`` URL's,
    say) and ``snapshot_dir`` put them elsewhere. ``orphan_grace_s``: how old a snapshot no record
    names must be before a start removes it (0 when this process alone writes the directory; a shared
    one needs time for another replica's commit between its steps 1 and 2)."""

    def __init__(
        self, state_dir: str | Path, *, model_config, n_sink: int, window: int, max_sessions: int, device=None,
        records: SqlRecords | None = None, snapshot_dir: str | Path | None = None, orphan_grace_s: float = 0.0,
    ):  # fmt: skip
        self.root = Path(state_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.snapshots = LocalSnapshots(snapshot_dir or self.root / "caches")
        self.records = records or open_records(None, self.root)
        self.config, self.n_sink, self.window = model_config, n_sink, window
        self.max_sessions, self.device = max_sessions, device
        self.lock = threading.RLock()  # guards the memory map and the leases
        self.memory: OrderedDict[str, Session] = OrderedDict()  # idle sessions with their cache, LRU last
        self.leased: set[str] = set()
        self.recover(orphan_grace_s)

    @property
    def caches(self) -> Path:
        return self.snapshots.root

    # -- start-up -----------------------------------------------------------------------------------
    def recover(self, grace_s: float = 0.0) -> dict:
        """Remove what a crash can leave: temporary files and snapshots no session points to (older
        than ``grace_s``)."""
        live = self.records.snapshots()
        removed = 0
        for name in self.snapshots.names() - live:
            try:
                age = time.time() - (self.caches / name).stat().st_mtime
            except FileNotFoundError:  # another replica renamed or deleted it meanwhile
                continue
            if age >= grace_s:
                self.snapshots.delete(name)
                removed += 1
        return {"removed_files": removed, "sessions": len(live)}

    # -- leases -------------------------------------------------------------------------------------
    def acquire(self, sid: str) -> Session:
        """The session ``sid`` (a new, empty one if it does not exist), leased to the caller. With
        records other processes share, the session is also taken from them (``records.try_lock``),
        and an in-memory copy older than the stored commit (another replica went on) is reloaded."""
        with self.lock:
            if sid in self.leased:
                raise SessionBusy(sid)
            self.leased.add(sid)
        if not self.records.try_lock(sid):
            self.release(sid)
            raise SessionBusy(sid)
        try:
            with self.lock:
                session = self.memory.pop(sid, None)
            row = self.records.session(sid)
            if session is not None and (row is None or row.snapshot != session.snapshot):
                session = None  # stale: committed elsewhere since, or deleted
            return session or self._load(row) or Session(sid, Conversation(), None)
        except BaseException:
            self.release(sid)
            raise

    def release(self, sid: str) -> None:
        with self.lock:
            if sid not in self.leased:
                return
            self.leased.discard(sid)
        self.records.unlock(sid)

    def keep(self, session: Session) -> None:
        """Return a leased session (committed or unchanged) to memory and end the lease."""
        with self.lock:
            if session.cache is not None:
                self.memory[session.id] = session
                self.memory.move_to_end(session.id)
                while len(self.memory) > self.max_sessions:
                    self.memory.popitem(last=False)  # stored already: every turn was committed
        self.release(session.id)

    def rollback(self, session: Session) -> None:
        """Forget a leased session's uncommitted changes (its cache may be mid-turn): the next request
        reloads its last commit."""
        with self.lock:
            self.memory.pop(session.id, None)
        self.release(session.id)

    # -- commits ------------------------------------------------------------------------------------
    def commit(self, session: Session, cache: SinkCache, messages_before: int) -> None:
        """Persist the turn that took the conversation from ``messages_before`` messages to now."""
        conv = session.conversation
        name = f"{session.id}.{conv.turns}.safetensors"
        self.snapshots.write(name, cache)
        session.mark()
        ends = session.fed_len
        messages = [
            MessageRow(i, conv.turns, m["role"], m["content"], conv.fed_text[(ends[i - 1] if i else 0) : ends[i]])
            for i, m in enumerate(conv.messages) if i >= messages_before
        ]  # fmt: skip
        row = SessionRow(session.id, session.created, time.time(), conv.turns, cache.tokens_seen,
                         cache.tokens_cached, name, conv.system)  # fmt: skip
        old = self.records.commit(row, messages)
        session.snapshot, session.cache = name, cache
        if old and old != name:
            self.snapshots.delete(old)

    # -- reads --------------------------------------------------------------------------------------
    def _load(self, row: SessionRow | None) -> Session | None:
        if row is None:
            return None
        sid = row.id
        msgs = self.records.messages(sid)
        cache = self.snapshots.read(row.snapshot, config=self.config, device=self.device)
        fed_len, total = [], 0
        for m in msgs:
            total += len(m.fed)
            fed_len.append(total)
        conv = Conversation(
            system=row.system,
            messages=[{"role": m.role, "content": m.content} for m in msgs],
            fed_text="".join(m.fed for m in msgs),
            turns=row.turns,
        )
        return Session(sid, conv, cache, snapshot=row.snapshot, created=row.created, fed_len=fed_len)

    def info(self, sid: str) -> dict:
        row = self.records.session(sid)
        if row is None:
            raise SessionNotFound(sid)
        return {
            "id": sid,
            "turns": row.turns,
            "tokens_seen": row.tokens_seen,
            "tokens_cached": row.tokens_cached,
            "cache_capacity": self.n_sink + self.window,
            "created": int(row.created),
            "updated": int(row.updated),
            "in_memory": sid in self.memory,
            "busy": sid in self.leased,
        }

    def transcript(self, sid: str) -> list[dict]:
        self.info(sid)
        return [{"turn": m.turn, "role": m.role, "content": m.content} for m in self.records.messages(sid)]

    def list(self) -> list[str]:
        return self.records.ids()

    def delete(self, sid: str) -> None:
        with self.lock:
            if sid in self.leased:
                raise SessionBusy(sid)
            snapshot = self.records.delete(sid)
            if snapshot is None:
                raise SessionNotFound(sid)
            self.memory.pop(sid, None)
        self.snapshots.delete(snapshot)

    @property
    def in_memory(self) -> int:
        return len(self.memory)

    def count(self) -> int:
        return self.records.count()

    def close(self) -> None:
        self.records.close()
