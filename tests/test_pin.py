"""A pinned prefix: a stream whose first P tokens are its sinks, against references computed another way
(tiny random models, fp32)."""

import logging

import pytest
import torch

from helpers import random_ids, tiny_model, tiny_tokenizer
from sinkstream import Engine, SamplingParams, SinkCache
from sinkstream.chat import ChatSession, Conversation
from sinkstream.engine import forward_stream
from sinkstream.fused import FUSED_FAMILIES, select_decoder
from sinkstream.pinning import choose, parse_pin, prefix_tokens

ROW_WINDOW = 24  # what the pinned prefix leaves of the cache, whatever its length


class _NoTok:
    eos_token_id = None


def in_cache_tokens(t: int, pin: int, window: int) -> list[int]:
    """Text indices the newest token t attends to: the first ``pin`` tokens + the window ending at t."""
    return list(range(min(pin, t + 1))) + list(range(max(pin, t - window + 1), t + 1))


@pytest.mark.parametrize("pin", [1, 4, 37, 300])
@torch.no_grad()
def test_one_layer_pinned_equals_recompute(family, pin):
    """With one layer, KVs depend only on token and position: every step equals a from-scratch forward over
    the pinned prefix + the window at positions 0..n-1, across evictions and (RoPE) rebases, through the
    engine's step (the fused one where the family has one)."""
    model = tiny_model(family, layers=1)
    n_sink = 4
    engine = Engine(model, _NoTok(), n_sink=n_sink, window=pin + ROW_WINDOW - n_sink, pin=pin)
    assert (engine.fused is not None) == (family.split("-")[0] in FUSED_FAMILIES)
    steps = pin + 3 * ROW_WINDOW + (pin + ROW_WINDOW if pin > 4 else 40)  # rebases due past n_sink + 2 * window
    ids = random_ids(steps, seed=pin)
    for t in range(steps):
        out = engine.step(int(ids[0, t]))[0]
        ref = model(ids[:, in_cache_tokens(t, pin, ROW_WINDOW)]).logits[0, -1]
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0, msg=f"step {t}")
    assert engine.cache.tokens_cached == pin + ROW_WINDOW and engine.cache.pins == [pin]
    if family not in ("mpt", "bloom"):
        assert engine.stats.rebases > 0


@pytest.mark.parametrize("pin", [4, 37])
@torch.no_grad()
def test_one_layer_pinned_transformers_forward_equals_recompute(pin):
    """The same through transformers' own forward (no fused step), chunks included."""
    model = tiny_model("qwen2", layers=1)
    engine = Engine(model, _NoTok(), n_sink=4, window=pin + ROW_WINDOW - 4, pin=pin, decode="transformers")
    ids = random_ids(pin + 200, seed=1)
    n = pin + 30
    engine.prefill(ids[0, :n].tolist())  # chunks of half the row's window
    assert engine.prefill_chunk == ROW_WINDOW // 2
    for t in range(n, ids.shape[1]):
        out = engine.step(int(ids[0, t]))[0]
        ref = model(ids[:, in_cache_tokens(t, pin, ROW_WINDOW)]).logits[0, -1]
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0, msg=f"step {t}")
    assert engine.stats.rebases > 0


@pytest.mark.parametrize(
    "family,decode", [("llama", "fused"), ("llama", "transformers"), ("mpt", "transformers"), ("gemma3", "auto")]
)
@torch.no_grad()
def test_batch_of_different_pins_equals_each_alone(family, decode):
    """Rows with different pinned prefixes, at different lengths, decode together as each alone; a rebase
    in the middle and a row leaving change nothing."""
    model = tiny_model(family, layers=2)
    fused = select_decoder(model, decode)
    n_sink, window, steps = 4, 60, 90
    pins, lengths = [4, 9, 37], [3, 30, 75]
    streams = [random_ids(n + steps, seed=i)[0] for i, n in enumerate(lengths)]
    alone, caches = [], []
    for ids, n, pin in zip(streams, lengths, pins):
        engine = Engine(model, tiny_tokenizer(), n_sink=n_sink, window=window, decode=decode, pin=pin)
        engine.prefill(ids[:n].tolist())
        caches.append(engine.cache.extract([0]))
        alone.append(torch.stack([engine.step(int(t))[0] for t in ids[n:]]))
    cache = SinkCache.stack(caches)
    assert cache.pins == pins
    for s in range(steps):
        if s == 40:
            cache.rebase()
        ids = torch.stack([x[n + s] for x, n in zip(streams, lengths)])[:, None]
        out, _ = forward_stream(model, cache, ids, rows_differ=True, fused=fused)
        for b in range(len(lengths)):
            torch.testing.assert_close(out[b], alone[b][s], atol=1e-4, rtol=0, msg=f"row {b} step {s}")
    cache.select_rows([2, 0])
    assert cache.pins == [37, 4]


