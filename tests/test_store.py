"""The session store on its own, on SQLite and on PostgreSQL alike: commits survive a new process, a
crash between the snapshot and the database commit leaves the session at its previous turn, and idle
sessions beyond the limit wait in the store."""

import itertools

import pytest
import torch

from helpers import tiny_model, tiny_tokenizer
from sinkstream.cache import SinkCache
from sinkstream.engine import SamplingParams
from sinkstream.server.events import DoneEvent
from sinkstream.server.records import PostgresRecords
from sinkstream.server.store import SessionBusy, SessionStore
from sinkstream.server.worker import Job, Worker

DATABASES = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def records(request):
    """A function opening the test's records (the same database each time; None: SQLite in the state dir)."""
    if request.param == "sqlite":
        return lambda: None
    url = request.getfixturevalue("postgres").fresh_database(f"store{next(DATABASES)}")
    return lambda: PostgresRecords(url)


def _store(path, model, records, max_sessions=4):
    return SessionStore(path, model_config=model.config, n_sink=4, window=24, max_sessions=max_sessions,
                        records=records())  # fmt: skip


def _turn(store, worker, sid, text, tok):
    """One chat turn through the worker, committed like the server does."""
    session = store.acquire(sid)
    conv, before = session.conversation, len(session.conversation.messages)
    session.mark()
    ids = conv.begin(tok, text)
    session.mark()
    job = worker.submit(
        Job(ids, SamplingParams(max_new_tokens=12), session.cache or SinkCache(4, 24, config=store.config))
    )
    while not isinstance(job.events.get(timeout=60), DoneEvent):
        pass
    conv.finish(tok, job.row.generated, last_unfed=job.row.last_unfed)
    store.commit(session, job.cache, before)
    store.keep(session)
    return job


def _same(a: SinkCache, b: SinkCache):
    (ta, ma), (tb, mb) = a.state(), b.state()
    assert ma == mb and ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_commit_reload_and_crash(tmp_path, records):
    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    worker = Worker(model, tok, prefill_chunk=8)
    worker.start()
    try:
        store = _store(tmp_path, model, records)
        for sid in ("a", "b"):
            for i in range(3):
                _turn(store, worker, sid, f"turn {i}", tok)
        jb = _turn(store, worker, "b", "and on", tok)  # never reloaded
        live = store.acquire("a")
        store.keep(live)
        # a crash after the snapshot of turn 4 was written but before its database commit
        store.snapshots.write("a.4.safetensors", live.cache)
        (store.caches / "a.5.safetensors.tmp").write_bytes(b"half a file")
        store.close()

        again = _store(tmp_path, model, records)
        names = {p.name for p in again.caches.iterdir()}
        assert names == again.records.snapshots() and sorted(n[:4] for n in names) == ["a.3.", "b.4."]
        loaded = again.acquire("a")
        assert loaded is not live and loaded.turns == 3
        assert loaded.conversation.to_dict() == live.conversation.to_dict()
        _same(loaded.cache, live.cache)
        again.keep(loaded)
        ja = _turn(again, worker, "a", "and on", tok)  # continues as if nothing had happened
        assert again.info("a")["turns"] == 4
        assert ja.row.generated == jb.row.generated and torch.equal(ja.logits, jb.logits)
    finally:
        worker.stop()


def test_idle_sessions_beyond_limit_wait_in_the_store(tmp_path, records):
    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    worker = Worker(model, tok, prefill_chunk=8)
    worker.start()
    try:
        store = _store(tmp_path, model, records, max_sessions=1)
        _turn(store, worker, "a", "hello a", tok)
        first = store.memory["a"].cache
        _turn(store, worker, "b", "hello b", tok)
        assert list(store.memory) == ["b"] and store.info("a")["in_memory"] is False
        back = store.acquire("a")  # comes back from disk, identical
        _same(back.cache, first)
        store.keep(back)
        assert list(store.memory) == ["a"]
        store.delete("b")
        assert store.list() == ["a"] and not list(store.caches.glob("b.*"))
    finally:
        worker.stop()


def test_replicas_share_a_postgresql_store(tmp_path, postgres):
    """Two stores on one database and one snapshot directory, as two replicas: a session is served by
    one at a time, the other continues it from the last commit (a stale copy in memory is dropped),
    and a replica that dies holding a session (its connection closes) does not keep it."""
    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    url = postgres.fresh_database("replicas")
    shared = tmp_path / "snapshots"

    def replica(name):
        return SessionStore(tmp_path / name, model_config=model.config, n_sink=4, window=24, max_sessions=4,
                            records=PostgresRecords(url), snapshot_dir=shared, orphan_grace_s=3600)  # fmt: skip

    worker = Worker(model, tok, prefill_chunk=8)
    worker.start()
    try:
        a, b = replica("a"), replica("b")
        _turn(a, worker, "s", "turn on a", tok)
        held = a.acquire("s")
        with pytest.raises(SessionBusy):
            b.acquire("s")  # another replica has it
        a.keep(held)
        _turn(b, worker, "s", "turn on b", tok)  # b loads it from the store
        again = a.acquire("s")  # a's copy in memory is a turn behind: reloaded
        assert again.turns == 2
        _same(again.cache, b.memory["s"].cache)
        a.records.close()  # a dies holding the session: PostgreSQL drops its lock
        assert b.acquire("s").turns == 2
        (shared / "s.9.safetensors").write_bytes(b"another replica between its snapshot and its commit")
        replica("c")
        assert (shared / "s.9.safetensors").exists()  # younger than the grace: not a crash's leftover
    finally:
        worker.stop()
