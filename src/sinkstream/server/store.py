"""Endless sessions that survive restarts: each session's record (counters, transcript, the name of
its cache snapshot) in a database, its sink cache in a snapshot.

Every completed chat turn — of a session or of a conversation that names none — is committed in this
order:

1. the cache and the conversation's state are written as a new snapshot (whole or not at all:
   ``snapshots``), never over an older one;
2. one transaction records it as a kept turn (``kept``), and for a session appends the turn's
   messages and points the session's record at it (``records``: SQLite by default, PostgreSQL for a
   store that several replicas share); the retention evicts what is over its counts in the same
   transaction;
3. the snapshots no record names any more are deleted.

A crash between 1 and 2 leaves an orphan snapshot, which a later start removes; the records still name
the previous snapshots, which step 3 had not deleted yet. So a session is always at its last committed
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
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..cache import SinkCache
from ..chat import Conversation
from .kept import KeptTurns
from .records import MessageRow, Retention, SessionRow, SqlRecords, TurnRow, open_records
from .snapshots import LocalSnapshots


class SessionBusy(Exception):
    """The session is serving another request."""


class SessionNotFound(KeyError):
    pass


@dataclass
class Session:
    """A conversation's state: its messages and fed text, its cache, the digests of its messages
    (``history``). Named (``id``) for a session, anonymous (``id`` None) for a conversation a client
    resends whole."""

    id: str | None
    conversation: Conversation
    cache: SinkCache | None  # None before the first committed turn
    snapshot: str | None = None
    created: float = field(default_factory=time.time)
    fed_len: list[int] = field(default_factory=list)  # len(fed_text) after each message (to split it)
    digests: list[str] = field(default_factory=list)  # each message's digest in the conversation's chain
    lineage: str = ""  # the conversation its kept turns count towards (branches share it)
    rewrite: bool = False  # it went back to an earlier state: the next commit writes its transcript anew

    def __post_init__(self):
        self.lineage = self.lineage or (f"session:{self.id}" if self.id else f"conversation:{uuid.uuid4().hex}")

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

    @property
    def tokens_seen(self) -> int:
        return self.cache.tokens_seen if self.cache is not None else 0

    def cache_bytes(self) -> int:
        return sum(t.nbytes for t in self.cache.state()[0].values()) if self.cache is not None else 0

    def state(self) -> dict:
        """What is written beside the cache in a snapshot (JSON)."""
        return {"conversation": self.conversation.to_dict(), "fed_len": self.fed_len, "digests": self.digests,
                "lineage": self.lineage}  # fmt: skip

    @classmethod
    def from_state(cls, sid: str | None, state: dict, cache: SinkCache, snapshot: str) -> Session:
        conv = Conversation.from_dict(state["conversation"])
        return cls(sid, conv, cache, snapshot, fed_len=list(state["fed_len"]), digests=list(state["digests"]),
                   lineage=state["lineage"] if sid is None else "")  # fmt: skip

    def copy(self) -> Session:
        """A state of its own to go on from (this one stays as it is)."""
        conv = Conversation.from_dict(self.conversation.to_dict())
        conv.messages = [dict(m) for m in conv.messages]
        cache = self.cache.extract([0]) if self.cache is not None else None
        return Session(self.id, conv, cache, self.snapshot, self.created, list(self.fed_len), list(self.digests),
                       self.lineage)  # fmt: skip

    def go_back(self, state: Session | None) -> None:
        """Continue from ``state`` (a copy of an earlier or other kept turn), or from nothing: the
        transcript is written anew at the next commit."""
        self.conversation = state.conversation if state else Conversation()
        self.cache = state.cache if state else None
        self.fed_len = state.fed_len if state else []
        self.digests = state.digests if state else []
        self.rewrite = True


class SessionStore:
    """``state_dir`` holds the SQLite records and the snapshots unless ``records`` (a ``--store`` URL's,
    say) and ``snapshot_dir`` put them elsewhere. ``orphan_grace_s``: how old a snapshot no record
    names must be before a start removes it (0 when this process alone writes the directory; a shared
    one needs time for another replica's commit between its steps 1 and 2)."""

    def __init__(
        self, state_dir: str | Path, *, model_config, n_sink: int, window: int, max_sessions: int, device=None,
        records: SqlRecords | None = None, snapshot_dir: str | Path | None = None, orphan_grace_s: float = 0.0,
        retention: Retention | None = None, kept_memory_bytes: int = 2**30,
    ):  # fmt: skip
        self.root = Path(state_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.snapshots = LocalSnapshots(snapshot_dir or self.root / "caches")
        self.records = records or open_records(None, self.root)
        self.config, self.n_sink, self.window = model_config, n_sink, window
        self.max_sessions, self.device = max_sessions, device
        self.retention = retention or Retention()
        self.kept = KeptTurns(self.records, self.snapshots, load=self._load_kept, retention=self.retention,
                              memory_bytes=kept_memory_bytes)  # fmt: skip
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
        """Persist the turn that took the conversation from ``messages_before`` messages to now, as a
        kept turn under its last digest, and for a named session as its new current turn."""
        conv = session.conversation
        session.mark()
        session.cache = cache
        stem = session.id if session.id else "turn"
        name = f"{stem}.{conv.turns}.{uuid.uuid4().hex[:8]}.safetensors"
        size = self.snapshots.write(name, cache, session.state())
        now = time.time()
        turn = TurnRow(session.digests[-1], session.lineage, len(conv.messages), cache.tokens_seen, name, size, now,
                       now) if session.digests else None  # fmt: skip
        row, messages = None, []
        if session.id is not None:
            first = 0 if session.rewrite else messages_before
            row = SessionRow(session.id, session.created, now, conv.turns, cache.tokens_seen, cache.tokens_cached,
                             name, conv.system, cache.pins[0])  # fmt: skip
            messages = [self._message_row(session, i, session.rewrite) for i in range(first, len(conv.messages))]
        done = self.records.commit(row, messages, turn, rewrite=session.rewrite, retention=self.retention)
        session.snapshot, session.rewrite = name, False
        self.kept.forget(done.evicted)
        if session.id is None and turn is not None:
            self.kept.remember(turn.key, name, session)
        for dead in done.dead_snapshots:
            self.snapshots.delete(dead)

    @staticmethod
    def _message_row(session: Session, i: int, rewrite: bool) -> MessageRow:
        """The transcript's row of message ``i``: of this turn, or (a transcript written anew) of the
        turn its position says (the turn of the answer it is, or of the answer that follows it)."""
        conv, ends = session.conversation, session.fed_len
        m = conv.messages[i]
        turn = 1 + sum(x["role"] == "assistant" for x in conv.messages[:i]) if rewrite else conv.turns
        digest = session.digests[i] if i < len(session.digests) else None
        fed = conv.fed_text[(ends[i - 1] if i else 0) : ends[i]]
        return MessageRow(i, turn, m["role"], m.get("shown", m["content"]), fed, digest)

    def resume(self, candidates: list[tuple[int, str]]):
        """The deepest kept turn among ``candidates`` ((message index, digest) pairs): (index, a copy of
        its state, its row), or None."""
        return self.kept.find(candidates)

    # -- reads --------------------------------------------------------------------------------------
    def _load(self, row: SessionRow | None) -> Session | None:
        if row is None:
            return None
        cache, state = self.snapshots.read_state(row.snapshot, config=self.config, device=self.device)
        if state is not None:
            session = Session.from_state(row.id, state, cache, row.snapshot)
            session.created = row.created
            return session
        return self._load_transcript(row, cache)  # a snapshot written before snapshots held the conversation

    def _load_transcript(self, row: SessionRow, cache: SinkCache) -> Session:
        msgs = self.records.messages(row.id)
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
        digests = [m.digest for m in msgs] if all(m.digest for m in msgs) else []
        return Session(row.id, conv, cache, snapshot=row.snapshot, created=row.created, fed_len=fed_len,
                       digests=digests)  # fmt: skip

    def _load_kept(self, snapshot: str) -> Session:
        cache, state = self.snapshots.read_state(snapshot, config=self.config, device=self.device)
        if state is None:
            raise FileNotFoundError(f"snapshot {snapshot} holds no conversation")
        return Session.from_state(None, state, cache, snapshot)

    def info(self, sid: str) -> dict:
        row = self.records.session(sid)
        if row is None:
            raise SessionNotFound(sid)
        return {
            "id": sid,
            "turns": row.turns,
            "tokens_seen": row.tokens_seen,
            "tokens_cached": row.tokens_cached,
            "tokens_pinned": row.pinned if row.pinned is not None else self.n_sink,
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
        """Forget the session: its record, its transcript and every turn it kept."""
        with self.lock:
            if sid in self.leased:
                raise SessionBusy(sid)
            snapshot = self.records.delete(sid)
            if snapshot is None:
                raise SessionNotFound(sid)
            self.memory.pop(sid, None)
        dead = {snapshot, *self.records.drop_lineage(Session(sid, Conversation(), None).lineage)}
        self.kept.forget_snapshots(dead)
        for name in dead:
            self.snapshots.delete(name)

    def drop_turn(self, key: str) -> None:
        """Forget a kept turn (a deleted response's): its record, its state in memory, its snapshot."""
        dead = self.records.drop_turn(key)
        self.kept.forget([key])
        for name in dead:
            self.snapshots.delete(name)

    @property
    def in_memory(self) -> int:
        return len(self.memory)

    def count(self) -> int:
        return self.records.count()

    def close(self) -> None:
        self.records.close()