@torch.no_grad()
def test_generate_batch_with_pins_equals_generate_alone():
    model = tiny_model("qwen2", layers=2)
    tok = tiny_tokenizer()
    ids = [tok(p).input_ids for p in ["Hello there", "A much longer prompt, past the window of the cache. " * 2, "x"]]
    pins = [4, 20, 9]
    params = SamplingParams(max_new_tokens=50, temperature=1.0, seed=3)
    engine = Engine(model, tok, n_sink=4, window=60)
    alone = []
    for p, pin in zip(ids, pins):
        engine.reset(pin)
        alone.append([t.id for t in engine.generate(p, params) if t.id >= 0])
    batch = [[] for _ in ids]
    for row, t in engine.generate_batch(ids, params, pins=pins):
        if t.id >= 0:
            batch[row].append(t.id)
    assert batch == alone


@pytest.mark.parametrize("family", ["llama", "gemma3", "mpt"])
@torch.no_grad()
def test_pinned_snapshot_restores_and_continues_bitwise(family):
    model = tiny_model(family, layers=2)
    ids = random_ids(300, seed=5)[0].tolist()
    engine = Engine(model, tiny_tokenizer(), n_sink=4, window=60, pin=21)
    engine.prefill(ids[:200])
    tensors, meta = engine.cache.state()
    tensors = {k: v.clone() for k, v in tensors.items()}  # (views of the live cache)
    ref = torch.stack([engine.step(t)[0] for t in ids[200:]])
    again = Engine(model, tiny_tokenizer(), n_sink=4, window=60)
    again.cache = SinkCache.from_state(tensors, meta, config=model.config)
    assert again.cache.pins == [21]
    got = torch.stack([again.step(t)[0] for t in ids[200:]])
    assert torch.equal(got, ref), (got - ref).abs().max()


def test_choose_the_pin():
    assert choose(prefix=100, n_sink=4, window=1020, mode="auto").tokens == 100
    assert choose(prefix=100, n_sink=4, window=1020, mode="none").tokens == 4
    assert choose(prefix=100, n_sink=4, window=1020, mode=30).tokens == 30
    assert choose(prefix=100, n_sink=4, window=1020, mode=2).tokens == 4  # the sinks always stay
    assert choose(prefix=3, n_sink=4, window=1020, mode="auto").tokens == 4
    late = choose(prefix=6604, n_sink=4, window=1020, mode="auto")  # Open WebUI's tools, the default cache
    assert late.tokens == 4
    assert "6604 tokens" in late.warning and "--window 26412" in late.warning
    fits = choose(prefix=256, n_sink=4, window=1020, mode="auto")  # a quarter of the cache
    assert fits == choose(256, 4, 1020, 256) and fits.warning is None
    assert choose(prefix=257, n_sink=4, window=1020, mode="auto").tokens == 4
    big = choose(prefix=400, n_sink=4, window=1020, mode="auto")
    assert big.tokens == 4 and "--pin 400" in big.warning
    with pytest.raises(ValueError, match="no window"):
        choose(prefix=2000, n_sink=4, window=1020, mode=1500)
    assert [parse_pin(v) for v in ("auto", "none", "12", 0)] == ["auto", "none", 12, 0]
    for bad in ("all", "-1", "1.5", None, True):
        with pytest.raises(ValueError, match="--pin"):
            parse_pin(bad)


def _chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    return tok


