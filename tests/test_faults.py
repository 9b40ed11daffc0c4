"""Fault isolation in the server: a failure injected at each stage of a turn (submit, prefill, sampling a
row, the model step, the commit) ends that request with a clean error, hands its session back at its last
committed turn, and the next turn answers exactly as a session that never failed.

The app runs in this process under a real uvicorn server on 127.0.0.1 so that its worker and store can be
made to fail on purpose; requests go over HTTP as a client's would."""

from __future__ import annotations

import threading
import time

import pytest
import uvicorn

from helpers import tiny_model, tiny_tokenizer
from serverproc import free_port, request, sse_events
from sinkstream.decoding import RowState
from sinkstream.server.app import ServerConfig, create_app


class Injected(RuntimeError):
    """The failure the test injects."""


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    app = create_app(
        tiny_model("llama", layers=2),
        tiny_tokenizer(),
        ServerConfig(model_name="tiny", n_sink=4, window=60, state_dir=tmp_path_factory.mktemp("faults")),
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(300):
        if server.started:
            break
        time.sleep(0.05)
    app.state.url = f"http://127.0.0.1:{server.config.port}"
    yield app
    server.should_exit = True
    thread.join(timeout=30)


def _turn(app, sid: str, text: str, stream: bool = False):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": text}],
        "session_id": sid,
        "max_tokens": 12,
        "temperature": 0,
        "stream": stream,
    }
    return request(app.state.url, "POST", "/v1/chat/completions", body)


def _answer(status, body, stream: bool) -> str | None:
    """The answer text of a successful turn, or None if the request failed (cleanly: checked here)."""
    if not stream:
        if status == 200:
            return body["choices"][0]["message"]["content"]
        assert status >= 400 and body["error"]["message"] and body["error"]["type"], body
        return None
    if status != 200:  # refused before the stream started
        assert body["error"]["message"], body
        return None
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    if any(isinstance(e, dict) and "error" in e for e in events):
        return None
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])


def _fail_once(target, name: str, monkeypatch, exc: Exception | None = None):
    exc = exc or Injected("injected failure")
    real, fired = getattr(target, name), []

    def failing(*args, **kwargs):
        if not fired:
            fired.append(True)
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)
    return fired


STAGES = {  # stage -> (object on app.state, or a class, and its method)
    "submit": ("worker", "submit"),
    "prefill": ("worker", "_prefill_chunk"),
    "sample": (RowState, "step"),  # one row's sampling (every row's step goes through it)
    "model step": ("worker", "_step"),
    "commit": ("store", "commit"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("stage", STAGES)
def test_failure_at_each_stage_releases_the_session(live, stage, stream, monkeypatch):
    sid, ref = f"f-{stage}-{stream}".replace(" ", "_"), f"r-{stage}-{stream}".replace(" ", "_")
    for s in (sid, ref):
        assert _answer(*_turn(live, s, "first turn"), stream=False) is not None
    expected = _answer(*_turn(live, ref, "second turn"), stream=False)
    before = request(live.state.url, "GET", f"/v1/sessions/{sid}/messages")[1]["data"]

    owner, method = STAGES[stage]
    exc = OSError(28, "No space left on device") if stage == "commit" else Injected("injected failure")
    fired = _fail_once(getattr(live.state, owner) if isinstance(owner, str) else owner, method, monkeypatch, exc)
    assert _answer(*_turn(live, sid, "second turn", stream), stream=stream) is None
    assert fired

    status, info = request(live.state.url, "GET", f"/v1/sessions/{sid}")
    assert status == 200 and info["busy"] is False and info["turns"] == 1  # rolled back, not left busy
    assert request(live.state.url, "GET", f"/v1/sessions/{sid}/messages")[1]["data"] == before
    assert request(live.state.url, "GET", "/health")[0] == 200
    assert _answer(*_turn(live, sid, "second turn", stream), stream=stream) == expected  # as if it never failed
    assert request(live.state.url, "GET", f"/v1/sessions/{sid}")[1]["turns"] == 2


def test_failed_first_turn_leaves_no_session(live, monkeypatch):
    _fail_once(live.state.worker, "_prefill_chunk", monkeypatch)
    assert _answer(*_turn(live, "never", "hello"), stream=False) is None
    assert request(live.state.url, "GET", "/v1/sessions/never")[0] == 404
    assert _answer(*_turn(live, "never", "hello"), stream=False) is not None


def test_sessionless_completion_failure_is_one_error(live, monkeypatch):
    _fail_once(RowState, "step", monkeypatch)
    body = {"model": "tiny", "prompt": ["one", "two", "three"], "max_tokens": 6, "temperature": 0}
    status, err = request(live.state.url, "POST", "/v1/completions", body)
    assert status == 500 and "injected" in err["error"]["message"]
    for _ in range(100):  # the siblings are cancelled, not decoded to the end for nobody
        if live.state.worker.load == 0:
            break
        time.sleep(0.05)
    assert live.state.worker.load == 0
    status, ok = request(live.state.url, "POST", "/v1/completions", body)
    assert status == 200 and len(ok["choices"]) == 3
