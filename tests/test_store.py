"""The session store on its own: commits survive a new process, a crash between the snapshot and the
database commit leaves the session at its previous turn, and idle sessions beyond the limit wait on disk."""

import torch

from helpers import tiny_model, tiny_tokenizer
from sinkstream.cache import SinkCache
from sinkstream.engine import SamplingParams
from sinkstream.server.events import DoneEvent
from sinkstream.server.store import SessionStore
from sinkstream.server.worker import Job, Worker


def _store(path, model, max_sessions=4):
    return SessionStore(path, model_config=model.config, n_sink=4, window=24, max_sessions=max_sessions)


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
    conv.finish(tok, job.generated, last_unfed=job.last_unfed)
    store.commit(session, job.cache, before)
    store.keep(session)
    return job


def _same(a: SinkCache, b: SinkCache):
    (ta, ma), (tb, mb) = a.state(), b.state()
    assert ma == mb and ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_commit_reload_and_crash(tmp_path):
    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    worker = Worker(model, tok, prefill_chunk=8)
    worker.start()
    try:
        store = _store(tmp_path, model)
        for sid in ("a", "b"):
            for i in range(3):
                _turn(store, worker, sid, f"turn {i}", tok)
        jb = _turn(store, worker, "b", "and on", tok)  # never reloaded
        live = store.acquire("a")
        store.keep(live)
        # a crash after the snapshot of turn 4 was written but before its database commit
        store._write_snapshot(live.cache, store.caches / "a.4.safetensors")
        (store.caches / "a.5.safetensors.tmp").write_bytes(b"half a file")
        store.close()

        again = _store(tmp_path, model)
        assert sorted(p.name for p in again.caches.iterdir()) == ["a.3.safetensors", "b.4.safetensors"]
        loaded = again.acquire("a")
        assert loaded is not live and loaded.turns == 3
        assert loaded.conversation.to_dict() == live.conversation.to_dict()
        _same(loaded.cache, live.cache)
        again.keep(loaded)
        ja = _turn(again, worker, "a", "and on", tok)  # continues as if nothing had happened
        assert again.info("a")["turns"] == 4
        assert ja.generated == jb.generated and torch.equal(ja.logits, jb.logits)
    finally:
        worker.stop()


def test_idle_sessions_beyond_limit_wait_on_disk(tmp_path):
    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    worker = Worker(model, tok, prefill_chunk=8)
    worker.start()
    try:
        store = _store(tmp_path, model, max_sessions=1)
        _turn(store, worker, "a", "hello a", tok)
        first = store.memory["a"].cache
        _turn(store, worker, "b", "hello b", tok)
        assert list(store.memory) == ["b"] and store.info("a")["in_memory"] is False
        back = store.acquire("a")  # comes back from disk, identical
        _same(back.cache, first)
        store.keep(back)
        assert list(store.memory) == ["a"]
        store.delete("b")
        assert store.list() == ["a"] and not (store.caches / "b.1.safetensors").exists()
    finally:
        worker.stop()
