"""`sinkstream serve` as users meet it: a real server process on 127.0.0.1, a tiny random model, the real
`openai` client, restarts, kill -9, bad input, and the web page in headless Chromium."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from helpers import tiny_model, tiny_tokenizer
from serverproc import Server
from sinkstream.cli import main
from sinkstream.models import export_model

openai = pytest.importorskip("openai")

CAPACITY = 64  # --sink 4 --window 60


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return export_model(tiny_model("llama", layers=2), tiny_tokenizer(), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("state") / "s").start()
    yield srv
    srv.stop()


def client(srv: Server, key: str = "unused"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)


def chat(c, sid: str | None, text: str, **kw):
    extra = {"session_id": sid} if sid else None
    return c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], extra_body=extra, **kw)


def test_openai_client(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    full = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 10 and 1 <= full.usage.completion_tokens <= 24
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    pieces, usage, finish = [], None, None
    for chunk in c.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    ):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text  # greedy: streamed == whole
    assert finish == full.choices[0].finish_reason and usage.model_dump() == full.usage.model_dump()

    # seeded sampling repeats; stop strings cut
    a, b = (
        chat(c, None, "Tell me", max_tokens=30, temperature=1.0, seed=5).choices[0].message.content for _ in range(2)
    )
    assert a == b
    if len(a) > 3:
        cut = chat(c, None, "Tell me", max_tokens=30, temperature=1.0, seed=5, stop=[a[2:4]])
        assert cut.choices[0].message.content == a[: a.find(a[2:4])] and cut.choices[0].finish_reason == "stop"

    comp = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True
        )
        if ch.choices
    )
    assert streamed == comp.choices[0].text and comp.usage.prompt_tokens == len("Once upon a time")
    two = c.completions.create(model="tiny", prompt=["Once upon a time", "xyz"], max_tokens=12, temperature=0)
    assert [ch.index for ch in two.choices] == [0, 1] and two.choices[0].text == comp.choices[
        0
    ].text  # batched == alone

    # no session, a history 10x the cache: streamed through it in chunks, never a context-length error
    history = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"line {i} " + "words " * 8} for i in range(40)
    ] + [{"role": "user", "content": "and now?"}]
    long = c.chat.completions.create(model="tiny", messages=history, max_tokens=8)
    assert long.usage.prompt_tokens > 10 * CAPACITY and long.choices[0].message.content

    a_id = tiny_tokenizer().convert_tokens_to_ids("A")
    forced = chat(c, None, "Say A", max_tokens=8, temperature=1.0, logit_bias={str(a_id): 100})
    assert forced.choices[0].message.content == "A" * 8

    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=msgs)


def test_session_50_turns_bounded(server):
    """Far past the cache (10x): each turn prefills only its new message, the cache stays bounded, and the
    session's counters add up exactly."""
    c = client(server)
    prompt, completion, unfed, seen = [], 0, 0, 0
    for i in range(50):
        r = chat(c, "long", f"message {i:02d}", max_tokens=20, temperature=0.8, seed=i)
        info = r.model_extra["session"]
        prompt.append(r.usage.prompt_tokens)
        completion += r.usage.completion_tokens
        # a turn cut by max_tokens leaves its last token unfed: the next turn's prompt feeds (and counts) it
        unfed += r.choices[0].finish_reason == "length"
        assert info["turns"] == i + 1 and info["tokens_cached"] <= CAPACITY
        assert info["tokens_seen"] == sum(prompt) + completion - unfed
        seen = info["tokens_seen"]
    assert seen > 10 * CAPACITY
    assert max(prompt[1:]) <= prompt[0] + 2  # only the new message (+ the last turn's unfed token and end marker)
    status, info = server.request("GET", "/v1/sessions/long")
    assert status == 200 and info["turns"] == 50 and info["tokens_seen"] == seen
    status, transcript = server.request("GET", "/v1/sessions/long/messages")
    assert [m["content"] for m in transcript["data"][::2]] == [f"message {i:02d}" for i in range(50)]


