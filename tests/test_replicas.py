"""Two `sinkstream serve` processes as replicas of one service: one PostgreSQL store and one snapshot
directory. A session moves between them and continues exactly; it is never served by both at once;
and when the replica serving it is killed mid-answer, the other continues it from its last commit
with the logprobs of a session that never failed."""

from __future__ import annotations

import http.client
import json

import pytest

from helpers import tiny_model, tiny_tokenizer
from serverproc import Server
from sinkstream.models import export_model

openai = pytest.importorskip("openai")
psycopg = pytest.importorskip("psycopg")


@pytest.fixture(scope="module")
def replicas(postgres, tmp_path_factory):
    model = export_model(tiny_model("llama", layers=2), tiny_tokenizer(), tmp_path_factory.mktemp("m") / "tiny")
    url, shared = postgres.fresh_database("replicas"), tmp_path_factory.mktemp("snapshots")

    def replica(name: str) -> Server:
        state = tmp_path_factory.mktemp(name) / "s"
        return Server(model, state, "--store", url, "--snapshot-dir", str(shared), "--replica-id", name)

    servers = [replica("r1"), replica("r2")]
    yield [s.start() for s in servers], url, shared
    for s in servers:
        s.stop()


def _turn(srv: Server, sid: str, text: str):
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    raw = c.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": text}], max_tokens=16, temperature=0, logprobs=True,
        top_logprobs=3, extra_body={"session_id": sid},
    )  # fmt: skip
    r = raw.parse()
    lp = [(t.token, t.logprob) for t in r.choices[0].logprobs.content]
    return raw.headers["x-sinkstream-replica"], r.model_extra["session"]["turns"], lp


def test_a_session_moves_between_replicas_and_continues_exactly(replicas):
    (r1, r2), _, _ = replicas
    for i in range(3):  # the reference stays on one replica
        _turn(r1, "ref", f"turn {i} of a conversation")
    expected = _turn(r1, "ref", "turn 3 of a conversation")
    turns = [_turn(r, "moving", f"turn {i} of a conversation") for i, r in enumerate((r1, r2, r1, r2))]
    assert [t[0] for t in turns] == ["r1", "r2", "r1", "r2"]  # each response names its replica
    assert [t[1] for t in turns] == [1, 2, 3, 4]
    assert turns[3][2] == expected[2]  # bit-identical logprobs after three moves
    listed = r1.request("GET", "/v1/replicas")[1]["data"]  # every replica of the store, from either one
    assert [(r["id"], r["pid"]) for r in listed] == [("r1", r1.proc.pid), ("r2", r2.proc.pid)]


def test_killed_replica_loses_nothing(replicas):
    (r1, r2), url, shared = replicas
    _turn(r1, "victim", "first turn")
    _turn(r1, "twin", "first turn")
    # r1 is killed while it streams the victim's second turn: nothing of that turn is committed
    conn = http.client.HTTPConnection("127.0.0.1", r1.port, timeout=60)
    body = {"messages": [{"role": "user", "content": "a long answer"}], "session_id": "victim", "stream": True,
            "max_tokens": 4000, "logit_bias": {"2": -100}}  # fmt: skip
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    for _ in range(5):
        assert r.readline().startswith(b"data: ")
        r.readline()
    # meanwhile the other replica cannot take the session
    status, err = r2.request("POST", "/v1/chat/completions", {**body, "stream": False, "max_tokens": 4})
    assert status == 409 and err["error"]["code"] == "session_busy"
    r1.kill()
    conn.close()
    try:
        got = _turn(r2, "victim", "second turn")  # PostgreSQL released r1's lock with its connection
        assert got[0] == "r2" and got[1] == 2
        assert got[2] == _turn(r2, "twin", "second turn")[2]  # as if the killed turn had never started
        with psycopg.connect(url) as db:
            named = {row[0] for row in db.execute("SELECT snapshot FROM sessions UNION SELECT snapshot FROM turns")}
        assert {p.name for p in shared.iterdir()} == named  # no half-written or orphan snapshot
    finally:
        r1.start()


def test_a_resent_history_resumes_on_either_replica(replicas):
    """A stock client (whole history, no session) whose turns land on alternate replicas: each turn
    resumes the kept turn the other replica committed to the shared store, with the logprobs of the same
    conversation held in a session on one replica."""
    (r1, r2), _, _ = replicas
    history = []
    for i, srv in enumerate([r1, r2, r1, r2]):
        text = f"stock client turn {i}"
        history.append({"role": "user", "content": text})
        r, lp = _ask(srv, history)
        _, twin_lp = _ask(r1, [{"role": "user", "content": text}], sid="stock-twin")
        assert lp == twin_lp and (r.usage.prompt_tokens_details.cached_tokens > 0) == (i > 0)
        history.append({"role": "assistant", "content": r.choices[0].message.content})


def _ask(srv: Server, messages: list[dict], sid: str | None = None):
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = c.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3,
        logit_bias={"0": -100, "1": -100}, extra_body={"session_id": sid} if sid else None,
    )  # fmt: skip
    return r, [
        (t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs]) for t in r.choices[0].logprobs.content
    ]
