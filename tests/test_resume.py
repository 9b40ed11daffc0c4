"""Any client gets an endless conversation: a stock client that resends its whole history with no session
pays for its new messages only; regenerate and edit resume from the turn before, with and without a
session, never duplicating a turn; all of it survives a restart. Real server processes, tiny models."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
import torch

from helpers import tiny_model, tiny_tokenizer
from serverproc import Server
from sinkstream.models import export_model

openai = pytest.importorskip("openai")

BAN_SPECIALS = {"0": -100, "1": -100}  # <unk>, <s>: an answer's text then re-renders to the ids generated


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return export_model(tiny_model("llama", layers=2), tiny_tokenizer(), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("state") / "s", "--keep-turns", "3").start()
    yield srv
    srv.stop()


def client(srv: Server):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(srv: Server, messages: list[dict], sid: str | None = None, **kw):
    """One chat request (greedy, logprobs of every token and its top 5): the response."""
    extra = {"session_id": sid} if sid else None
    return client(srv).chat.completions.create(
        model="tiny", messages=messages, temperature=0, logprobs=True, logit_bias=BAN_SPECIALS, extra_body=extra,
        **{"max_tokens": 12, "top_logprobs": 5, **kw},
    )  # fmt: skip


def logprobs(r) -> list:
    return [(t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs]) for t in r.choices[0].logprobs.content]


def prefilled(srv: Server) -> int:
    """The server's own count of tokens it fed through the model's prefill so far."""
    text = srv.request("GET", "/metrics")[1]
    return int(float(re.search(r"^sinkstream_prompt_tokens_total (\S+)$", text, re.M).group(1)))


def new_message_tokens(text: str) -> int:
    """What the template adds for one user message after an answer: its turn and the answer's end."""
    return len(tiny_tokenizer()(f"</s><s>user: {text}</s><s>assistant: ", add_special_tokens=False).input_ids)


def test_stock_client_40_turns_pays_for_new_messages_only(server):
    """Whole history resent, no session: from turn 3 on, what the server prefills each turn is the new
    message (and the template's markers), however long the conversation; every turn's logprobs are
    bit-identical to the same conversation held in a session."""
    history = [{"role": "system", "content": "You are terse."}]
    for turn in range(40):
        text = f"question number {turn} about the weather"
        history.append({"role": "user", "content": text})
        before = prefilled(server)
        r = ask(server, history)
        fed = prefilled(server) - before
        u = r.usage
        assert u.prompt_tokens - u.prompt_tokens_details.cached_tokens == fed  # what usage says was fed, was
        if turn >= 2:
            assert fed <= new_message_tokens(text) + 1, (turn, fed)  # + the last answer's unfed token
            assert u.prompt_tokens_details.cached_tokens > 0
        twin = ask(server, [{"role": "user", "content": text}] if turn else history, sid="twin")
        assert logprobs(r) == logprobs(twin), turn  # the resumed state is the session's, bit for bit
        history.append({"role": "assistant", "content": r.choices[0].message.content})
    assert u.prompt_tokens > 15 * 64  # far past the cache (64)


def test_resumed_equals_full_restream_within_the_cache(model_dir, tmp_path):
    """While the conversation fits in the cache, a resumed turn's first-token distribution equals a
    forward of the whole rendered conversation from scratch (fp32, atol 1e-4)."""
    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    srv = Server(model_dir, tmp_path / "s", "--weights", "float32", window=1000).start()
    try:
        history = []
        for turn in range(5):
            history.append({"role": "user", "content": f"tell me about {turn}"})
            r = ask(srv, history, top_logprobs=20)
            assert (r.usage.prompt_tokens_details.cached_tokens > 0) == (turn > 0)
            text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
            with torch.no_grad():
                ref = torch.log_softmax(model(torch.tensor([tok(text).input_ids])).logits[0, -1], -1)
            first = r.choices[0].logprobs.content[0]
            for x in first.top_logprobs:
                assert abs(ref[tok.convert_tokens_to_ids(x.token)].item() - x.logprob) < 1e-4
            history.append({"role": "assistant", "content": r.choices[0].message.content})
    finally:
        srv.stop()


def _conversation(srv, n: int, sid: str | None, tag: str) -> list[dict]:
    history = []
    for turn in range(n):
        history.append({"role": "user", "content": f"{tag} {turn}"})
        r = ask(srv, history, sid)
        history.append({"role": "assistant", "content": r.choices[0].message.content})
    return history


