"""Where sessions' records live: their counters, transcript and the name of their cache snapshot.

Two implementations of one interface, with the same tables and statements:

- ``SqliteRecords`` (the embedded default): one file in the state directory, WAL journal,
  ``synchronous=FULL`` so that a committed turn survives a power cut;
- ``PostgresRecords`` (``--store postgresql://…``, psycopg 3): a database every replica of a
  scaled-out server shares.

A turn's commit is one transaction: the session's row (upserted) and the turn's messages. The
snapshot it names is written before (``snapshots``), and the one it replaces is deleted after, by
the caller (``store.SessionStore``), so that a crash at any point leaves each session at its last
committed turn.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TABLES = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    created {real} NOT NULL,
    updated {real} NOT NULL,
    turns INTEGER NOT NULL,
    tokens_seen BIGINT NOT NULL,
    tokens_cached BIGINT NOT NULL,
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
    created {real} NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS turns (      -- kept turns: conversations a request may resume (``history``)
    key TEXT PRIMARY KEY,               -- the digest of the conversation through the turn's answer
    lineage TEXT NOT NULL,              -- the conversation it belongs to: retention counts per lineage
    depth INTEGER NOT NULL,             -- its messages
    tokens BIGINT NOT NULL,             -- tokens streamed through its cache (what resuming it saves)
    snapshot TEXT NOT NULL,             -- its cache and conversation
    bytes BIGINT NOT NULL,
    created {real} NOT NULL,
    used {real} NOT NULL                -- last committed or resumed: least recently used goes first
);
CREATE INDEX IF NOT EXISTS turns_by_lineage ON turns (lineage, used);
CREATE INDEX IF NOT EXISTS turns_by_use ON turns (used);
CREATE TABLE IF NOT EXISTS responses (  -- stored responses of the Responses API (``objects``)
    id TEXT PRIMARY KEY,
    created {real} NOT NULL,
    body TEXT NOT NULL,                 -- the Response object (JSON)
    history TEXT NOT NULL,              -- the chat messages through its output, its instructions left out (JSON)
    turn_key TEXT                       -- the kept turn it reached
);
CREATE TABLE IF NOT EXISTS conversations (  -- the Conversations API's conversations (each one a session too)
    id TEXT PRIMARY KEY,
    created {real} NOT NULL,
    metadata TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (      -- a response's input items, a conversation's items, in order
    owner TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (owner, seq)
);
CREATE INDEX IF NOT EXISTS items_by_id ON items (id);
CREATE TABLE IF NOT EXISTS replicas (   -- the server processes sharing these records, as they last said
    id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    started {real} NOT NULL,
    seen {real} NOT NULL,
    sessions_in_memory INTEGER NOT NULL,
    live_requests INTEGER NOT NULL
)
"""
REPLICA_FIELDS = ("id", "pid", "host", "started", "seen", "sessions_in_memory", "live_requests")
TURN_FIELDS = ("key", "lineage", "depth", "tokens", "snapshot", "bytes", "created", "used")
# added after the first release: a column a store made before gets at start
ADDED_COLUMNS = (
    ("messages", "digest", "TEXT"),  # the message's digest in the conversation's chain
    ("sessions", "pinned", "INTEGER"),  # the first tokens the session's cache keeps (its pinned prefix)
)