def test_prefix_tokens_is_what_comes_before_the_first_user_message():
    tok = _chat_tokenizer()
    conv = Conversation(system="You are a pirate.")
    conv.messages.append({"role": "user", "content": "Hello"})
    ids = tok(conv.render(tok, conv.messages, True), add_special_tokens=False).input_ids
    head = tok("<s>system: You are a pirate.\n<s>user: ", add_special_tokens=False).input_ids
    assert prefix_tokens(tok, conv, ids) == len(head)
    assert ids[: len(head)] == head


@torch.no_grad()
def test_chat_pins_its_system_prompt_and_falls_back_with_a_warning(caplog):
    model, tok = tiny_model("llama", layers=2), _chat_tokenizer()
    system = "The user's name is Ada. Her cat is called Turing."
    head = len(tok(f"<s>system: {system}\n<s>user: ", add_special_tokens=False).input_ids)
    params = SamplingParams(max_new_tokens=30)
    chat = ChatSession(Engine(model, tok, n_sink=4, window=4 * head), system=system)
    for message in ["Hi", "What is my name?", "And my cat's?", "Again?", "Once more"]:
        "".join(chat.send(message, params))
    assert chat.pinned.tokens == head and chat.engine.cache.pins == [head]
    assert chat.engine.summary()["tokens_pinned"] == head
    assert chat.engine.tokens_seen > chat.engine.n_sink + chat.engine.window  # the window moved on; the prefix stayed
    with caplog.at_level(logging.WARNING):
        small = ChatSession(Engine(model, tok, n_sink=4, window=2 * head), system=system)
        "".join(small.send("Hi", params))
    assert small.pinned.tokens == 4 and small.engine.cache.pins == [4]
    assert "more than a quarter" in caplog.text and "not pinned" in caplog.text
    off = ChatSession(Engine(model, tok, n_sink=4, window=4 * head), system=system, pin="none")
    "".join(off.send("Hi", params))
    assert off.engine.cache.pins == [4]
    with pytest.raises(ValueError, match="--pin"):
        ChatSession(off.engine, pin="everything")


# -- the server: a pin per conversation, reported, kept across restarts, chosen per request -------------

SYSTEM = "Be terse."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from sinkstream.models import export_model

    return export_model(tiny_model("llama", layers=2), tiny_tokenizer(), tmp_path_factory.mktemp("model") / "tiny")


def _head(system: str) -> int:
    """What the tiny template renders before the first user message's text."""
    return len(tiny_tokenizer()(f"<s>system: {system}</s><s>user: ", add_special_tokens=False).input_ids)


def _ask(srv, messages, sid=None, **extra):
    import threading  # noqa: F401 (the callers run it in threads)

    body = {"model": "tiny", "messages": messages, "max_tokens": 40, "temperature": 0, "logprobs": True,
            "top_logprobs": 3, **({"session_id": sid} if sid else {}), **extra}  # fmt: skip
    status, r = srv.request("POST", "/v1/chat/completions", body)
    assert status == 200, r
    return r


def _lp(r) -> list:
    return [(t["token"], t["logprob"]) for t in r["choices"][0]["logprobs"]["content"]]


def _metric(srv, name: str) -> float:
    import re

    return float(re.search(rf"^{name} (\S+)$", srv.request("GET", "/metrics")[1], re.M).group(1))