@pytest.mark.parametrize("sid", [None, "regen"])
def test_regenerate_and_edit(server, sid):
    history = _conversation(server, 5, sid, f"chat {sid}")
    last = history[-1]["content"]
    # regenerate: the history without the last answer, again
    r = ask(server, history[:-1], sid)
    assert r.choices[0].message.content == last  # greedy: the same answer
    assert (
        r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens
        <= new_message_tokens(history[-2]["content"]) + 1
    )
    # edit the 4th user message: resumes from the 3rd answer
    edited = history[:6] + [{"role": "user", "content": "something else"}]
    r = ask(server, edited, sid)
    assert (
        r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens <= new_message_tokens("something else") + 1
    )
    if sid:
        assert r.model_extra["session"]["mode"] == "branched"
        transcript = server.request("GET", f"/v1/sessions/{sid}/messages")[1]["data"]
        assert [m["content"] for m in transcript] == [m["content"] for m in edited] + [r.choices[0].message.content]
        assert [m["turn"] for m in transcript] == [1, 1, 2, 2, 3, 3, 4, 4]  # no turn twice
    # the same request from a fresh conversation state (a twin session fed message by message) agrees
    twin = f"twin-{sid}"
    for m in edited[::2]:
        t = ask(server, [m], twin)
    assert logprobs(t) == logprobs(r)


def test_session_modes_and_no_duplicate_turn(server):
    history = _conversation(server, 3, "modes", "modes")
    info = server.request("GET", "/v1/sessions/modes")[1]
    assert info["turns"] == 3
    r = ask(server, history + [{"role": "user", "content": "next"}], "modes")
    assert r.model_extra["session"]["mode"] == "continued" and r.model_extra["session"]["turns"] == 4
    r = ask(server, [{"role": "user", "content": "only new"}], "modes")
    assert r.model_extra["session"]["mode"] == "appended" and r.model_extra["session"]["turns"] == 5
    again = history + [{"role": "user", "content": "next"}]  # regenerate turn 4 through the session
    r = ask(server, again, "modes")
    assert r.model_extra["session"]["mode"] == "branched" and r.model_extra["session"]["turns"] == 4
    transcript = server.request("GET", "/v1/sessions/modes/messages")[1]["data"]
    assert [m["content"] for m in transcript] == [m["content"] for m in again] + [r.choices[0].message.content]
    # regenerate turn 2: the turn before it is no longer kept (--keep-turns 3), so its history is streamed
    # afresh into the session
    r = ask(server, history[:3], "modes")
    assert r.model_extra["session"]["mode"] == "restarted" and r.model_extra["session"]["turns"] == 2
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    transcript = server.request("GET", "/v1/sessions/modes/messages")[1]["data"]
    assert [m["turn"] for m in transcript] == [1, 1, 2, 2]


def test_regenerate_the_first_answer_through_a_session(server):
    """A client that resends its history regenerates the first answer by sending its question again: the
    session's one turn is asked afresh, not appended a second time."""
    question = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "first question"}]
    first = ask(server, question, "first")
    again = ask(server, question, "first")
    assert again.model_extra["session"]["mode"] == "restarted" and again.model_extra["session"]["turns"] == 1
    assert again.choices[0].message.content == first.choices[0].message.content
    transcript = server.request("GET", "/v1/sessions/first/messages")[1]["data"]
    assert [m["role"] for m in transcript] == ["system", "user", "assistant"]
    r = ask(server, [question[1]], "first")  # a new turn, now that there are two questions: appended
    assert r.model_extra["session"]["mode"] == "appended" and r.model_extra["session"]["turns"] == 2


def test_retention_and_restart(model_dir, tmp_path):
    """Kept turns per conversation stay within --keep-turns; after a restart (nothing in memory) a resent
    history still resumes, bit-identically; no snapshot is left that no record names."""
    state = tmp_path / "s"
    srv = Server(model_dir, state, "--keep-turns", "2").start()
    try:
        history = _conversation(srv, 6, None, "kept")
        with sqlite3.connect(state / "sessions.db") as db:
            assert db.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 2
        question = history + [{"role": "user", "content": "after the restart?"}]
        expected = ask(srv, question)
    finally:
        srv.stop()
    srv.start()
    try:
        got = ask(srv, question)
        assert got.usage.prompt_tokens_details.cached_tokens == expected.usage.prompt_tokens_details.cached_tokens > 0
        assert logprobs(got) == logprobs(expected)
        regen = ask(srv, question)  # "regenerate": the turn before it is kept too
        assert logprobs(regen) == logprobs(got) and regen.usage.prompt_tokens_details.cached_tokens > 0
    finally:
        srv.stop()
    with sqlite3.connect(state / "sessions.db") as db:
        named = {r[0] for r in db.execute("SELECT snapshot FROM sessions UNION SELECT snapshot FROM turns")}
    assert {p.name for p in (state / "caches").iterdir()} == named
