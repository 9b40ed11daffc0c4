"""What a local server is expected to have, on a real `sinkstream serve`: CORS for pages of other origins
(preflight included), model aliases and what an unknown name gets, a bounded queue that answers 429 with
Retry-After, /tokenize and /detokenize, and a completion prompt that tokenizes to nothing."""

from __future__ import annotations

import http.client
import json
import time

import pytest

from helpers import tiny_model, tiny_tokenizer
from serverproc import Server
from sinkstream.cli import main
from sinkstream.models import export_model

openai = pytest.importorskip("openai")

ORIGIN = "http://chat.example:3000"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_model(tiny_model("llama", layers=2), tiny_tokenizer(), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("state") / "s", "--served-model-name", "tiny", "gpt-4o-mini",
                 "--cors-origins", ORIGIN, "--max-batch", "1", "--max-queue", "1", "--api-key", "k")  # fmt: skip
    srv.name = "tiny"
    yield srv.start()
    srv.stop()


AUTH = {"Authorization": "Bearer k"}


def _raw(srv, method, path, headers, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = conn.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def test_cors_preflight_and_responses(server):
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    status, headers, _ = _raw(server, "OPTIONS", "/v1/chat/completions", pre)
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN  # no key needed for a preflight
    assert "POST" in headers["access-control-allow-methods"]
    status, headers, _ = _raw(server, "GET", "/v1/models", {**AUTH, "Origin": ORIGIN})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    assert "x-sinkstream-replica" in headers["access-control-expose-headers"]
    status, headers, _ = _raw(server, "GET", "/v1/models", {"Origin": ORIGIN})  # a 401 a page can read
    assert status == 401 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = _raw(server, "OPTIONS", "/v1/models", {**pre, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in headers


def test_aliases_and_unknown_names(server, model_dir, tmp_path):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
    assert [m.id for m in c.models.list().data] == ["tiny", "gpt-4o-mini"]
    for name in ("tiny", "gpt-4o-mini"):
        r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert r.model == "tiny"
    with pytest.raises(openai.NotFoundError, match="--accept-any-model"):
        c.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    anything = Server(model_dir, tmp_path / "s", "--accept-any-model").start()
    try:
        c = openai.OpenAI(base_url=anything.url + "/v1", api_key="k", max_retries=0)
        r = c.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert r.model == "tiny" and r.choices[0].message.content is not None
    finally:
        anything.stop()


def _open_stream(srv, max_tokens: int):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    body = {"messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": max_tokens,
            "logit_bias": {"2": -100}}  # fmt: skip
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {**AUTH, "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    return conn, r


def test_full_queue_answers_429(server):
    """--max-batch 1 --max-queue 1: one request decodes, one waits, the next is refused with Retry-After."""
    streams = [_open_stream(server, 5000) for _ in range(2)]
    time.sleep(0.5)
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert refused.value.response.headers["retry-after"] == "1"
    assert refused.value.body["code"] == "server_busy"
    with pytest.raises(openai.RateLimitError):
        c.completions.create(model="tiny", prompt=["a", "b"], max_tokens=2)
    for conn, _ in streams:
        conn.sock.shutdown(2)
        conn.close()
    for _ in range(100):  # the cancelled streams leave; the server answers again
        try:
            r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            break
        except openai.RateLimitError:
            time.sleep(0.1)
    assert r.choices[0].finish_reason


def test_tokenize_round_trip(server):
    text = "Hello, tokens!"
    status, body = server.request("POST", "/tokenize", {"prompt": text, "return_token_strs": True}, AUTH)
    assert status == 200 and body["count"] == len(body["tokens"]) == len(text) and "".join(body["token_strs"]) == text
    status, back = server.request("POST", "/detokenize", {"tokens": body["tokens"]}, AUTH)
    assert status == 200 and back["prompt"] == back["content"] == text
    status, llama = server.request("POST", "/tokenize", {"content": text, "with_pieces": True}, AUTH)
    assert llama["tokens"] == body["tokens"]
    chat = [{"role": "user", "content": "hi"}]
    status, rendered = server.request("POST", "/tokenize", {"messages": chat}, AUTH)
    r = openai.OpenAI(base_url=server.url + "/v1", api_key="k").chat.completions.create(
        model="tiny", messages=chat, max_tokens=1
    )
    assert rendered["count"] == r.usage.prompt_tokens  # what a chat request of these messages feeds
    status, err = server.request("POST", "/detokenize", {"tokens": [1, 10**6]}, AUTH)
    assert status == 400 and "vocabulary" in err["error"]["message"]
    status, err = server.request("POST", "/tokenize", {"prompt": "a", "content": "b"}, AUTH)
    assert status == 400 and "one of" in err["error"]["message"]


def test_prompt_that_tokenizes_to_nothing(tmp_path):
    """A prompt of characters the tokenizer drops (SmolLM2's drops "\x1d") is answered as an empty prompt is
    (from BOS), never a 500, alone or beside other prompts."""
    assert tiny_tokenizer(drop_unknown=True)("\x1d").input_ids == []
    model = export_model(tiny_model("llama", layers=2), tiny_tokenizer(drop_unknown=True), tmp_path / "m")
    srv = Server(model, tmp_path / "s").start()
    try:
        status, body = srv.request("POST", "/v1/completions", {"prompt": ["\x1d", "ab"], "max_tokens": 3})
        assert status == 200 and [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
        empty = srv.request("POST", "/v1/completions", {"prompt": "", "max_tokens": 3, "temperature": 0})[1]
        dropped = srv.request("POST", "/v1/completions", {"prompt": "\x1d", "max_tokens": 3, "temperature": 0})[1]
        assert dropped["choices"][0]["text"] == empty["choices"][0]["text"] and dropped["usage"]["prompt_tokens"] == 1
    finally:
        srv.stop()


def test_cli_refuses_bad_options(capsys):
    for argv, needle in (
        (["--cors-origins", "chat.example"], "--cors-origins"),
        (["--max-queue", "-1"], "--max-queue"),
        (["--keep-turns", "0"], "--keep-turns"),
        (["--turns-disk-mb", "nan"], "--turns-disk-mb"),
    ):
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1