def _turn(c, sid, text):
    r = chat(c, sid, text, max_tokens=20, temperature=0, logprobs=True, top_logprobs=5)
    lp = [(t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs]) for t in r.choices[0].logprobs.content]
    return r.choices[0].message.content, lp


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_restart_continues_exactly(model_dir, tmp_path, request, store):
    extra = ["--store", request.getfixturevalue("postgres").fresh_database("restart")] if store == "postgresql" else []
    srv = Server(model_dir, tmp_path / "state", *extra).start()
    try:
        c = client(srv)
        for sid in ("r", "ref"):
            for i in range(3):
                _turn(c, sid, f"turn {i} of a chat that outgrows its cache")
        expected = _turn(c, "ref", "and after the restart?")  # never restarted
    finally:
        srv.stop()
    srv.start()
    try:
        got = _turn(client(srv), "r", "and after the restart?")
        assert got == expected  # same text, bit-identical logprobs of every token and its top 5
        assert srv.request("GET", "/v1/sessions/r")[1]["turns"] == 4
    finally:
        srv.stop()


def test_sigint_stops_a_server_started_with_sigint_ignored(model_dir, tmp_path):
    """A background job of a script inherits SIGINT ignored; the server still stops on it, gracefully."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what the child inherits through exec
    try:
        srv = Server(model_dir, tmp_path / "state").start()
    finally:
        signal.signal(signal.SIGINT, before)
    try:
        chat(client(srv), "s", "hello", max_tokens=4)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(timeout=20) == 0 and time.monotonic() - t0 < 20
    finally:
        srv.kill()


def test_kill9_rolls_back_interrupted_turn(model_dir, tmp_path):
    state = tmp_path / "state"
    srv = Server(model_dir, state).start()
    c = client(srv)
    for sid in ("k", "kref"):
        for i in range(3):
            _turn(c, sid, f"before the crash, turn {i}")
    expected = _turn(c, "kref", "after the crash")
    before = srv.request("GET", "/v1/sessions/k/messages")[1]["data"]
    chunks = 0
    stream = chat(
        c, "k", "a long answer, please", max_tokens=5000, temperature=1.0, seed=1, stream=True, logit_bias={"2": -100}
    )
    for _chunk in stream:
        chunks += 1
        if chunks == 30:
            srv.kill()  # mid-answer: no shutdown of any kind
            break
    assert chunks == 30
    srv.start()
    try:
        assert not list(state.rglob("*.tmp"))
        names = {p.name for p in (state / "caches").iterdir()}
        with sqlite3.connect(state / "sessions.db") as db:
            named = {r[0] for r in db.execute("SELECT snapshot FROM sessions UNION SELECT snapshot FROM turns")}
        assert names == named and not any(n.startswith("k.4.") for n in names)  # no orphan, nothing half-done
        status, info = srv.request("GET", "/v1/sessions/k")
        assert status == 200 and info["turns"] == 3
        assert srv.request("GET", "/v1/sessions/k/messages")[1]["data"] == before
        assert _turn(client(srv), "k", "after the crash") == expected
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def guarded(model_dir, tmp_path_factory):
    srv = Server(
        model_dir,
        tmp_path_factory.mktemp("guarded") / "s",
        "--api-key",
        "s3cret",
        "--max-body-mb",
        "0.01",
        "--max-completion-tokens",
        "1000",
    ).start()
    yield srv
    srv.stop()


AUTH = {"Authorization": "Bearer s3cret"}
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b'{"messages": [', 400, "JSON"),
        ({"messages": "hi"}, 400, "messages"),
        ({**GOOD, "temperature": "hot"}, 400, "temperature"),
        ({**GOOD, "model": "no-such-model"}, 404, "not served"),
        ({**GOOD, "messages": []}, 400, "messages"),
        ({**GOOD, "tool_choice": "required"}, 400, "tools"),
        (
            {
                **GOOD,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
            },
            400,
            "schema",
        ),
        ({**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        ({**GOOD, "max_tokens": -3}, 400, "max_tokens"),
        ({**GOOD, "max_tokens": 5000}, 400, "max-completion-tokens"),
        ({**GOOD, "n": 2}, 400, "n"),
        ({**GOOD, "session_id": "bad id!"}, 400, "session_id"),
        ({**GOOD, "logit_bias": {"100000": 5}}, 400, "vocabulary"),
        ({**GOOD, "logit_bias": {"5": 500}}, 400, "logit_bias"),
        ({**GOOD, "messages": [{"role": "user", "content": "x" * 20000}]}, 413, "larger than"),
        (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "UTF-8"),
    ],
)
def test_bad_input(guarded, body, status, needle):
    got, err = guarded.request("POST", "/v1/chat/completions", body, AUTH)
    assert got == status, err
    assert needle in err["error"]["message"] and err["error"]["type"]
    assert guarded.request("GET", "/health")[0] == 200


def test_auth_and_unknown_session(guarded):
    assert guarded.request("GET", "/health")[0] == 200  # open
    assert guarded.request("GET", "/")[0] == 200  # the static page (its API calls carry the key)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}):
        for method, path, body in (
            ("POST", "/v1/chat/completions", GOOD),
            ("GET", "/v1/models", None),
            ("GET", "/metrics", None),
            ("GET", "/v1/sessions/x", None),
        ):
            status, err = guarded.request(method, path, body, headers)
            assert status == 401 and err["error"]["type"] == "authentication_error", (path, headers)
    with pytest.raises(openai.AuthenticationError):
        client(guarded, "wrong").models.list()
    assert client(guarded, "s3cret").models.list().data[0].id == "tiny"
    assert guarded.request("GET", "/v1/sessions/nobody", headers=AUTH)[0] == 404
    assert guarded.request("DELETE", "/v1/sessions/nobody", headers=AUTH)[0] == 404
    metrics = guarded.request("GET", "/metrics", headers=AUTH)[1]
    assert 'sinkstream_requests_total{route="/v1/models",status="401"}' in metrics


def test_chunked_oversized_body(guarded):
    conn = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=60)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=iter([b'{"messages": "' + b"y" * 4096] * 4 + [b'"}']),
        headers={**AUTH, "Content-Type": "application/json"},
        encode_chunked=True,
    )
    r = conn.getresponse()
    assert r.status == 413 and "larger than" in json.loads(r.read())["error"]["message"]


NO_EOS = {"2": -100}  # the tiny tokenizer's </s>: long answers stay long


def _open_stream(srv: Server, sid: str, max_tokens: int = 1000) -> tuple[http.client.HTTPConnection, object]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    body = {
        "messages": [{"role": "user", "content": "go on"}],
        "session_id": sid,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": 2,
        "logit_bias": NO_EOS,
    }
    conn.request(
        "POST", "/v1/chat/completions", body=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"}
    )
    r = conn.getresponse()
    assert r.status == 200
    for _ in range(10):
        assert r.readline().startswith(b"data: ")
        r.readline()
    return conn, r


def _wait_idle(srv: Server, sid: str) -> dict:
    for _ in range(200):
        info = srv.request("GET", f"/v1/sessions/{sid}", headers=AUTH)[1]
        if not info.get("busy"):
            return info
        time.sleep(0.1)
    raise AssertionError(f"session {sid} stayed busy")


def test_disconnect_and_busy_session(guarded):
    c = client(guarded, "s3cret")
    chat(c, "d", "first turn", max_tokens=8, temperature=0)
    conn, _ = _open_stream(guarded, "d")
    # the same session while it answers: 409, for chat and for delete
    status, err = guarded.request("POST", "/v1/chat/completions", {**GOOD, "session_id": "d"}, AUTH)
    assert status == 409 and err["error"]["code"] == "session_busy"
    assert guarded.request("DELETE", "/v1/sessions/d", headers=AUTH)[0] == 409
    assert chat(c, "other", "meanwhile", max_tokens=4).choices  # other sessions are served
    conn.sock.shutdown(2)
    conn.close()  # the client goes away mid-answer
    info = _wait_idle(guarded, "d")
    assert info["turns"] == 1  # rolled back to the last completed turn
    assert guarded.alive() and chat(c, "d", "second turn", max_tokens=8).model_extra["session"]["turns"] == 2
    assert guarded.request("DELETE", "/v1/sessions/d", headers=AUTH)[1]["deleted"] is True
    assert guarded.request("GET", "/v1/sessions/d", headers=AUTH)[0] == 404


@pytest.fixture(scope="module")
def queued(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("queued") / "s", "--session-wait", "2", "--session-queue", "1")
    yield srv.start()
    srv.stop()


def test_busy_session_queue(queued):
    """--session-wait 2 --session-queue 1: a second request waits its turn (2 s at most), a third is
    refused while the second waits, and the one after the first ends is served."""
    conn, _ = _open_stream(queued, "q", max_tokens=16000)  # busy far longer than 2 s
    waited = {}

    def second():
        waited["t0"] = time.perf_counter()
        waited["answer"] = queued.request("POST", "/v1/chat/completions", {**GOOD, "session_id": "q"})
        waited["s"] = time.perf_counter() - waited["t0"]

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.5)
    status, err = queued.request("POST", "/v1/chat/completions", {**GOOD, "session_id": "q"})
    assert status == 409 and err["error"]["code"] == "session_queue_full"
    t.join()
    status, err = waited["answer"]
    assert status == 409 and err["error"]["code"] == "session_busy_timeout" and 1.9 < waited["s"] < 10
    conn.sock.shutdown(2)
    conn.close()  # the first request ends (rolled back); a request now waits for that, then is served
    status, body = queued.request("POST", "/v1/chat/completions", {**GOOD, "session_id": "q"})
    assert status == 200 and body["session"]["turns"] == 1


EXTREME_BUT_VALID = [  # answered: a tiny temperature or top_p is greedy-like, not NaN
    {"temperature": 1e-300},
    {"top_p": 1e-300},
    {"temperature": 2.0, "top_p": 1e-46},
    {"temperature": 1e-45, "top_p": 1e-45},
    {"seed": 2**64 - 1},
    {"seed": -(2**63)},
]
REFUSED = [  # (fields, or raw JSON of the fields, and the word the 400 names)
    ({"seed": 2**70}, "seed"),
    ({"seed": -(2**64)}, "seed"),
    ({"logit_bias": {"1" * 5000: 1}}, "logit_bias"),
    ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),
    ({"logit_bias": {"-5": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1e300}}, "logit_bias"),
    ('"temperature": NaN', "temperature"),
    ('"top_p": Infinity', "top_p"),
    ('"temperature": 1e400', "temperature"),
    ('"logit_bias": {"5": -Infinity}', "logit_bias"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"n": 10**30}, "n"),
    ({"temperature": -1e-300}, "temperature"),
]


def _body(fields, base: dict) -> bytes:
    if isinstance(fields, dict):
        return json.dumps({**base, **fields}).encode()
    return (json.dumps(base)[:-1] + ", " + fields + "}").encode()


def _finish_stream(conn, r) -> list[dict]:
    """Read an open chat stream to its end; the JSON events (the last one must be [DONE])."""
    events = []
    while True:
        line = r.readline()
        assert line, "the stream ended without [DONE]"
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            if payload == b"[DONE]":
                conn.close()
                return events
            events.append(json.loads(payload))


def test_bad_requests_never_hurt_other_streams(guarded):
    """Two sessions stream long answers while every kind of bad or extreme request arrives: the streams
    end normally and commit their turns; each bad request gets its 400; no session is left busy."""
    c = client(guarded, "s3cret")
    for sid in ("iso-a", "iso-b"):
        chat(c, sid, "first turn", max_tokens=4, temperature=0)
    streams = [_open_stream(guarded, sid, max_tokens=600) for sid in ("iso-a", "iso-b")]
    chat_base = {**GOOD, "session_id": "victim"}
    for fields in EXTREME_BUT_VALID:
        status, body = guarded.request("POST", "/v1/chat/completions", _body(fields, chat_base), AUTH)
        assert status == 200 and body["choices"][0]["finish_reason"], (fields, body)
        status, body = guarded.request(
            "POST", "/v1/completions", _body(fields, {"prompt": "abc", "max_tokens": 4}), AUTH
        )
        assert status == 200 and body["choices"][0]["finish_reason"], (fields, body)
    for fields, needle in REFUSED:
        for path, base in (("/v1/chat/completions", chat_base), ("/v1/completions", {"prompt": "abc"})):
            status, err = guarded.request("POST", path, _body(fields, base), AUTH)
            assert status == 400 and needle in err["error"]["message"], (path, fields, err)
    status, err = guarded.request(
        "POST", "/v1/chat/completions", {**chat_base, "logprobs": True, "top_logprobs": 10**30}, AUTH
    )
    assert status == 400 and "top_logprobs" in err["error"]["message"]
    status, err = guarded.request("POST", "/v1/completions", {"prompt": ["abc"] * 65}, AUTH)
    assert status == 400 and "at most 64" in err["error"]["message"] and err["error"]["param"] == "prompt"
    assert guarded.request("GET", "/health")[0] == 200
    for sid, (conn, r) in zip(("iso-a", "iso-b"), streams):
        events = _finish_stream(conn, r)
        assert len(events) > 100, "the stream was over before the bad requests were"  # still mid-answer then
        assert not any("error" in e for e in events)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert _wait_idle(guarded, sid)["turns"] == 2  # committed
    assert _wait_idle(guarded, "victim")["busy"] is False
    assert chat(c, "victim", "still fine?", max_tokens=4).choices[0].finish_reason


def test_concurrent_sessions_batch(server):
    """Eight sessions at once: all answered, each as it would be alone (greedy)."""
    c = client(server)
    alone = [chat(c, None, f"question {i}", max_tokens=16, temperature=0).choices[0].message.content for i in range(8)]
    together = [None] * 8

    def ask(i):
        together[i] = chat(c, f"conc{i}", f"question {i}", max_tokens=16, temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_serve_cli_errors(capsys):
    for argv, msg in (
        (["--port", "70000"], "--port"),
        (["--max-sessions", "-1"], "--max-sessions"),
        (["--max-batch", "0"], "--max-batch"),
        (["--store", "mysql://x"], "postgresql://"),
        (["--store", "postgresql://nobody@127.0.0.1:1/none"], "cannot open --store"),
        (["--session-wait", "-1"], "--session-wait"),
    ):
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1


def test_web_page(server):
    if not shutil.which("chromium") and not Path("/usr/bin/chromium").exists():
        pytest.skip("chromium is not installed (make test installs the Debian package)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            assert page.inner_text("#seen") == "0" and page.inner_text("#turns") == "0"
            for turn in (1, 2, 3):
                page.fill("#input", f"hello from the page, turn {turn}")
                page.press("#input", "Enter")
                page.wait_for_function(f"document.getElementById('turns').textContent === '{turn}'", timeout=60_000)
            answers = page.locator(".msg.assistant").all_inner_texts()
            assert len(answers) == 3  # (a random model's answer may be blank: Markdown of whitespace is empty)
            sid = page.inner_text("#sid")
            info = server.request("GET", f"/v1/sessions/{sid}")[1]
            assert int(page.inner_text("#seen").replace(",", "")) == info["tokens_seen"] > CAPACITY
            assert int(page.inner_text("#cached").replace(",", "")) == info["tokens_cached"] <= CAPACITY
            assert int(page.inner_text("#pinned")) == info["tokens_pinned"]
            page.reload()  # the session survives a reload: transcript and counters come back
            page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 3", timeout=30_000)
            assert page.inner_text("#turns") == "3"
            _regenerate_and_edit(page, server, sid)
            _markdown_is_safe(page, server)
        finally:
            browser.close()


def _regenerate_and_edit(page, server, sid: str) -> None:
    """Regenerate answers the last question again in place; an edit drops what followed the message. The
    session follows both (it goes back to a kept turn): no turn is ever there twice."""
    page.get_by_role("button", name="Regenerate").click()
    page.wait_for_function("document.getElementById('mode').textContent === 'branched'", timeout=60_000)
    assert page.inner_text("#turns") == "3" and len(page.locator(".msg.assistant").all()) == 3
    transcript = server.request("GET", f"/v1/sessions/{sid}/messages")[1]["data"]
    assert [m["turn"] for m in transcript] == [1, 1, 2, 2, 3, 3]
    page.locator(".msg.user").nth(1).get_by_role("button", name="Edit").click()
    page.fill(".msg.user textarea", "an edited second question")
    page.get_by_role("button", name="Save and send").click()
    page.wait_for_function("document.getElementById('turns').textContent === '2'", timeout=60_000)
    assert page.locator(".msg.user .body").all_inner_texts() == [
        "hello from the page, turn 1",
        "an edited second question",
    ]
    transcript = server.request("GET", f"/v1/sessions/{sid}/messages")[1]["data"]
    assert [m["content"] for m in transcript if m["role"] == "user"] == page.locator(
        ".msg.user .body"
    ).all_inner_texts()


def _markdown_is_safe(page, server) -> None:
    """Answers are rendered as Markdown, and no HTML from the model runs."""
    answer = '**bold** and `code`\n\n<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer},
               {"role": "user", "content": "more"}]  # fmt: skip
    assert (
        server.request("POST", "/v1/chat/completions", {"messages": history, "session_id": "md", "max_tokens": 4})[0]
        == 200
    )
    page.evaluate("localStorage.setItem('sinkstream.session', 'md')")
    page.reload()
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2", timeout=30_000)
    first = page.locator(".msg.assistant .body").first
    assert first.locator("strong").inner_text() == "bold" and first.locator("code").inner_text() == "code"
    assert page.evaluate("window.pwned === undefined")
    assert page.evaluate("[...document.querySelectorAll('img')].every(i => !i.hasAttribute('onerror'))")