UPSERT = (
    "INSERT INTO sessions (id, created, updated, turns, tokens_seen, tokens_cached, snapshot, system, pinned) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET updated=excluded.updated, "
    "turns=excluded.turns, tokens_seen=excluded.tokens_seen, tokens_cached=excluded.tokens_cached, "
    "snapshot=excluded.snapshot, system=excluded.system, pinned=excluded.pinned"
)
APPEND = (
    "INSERT INTO messages (session_id, seq, turn, role, content, fed, created, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
UPSERT_TURN = (
    f"INSERT INTO turns ({', '.join(TURN_FIELDS)}) VALUES ({', '.join('?' * len(TURN_FIELDS))}) "
    "ON CONFLICT(key) DO UPDATE SET lineage=excluded.lineage, depth=excluded.depth, tokens=excluded.tokens, "
    "snapshot=excluded.snapshot, bytes=excluded.bytes, used=excluded.used"
)
REFERENCED = "snapshot IN (SELECT snapshot FROM sessions)"


@dataclass
class SessionRow:
    id: str
    created: float
    updated: float
    turns: int
    tokens_seen: int
    tokens_cached: int
    snapshot: str
    system: str | None
    pinned: int | None = None  # None: written before pinned prefixes


@dataclass
class MessageRow:
    seq: int
    turn: int
    role: str
    content: str
    fed: str
    digest: str | None = None


@dataclass
class TurnRow:
    key: str
    lineage: str
    depth: int
    tokens: int
    snapshot: str
    bytes: int
    created: float
    used: float


@dataclass(frozen=True)
class Retention:
    """How many turns each conversation keeps, and the bytes all kept snapshots may take on disk."""

    per_lineage: int = 8
    disk_bytes: int = 8 * 2**30


@dataclass
class Committed:
    """What a commit took out of the records: snapshots nothing names now (to delete), turns evicted."""

    dead_snapshots: list[str]
    evicted: list[str]


class SqlRecords:
    """The records in an SQL database; subclasses open the connection and say how it takes parameters."""

    placeholder = "?"

    def __init__(self):
        self.lock = threading.RLock()  # one connection, used by the server's threads in turn

    def _sql(self, statement: str) -> str:
        return statement.replace("?", self.placeholder)

    def _rows(self, statement: str, params: Sequence = ()) -> list[tuple]:
        with self.lock:
            return list(self.db.execute(self._sql(statement), params).fetchall())

    @contextmanager
    def _transaction(self):
        raise NotImplementedError

    # -- ownership ----------------------------------------------------------------------------------
    def try_lock(self, sid: str) -> bool:
        """Take the session for this process (False: another process holds it). One process owns an
        SQLite store, so it always succeeds here."""
        return True

    def unlock(self, sid: str) -> None:
        """Give the session back (after ``try_lock``)."""

    # -- writes -------------------------------------------------------------------------------------
    def commit(
        self, row: SessionRow | None, messages: Sequence[MessageRow], turn: TurnRow | None = None, *,
        rewrite: bool = False, retention: Retention | None = None,
    ) -> Committed:  # fmt: skip
        """One transaction: the kept turn, the session's row and the turn's messages (``rewrite``: the
        session's whole transcript is ``messages``), then the retention's evictions. Returns the
        snapshots no record names any more and the turns evicted."""
        with self.lock, self._transaction() as cur:
            replaced = []
            if turn is not None:
                replaced += self._one(cur, "SELECT snapshot FROM turns WHERE key = ?", turn.key)
                cur.execute(self._sql(UPSERT_TURN), tuple(getattr(turn, f) for f in TURN_FIELDS))
            if row is not None:
                replaced += self._one(cur, "SELECT snapshot FROM sessions WHERE id = ?", row.id)
                cur.execute(self._sql(UPSERT), (row.id, row.created, row.updated, row.turns, row.tokens_seen,
                                                row.tokens_cached, row.snapshot, row.system, row.pinned))  # fmt: skip
                if rewrite:
                    cur.execute(self._sql("DELETE FROM messages WHERE session_id = ?"), (row.id,))
                cur.executemany(
                    self._sql(APPEND),
                    [(row.id, m.seq, m.turn, m.role, m.content, m.fed, row.updated, m.digest) for m in messages],
                )
            evicted = self._evict(cur, turn, retention) if turn is not None and retention else []
            dead = self._unreferenced(cur, replaced + [snapshot for _, snapshot in evicted])
        return Committed(dead, [key for key, _ in evicted])

    def _one(self, cur, statement: str, *params) -> list[str]:
        cur.execute(self._sql(statement), params)
        found = cur.fetchone()
        return [found[0]] if found else []

    def _evict(self, cur, turn: TurnRow, retention: Retention) -> list[tuple[str, str]]:
        """Turns beyond the lineage's count (least recently used first out), then the least recently used
        of all while their bytes pass the budget. A session's current snapshot is never evicted."""
        heads = self._one(cur, "SELECT COUNT(*) FROM turns WHERE lineage = ? AND " + REFERENCED, turn.lineage)[0]
        cur.execute(
            self._sql(f"SELECT key, snapshot FROM turns WHERE lineage = ? AND NOT {REFERENCED} ORDER BY used DESC"),
            (turn.lineage,),
        )
        keep = max(0, retention.per_lineage - heads)
        evicted = [(k, s) for k, s in cur.fetchall()[keep:] if k != turn.key]
        total = self._one(cur, "SELECT COALESCE(SUM(bytes), 0) FROM turns")[0]
        total -= sum(self._bytes(cur, k) for k, _ in evicted)
        if total > retention.disk_bytes:
            cur.execute(
                self._sql(f"SELECT key, snapshot, bytes FROM turns WHERE key != ? AND NOT {REFERENCED} ORDER BY used"),
                (turn.key,),
            )
            gone = {k for k, _ in evicted}
            for key, snapshot, size in cur.fetchall():
                if total <= retention.disk_bytes:
                    break
                if key not in gone:
                    evicted.append((key, snapshot))
                    total -= size
        for key, _ in evicted:
            cur.execute(self._sql("DELETE FROM turns WHERE key = ?"), (key,))
        return evicted

    def _bytes(self, cur, key: str) -> int:
        return (self._one(cur, "SELECT bytes FROM turns WHERE key = ?", key) or [0])[0]

    def _unreferenced(self, cur, names: list[str]) -> list[str]:
        """Of ``names``, those neither a session nor a kept turn names."""
        dead = []
        for name in dict.fromkeys(names):
            used = self._one(cur, "SELECT COUNT(*) FROM sessions WHERE snapshot = ?", name)[0]
            used += self._one(cur, "SELECT COUNT(*) FROM turns WHERE snapshot = ?", name)[0]
            if not used:
                dead.append(name)
        return dead

    def touch(self, key: str, when: float) -> None:
        """The kept turn was resumed: it is the most recently used of its lineage now."""
        with self.lock, self._transaction() as cur:
            cur.execute(self._sql("UPDATE turns SET used = ? WHERE key = ?"), (when, key))

    def turns(self, keys: Sequence[str]) -> list[TurnRow]:
        """The kept turns among ``keys``."""
        if not keys:
            return []
        marks = ", ".join("?" * len(keys))
        rows = self._rows(f"SELECT {', '.join(TURN_FIELDS)} FROM turns WHERE key IN ({marks})", tuple(keys))
        return [TurnRow(*r) for r in rows]

    def drop_turn(self, key: str) -> list[str]:
        """Forget one kept turn; returns the snapshots nothing names now."""
        with self.lock, self._transaction() as cur:
            names = self._one(cur, "SELECT snapshot FROM turns WHERE key = ?", key)
            cur.execute(self._sql("DELETE FROM turns WHERE key = ?"), (key,))
            return self._unreferenced(cur, names)

    def drop_lineage(self, lineage: str) -> list[str]:
        """Forget every kept turn of ``lineage`` (a deleted session's); returns the snapshots nothing names now."""
        with self.lock, self._transaction() as cur:
            cur.execute(self._sql("SELECT snapshot FROM turns WHERE lineage = ?"), (lineage,))
            names = [r[0] for r in cur.fetchall()]
            cur.execute(self._sql("DELETE FROM turns WHERE lineage = ?"), (lineage,))
            return self._unreferenced(cur, names)

    def delete(self, sid: str) -> str | None:
        """Remove the session and its transcript; returns its snapshot's name (None: no such session)."""
        with self.lock, self._transaction() as cur:
            cur.execute(self._sql("SELECT snapshot FROM sessions WHERE id = ?"), (sid,))
            row = cur.fetchone()
            if row is None:
                return None
            cur.execute(self._sql("DELETE FROM messages WHERE session_id = ?"), (sid,))
            cur.execute(self._sql("DELETE FROM sessions WHERE id = ?"), (sid,))
        return row[0]

    def heartbeat(self, replica: dict) -> None:
        """Say that this replica is alive, with its load (``REPLICA_FIELDS``)."""
        names = ", ".join(REPLICA_FIELDS)
        updates = ", ".join(f"{f}=excluded.{f}" for f in REPLICA_FIELDS[1:])
        statement = f"INSERT INTO replicas ({names}) VALUES ({', '.join('?' * len(REPLICA_FIELDS))}) ON CONFLICT(id) DO UPDATE SET {updates}"
        with self.lock, self._transaction() as cur:
            cur.execute(self._sql(statement), tuple(replica[f] for f in REPLICA_FIELDS))

    def forget_replica(self, rid: str) -> None:
        with self.lock, self._transaction() as cur:
            cur.execute(self._sql("DELETE FROM replicas WHERE id = ?"), (rid,))

    # -- reads --------------------------------------------------------------------------------------
    def replicas(self, seen_since: float) -> list[dict]:
        """The replicas that said they were alive since ``seen_since`` (a time.time())."""
        rows = self._rows(
            f"SELECT {', '.join(REPLICA_FIELDS)} FROM replicas WHERE seen >= ? ORDER BY id", (seen_since,)
        )
        return [dict(zip(REPLICA_FIELDS, r)) for r in rows]

    def session(self, sid: str) -> SessionRow | None:
        rows = self._rows(
            "SELECT id, created, updated, turns, tokens_seen, tokens_cached, snapshot, system, pinned FROM sessions "
            "WHERE id = ?",
            (sid,),
        )
        return SessionRow(*rows[0]) if rows else None

    def messages(self, sid: str) -> list[MessageRow]:
        rows = self._rows(
            "SELECT seq, turn, role, content, fed, digest FROM messages WHERE session_id = ? ORDER BY seq", (sid,)
        )
        return [MessageRow(*r) for r in rows]

    def ids(self) -> list[str]:
        """Every session, the most recently updated first."""
        return [r[0] for r in self._rows("SELECT id FROM sessions ORDER BY updated DESC")]

    def snapshots(self) -> set[str]:
        """The snapshot names some session or kept turn points to (any other is a crash's leftover)."""
        return {r[0] for r in self._rows("SELECT snapshot FROM sessions UNION SELECT snapshot FROM turns")}

    def kept_bytes(self) -> int:
        return self._rows("SELECT COALESCE(SUM(bytes), 0) FROM turns")[0][0]

    def count(self) -> int:
        return self._rows("SELECT COUNT(*) FROM sessions")[0][0]

    def close(self) -> None:
        with self.lock:
            self.db.close()


class SqliteRecords(SqlRecords):
    def __init__(self, path: str | Path):
        super().__init__()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(TABLES.format(real="REAL") + ";")
        for table, column, kind in ADDED_COLUMNS:
            if column not in {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    @contextmanager
    def _transaction(self):
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")


class PostgresRecords(SqlRecords):
    placeholder = "%s"

    def __init__(self, url: str):
        import psycopg  # an optional dependency: only a PostgreSQL store needs it

        super().__init__()
        self.db = psycopg.connect(url, autocommit=True)
        with self._transaction() as cur:
            for statement in TABLES.format(real="DOUBLE PRECISION").split(";"):
                cur.execute(statement)
            for table, column, kind in ADDED_COLUMNS:
                cur.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")

    @contextmanager
    def _transaction(self):
        with self.db.transaction(), self.db.cursor() as cur:
            yield cur

    def try_lock(self, sid: str) -> bool:
        """A session-level advisory lock on the session's 64-bit name hash: held by this connection
        until ``unlock``, and released by PostgreSQL itself when the process (its connection) dies,
        so a replica that dies mid-turn cannot keep a session from the others."""
        return self._rows("SELECT pg_try_advisory_lock(hashtextextended(?, 0))", (sid,))[0][0]

    def unlock(self, sid: str) -> None:
        self._rows("SELECT pg_advisory_unlock(hashtextextended(?, 0))", (sid,))


def open_records(url: str | None, state_dir: Path) -> SqlRecords:
    """The records a ``--store`` URL names: PostgreSQL for ``postgresql://…``, else SQLite in ``state_dir``."""
    if url and url.startswith(("postgresql://", "postgres://")):
        return PostgresRecords(url)
    if url:
        raise ValueError(f"--store must be a postgresql:// URL (or absent for SQLite), got '{url[:40]}'")
    return SqliteRecords(state_dir / "sessions.db")