def test_server_pins_sessions_reports_and_keeps_them_across_a_restart(model_dir, tmp_path):
    from serverproc import Server

    srv = Server(model_dir, tmp_path / "s", window=124).start()  # a quarter of the 128-token cache: 32
    head = _head(SYSTEM)
    try:
        r = _ask(srv, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello there"}], "p")
        assert r["session"]["tokens_pinned"] == head and r["session"]["mode"] == "new"
        none = _ask(srv, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}], "n", pin="none")
        assert none["session"]["tokens_pinned"] == 4
        long = _ask(srv, [{"role": "system", "content": SYSTEM * 6}, {"role": "user", "content": "hi"}], "l")
        assert long["session"]["tokens_pinned"] == 4  # more than a quarter of the cache: the sinks alone
        assert "more than a quarter of the 128-token cache" in srv.log.read_text()
        for i in range(6):  # far past the cache: the prefix stays
            r = _ask(srv, [{"role": "user", "content": f"turn {i}, a message that fills the window"}], "p")
        assert r["session"]["tokens_seen"] > 128 and r["session"]["tokens_pinned"] == head
        status, body = srv.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                                      "pin": 128})  # fmt: skip
        assert status == 400 and body["error"]["param"] == "pin" and "no window" in body["error"]["message"]
        expected = _ask(srv, [{"role": "user", "content": "and after a restart?"}], "p")
        srv.request("DELETE", "/v1/sessions/p")
    finally:
        srv.stop()
    srv = Server(model_dir, tmp_path / "s2", window=124).start()
    try:
        _ask(srv, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello there"}], "p")
        for i in range(6):
            _ask(srv, [{"role": "user", "content": f"turn {i}, a message that fills the window"}], "p")
    finally:
        srv.stop()
    srv.start()  # nothing in memory: the session comes back from its snapshot and record
    try:
        assert srv.request("GET", "/v1/sessions/p")[1]["tokens_pinned"] == head
        got = _ask(srv, [{"role": "user", "content": "and after a restart?"}], "p")
        assert _lp(got) == _lp(expected) and got["session"]["tokens_pinned"] == head
    finally:
        srv.stop()


def test_server_new_system_prompt_in_a_session_restarts_it_pinned(model_dir, tmp_path):
    from serverproc import Server

    srv = Server(model_dir, tmp_path / "s", window=124).start()
    try:
        first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
        _ask(srv, first, "s")
        r = _ask(srv, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "again"}], "s")
        assert r["session"]["mode"] == "appended"  # the same system prompt again is no new message
        roles = [m["role"] for m in srv.request("GET", "/v1/sessions/s/messages")[1]["data"]]
        assert roles == ["system", "user", "assistant", "user", "assistant"]
        other = "Use French."
        r = _ask(srv, [{"role": "system", "content": other}, {"role": "user", "content": "third"}], "s")
        assert r["session"]["mode"] == "restarted" and r["session"]["tokens_pinned"] == _head(other)
        transcript = srv.request("GET", "/v1/sessions/s/messages")[1]["data"]
        assert [m["content"] for m in transcript if m["role"] == "system"] == [other]
        assert [m["content"] for m in transcript if m["role"] == "user"] == ["hello", "again", "third"]
        # the same state as a client that sends the conversation whole, with the new system prompt
        whole = [{"role": "system", "content": other}] + [
            {"role": m["role"], "content": m["content"]} for m in transcript[1:-1]
        ]
        assert _lp(_ask(srv, whole)) == _lp(r)
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        r = _ask(srv, [{"role": "user", "content": "now with a tool"}], "s", tools=tools)
        assert r["session"]["mode"] == "restarted"  # other tools: their new prefix is pinned, never mixed
    finally:
        srv.stop()


def test_server_rows_with_different_pins_decode_together(model_dir, tmp_path):
    """Conversations with different pinned prefixes in one batch: each answers as it does alone."""
    import threading

    from serverproc import Server

    srv = Server(model_dir, tmp_path / "s", window=252).start()
    try:
        systems = ["Be terse.", "You are a helpful assistant.", "", "Speak like a pirate, always."]
        requests = [
            ([{"role": "system", "content": s}] if s else []) + [{"role": "user", "content": f"question {i}"}]
            for i, s in enumerate(systems)
        ]
        alone = [_ask(srv, m, pin=p) for m, p in zip(requests, ["auto", "auto", "none", 9])]
        together = [None] * len(requests)
        rows, steps = _metric(srv, "sinkstream_decode_rows_total"), _metric(srv, "sinkstream_decode_steps_total")

        def run(i, pin):
            together[i] = _ask(srv, requests[i], f"t{i}", pin=pin)

        threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(["auto", "auto", "none", 9])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r["session"]["tokens_pinned"] for r in together] == [_head(systems[0]), _head(systems[1]), 4, 9]
        assert (
            _metric(srv, "sinkstream_decode_rows_total") - rows > _metric(srv, "sinkstream_decode_steps_total") - steps
        )
        for a, b in zip(together, alone):  # a batch's matmuls round otherwise than one row's
            assert [t for t, _ in _lp(a)] == [t for t, _ in _lp(b)]
            assert max(abs(x - y) for (_, x), (_, y) in zip(_lp(a), _lp(b))) < 1e-4
    finally:
        srv.stop()
