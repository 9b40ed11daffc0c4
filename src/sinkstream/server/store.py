"""Endless sessions that survive restarts: the transcript in SQLite, the sink cache on disk.

Every completed turn is committed in this order:

1. the session's cache is written to ``caches/<id>.<turn>.safetensors`` through a temporary file that
   is fsynced and renamed into place (a crash leaves either no file or a whole one);
2. one SQLite transaction appends the turn's messages and points the session at the new snapshot;
3. the previous snapshot is deleted.

A crash between 1 and 2 leaves an orphan file the next start removes; the database still names the
previous snapshot, which step 3 had not deleted yet. So a session is always at its last committed
turn, with the cache that belongs to it. A turn that fails or is abandoned is rolled back by
forgetting the in-memory copy: the next request reloads the last commit from disk.

At most ``max_sessions`` idle sessions keep their cache in memory (least recently used first out);
the others are on disk only and come back on their next request. A session is leased to one request
at a time: ``acquire`` raises ``SessionBusy`` for a second one (the server answers 409).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..cache import SinkCache
from ..chat import Conversation

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    turns INTEGER NOT NULL,
    tokens_seen INTEGER NOT NULL,
    tokens_cached INTEGER NOT NULL,
    snapshot TEXT NOT NULL,
    system TEXT
);
CREATE TABLE IF NOT EXISTS messages (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    turn INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    fed TEXT NOT NULL,          -- the text this message added to the stream (template markers included)
    created REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
);
"""


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
    def __init__(
        self, state_dir: str | Path, *, model_config, n_sink: int, window: int, max_sessions: int, device=None
    ):
        self.root = Path(state_dir)
        self.caches = self.root / "caches"
        self.caches.mkdir(parents=True, exist_ok=True)
        self.config, self.n_sink, self.window = model_config, n_sink, window
        self.max_sessions, self.device = max_sessions, device
        self.lock = threading.RLock()  # guards the db connection, the memory map and the leases
        self.db = sqlite3.connect(self.root / "sessions.db", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self.memory: OrderedDict[str, Session] = OrderedDict()  # idle sessions with their cache, LRU last
        self.leased: set[str] = set()
        self.recover()

    # -- start-up -----------------------------------------------------------------------------------
    def recover(self) -> dict:
        """Remove what a crash can leave: temporary files and snapshots no session points to."""
        with self.lock:
            live = {row[0] for row in self.db.execute("SELECT snapshot FROM sessions")}
        removed = 0
        for path in self.caches.iterdir():
            if path.name not in live:
                path.unlink(missing_ok=True)
                removed += 1
        return {"removed_files": removed, "sessions": len(live)}

    # -- leases -------------------------------------------------------------------------------------
    def acquire(self, sid: str) -> Session:
        """The session ``sid`` (a new, empty one if it does not exist), leased to the caller."""
        with self.lock:
            if sid in self.leased:
                raise SessionBusy(sid)
            self.leased.add(sid)
        try:
            with self.lock:
                session = self.memory.pop(sid, None)
            return session or self._load(sid) or Session(sid, Conversation(), None)
        except BaseException:
            self.release(sid)
            raise

    def release(self, sid: str) -> None:
        with self.lock:
            self.leased.discard(sid)

    def keep(self, session: Session) -> None:
        """Return a leased session (committed or unchanged) to memory and end the lease."""
        with self.lock:
            if session.cache is not None:
                self.memory[session.id] = session
                self.memory.move_to_end(session.id)
                while len(self.memory) > self.max_sessions:
                    self.memory.popitem(last=False)  # on disk already: every turn was committed
            self.leased.discard(session.id)

    def rollback(self, session: Session) -> None:
        """Forget a leased session's uncommitted changes (its cache may be mid-turn): the next request
        reloads its last commit from disk."""
        with self.lock:
            self.memory.pop(session.id, None)
            self.leased.discard(session.id)

    # -- commits ------------------------------------------------------------------------------------
    def commit(self, session: Session, cache: SinkCache, messages_before: int) -> None:
        """Persist the turn that took the conversation from ``messages_before`` messages to now."""
        conv = session.conversation
        turn = conv.turns
        name = f"{session.id}.{turn}.safetensors"
        self._write_snapshot(cache, self.caches / name)
        now = time.time()
        session.mark()
        new = conv.messages[messages_before:]
        ends = session.fed_len
        fed = [conv.fed_text[(ends[i - 1] if i else 0) : ends[i]] for i in range(messages_before, len(ends))]
        with self.lock:
            old = session.snapshot
            with self.db:  # one transaction
                self.db.execute("BEGIN")
                self.db.execute(
                    "INSERT INTO sessions (id, created, updated, turns, tokens_seen, tokens_cached, snapshot, system) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET updated=excluded.updated, "
                    "turns=excluded.turns, tokens_seen=excluded.tokens_seen, tokens_cached=excluded.tokens_cached, "
                    "snapshot=excluded.snapshot",
                    (session.id, session.created, now, turn, cache.tokens_seen, cache.tokens_cached, name, conv.system),
                )
                self.db.executemany(
                    "INSERT INTO messages (session_id, seq, turn, role, content, fed, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (session.id, messages_before + i, turn, m["role"], m["content"], f, now)
                        for i, (m, f) in enumerate(zip(new, fed))
                    ],
                )
            session.snapshot, session.cache = name, cache
        if old and old != name:
            (self.caches / old).unlink(missing_ok=True)

    def _write_snapshot(self, cache: SinkCache, path: Path) -> None:
        tensors, meta = cache.state()
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp),
            metadata={"sinkstream": json.dumps(meta)},
        )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.caches, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself is durable
        finally:
            os.close(fd)

    # -- reads --------------------------------------------------------------------------------------
    def _load(self, sid: str) -> Session | None:
        with self.lock:
            row = self.db.execute(
                "SELECT created, turns, snapshot, system FROM sessions WHERE id = ?", (sid,)
            ).fetchone()
            if row is None:
                return None
            msgs = self.db.execute(
                "SELECT role, content, fed FROM messages WHERE session_id = ? ORDER BY seq", (sid,)
            ).fetchall()
        created, turns, snapshot, system = row
        with safe_open(str(self.caches / snapshot), framework="pt") as f:
            meta = json.loads(f.metadata()["sinkstream"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safetensors handles are not iterable)
        cache = SinkCache.from_state(tensors, meta, config=self.config, device=self.device)
        fed_len, total = [], 0
        for _, _, fed in msgs:
            total += len(fed)
            fed_len.append(total)
        conv = Conversation(
            system=system,
            messages=[{"role": r, "content": c} for r, c, _ in msgs],
            fed_text="".join(f for _, _, f in msgs),
            turns=turns,
        )
        return Session(sid, conv, cache, snapshot=snapshot, created=created, fed_len=fed_len)

    def info(self, sid: str) -> dict:
        with self.lock:
            row = self.db.execute(
                "SELECT turns, tokens_seen, tokens_cached, created, updated FROM sessions WHERE id = ?", (sid,)
            ).fetchone()
        if row is None:
            raise SessionNotFound(sid)
        turns, seen, cached, created, updated = row
        return {
            "id": sid,
            "turns": turns,
            "tokens_seen": seen,
            "tokens_cached": cached,
            "cache_capacity": self.n_sink + self.window,
            "created": int(created),
            "updated": int(updated),
            "in_memory": sid in self.memory,
            "busy": sid in self.leased,
        }

    def transcript(self, sid: str) -> list[dict]:
        self.info(sid)
        with self.lock:
            rows = self.db.execute(
                "SELECT turn, role, content FROM messages WHERE session_id = ? ORDER BY seq", (sid,)
            ).fetchall()
        return [{"turn": t, "role": r, "content": c} for t, r, c in rows]

    def list(self) -> list[str]:
        with self.lock:
            return [r[0] for r in self.db.execute("SELECT id FROM sessions ORDER BY updated DESC")]

    def delete(self, sid: str) -> None:
        with self.lock:
            if sid in self.leased:
                raise SessionBusy(sid)
            row = self.db.execute("SELECT snapshot FROM sessions WHERE id = ?", (sid,)).fetchone()
            if row is None:
                raise SessionNotFound(sid)
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("DELETE FROM messages WHERE session_id = ?", (sid,))
                self.db.execute("DELETE FROM sessions WHERE id = ?", (sid,))
            self.memory.pop(sid, None)
        (self.caches / row[0]).unlink(missing_ok=True)

    @property
    def in_memory(self) -> int:
        return len(self.memory)

    def count(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]

    def close(self) -> None:
        with self.lock:
            self.db.close()
