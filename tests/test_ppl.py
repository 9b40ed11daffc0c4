"""Streaming NLL against references computed another way."""

import numpy as np
import pytest
import torch

from helpers import random_ids, tiny_model
from sinkstream import Engine
from sinkstream.eval.exact import exact_stream_logits, supports_exact
from sinkstream.eval.ppl import streaming_nll


class _NoTok:
    eos_token_id = None


@torch.no_grad()
def test_chunk_1_equals_step_by_step_and_big_cache_equals_dense():
    model = tiny_model("llama", layers=2)
    ids = random_ids(150)[0]
    ref = []  # token by token through the same cache policy, rebases included
    engine = Engine(model, _NoTok(), n_sink=4, window=20)
    for t in range(len(ids) - 1):
        lp = torch.log_softmax(engine.step(int(ids[t]))[0], -1)
        ref.append(-float(lp[ids[t + 1]]))
    np.testing.assert_allclose(streaming_nll(model, ids, 4, 20, chunk=1, progress=False), ref, atol=1e-4)
    dense = -torch.log_softmax(model(ids[None]).logits[0, :-1], -1).gather(1, ids[1:, None])[:, 0]
    chunked = streaming_nll(model, ids, 4, 200, chunk=16, progress=False)
    np.testing.assert_allclose(chunked, dense.numpy(), atol=1e-4)


@pytest.mark.parametrize("n_sink", [0, 1, 4])
@torch.no_grad()
def test_exact_chunks_equal_token_by_token(family, n_sink):
    """Chunked evaluation == the engine's token-by-token streaming (max |Δlogit| < 1e-4, fp32)."""
    model = tiny_model(family, layers=2)
    if not supports_exact(model):
        pytest.skip("attention not through transformers' interface (Falcon) or ALiBi: evaluated token by token")
    window, n = 20, 150
    ids = random_ids(n, seed=5)[0]
    engine = Engine(model, _NoTok(), n_sink=n_sink, window=window)
    ref = torch.stack([engine.step(int(t))[0] for t in ids])
    got = torch.cat([lg for _, lg in exact_stream_logits(model, ids, n_sink, window, chunk=16)])
    assert (got - ref).abs().max() < 1e-4
    assert model.config._attn_implementation == "eager"  # restored


@pytest.mark.parametrize("attn", ["sdpa", "sinkstream"])
@torch.no_grad()
def test_decode_cache_exact_over_2000_steps(attn):
    """The preallocated ring cache (one slot written per step, rebases every ~window tokens) keeps the
    logits of exact streaming, computed another way (banded attention, no ring, no rebase), for 2,000 steps."""
    from sinkstream.attention import register

    register()
    model = tiny_model("llama", layers=2, attn=attn)
    ids = random_ids(2000, seed=11)[0]
    engine = Engine(model, _NoTok(), n_sink=4, window=60)
    ref = torch.cat([lg for _, lg in exact_stream_logits(model, ids, 4, 60, chunk=50)])
    for t in range(len(ids)):
        got = engine.step(int(ids[t]))[0]
        assert (got - ref[t]).abs().max() < 1e-4, f"step {t}"
    assert engine.stats.rebases >= 25 and engine.tokens_cached == 64


def test_attention_maps_every_family(family):
    from sinkstream.attention_maps import attention_maps, first_token_mass

    model = tiny_model(family, layers=2)
    maps = attention_maps(model, random_ids(24)[0])
    assert maps.shape == (2, 24, 24)
    if family == "gpt_oss":  # the learned per-head sink logit takes the rest of each row's mass
        assert (maps.sum(-1) <= 1 + 1e-5).all() and maps.sum(-1).min() < 0.99
    else:
        np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-4)  # rows are distributions over keys
    assert np.triu(maps, 1).max() == 0  # causal
    assert first_token_mass(maps).shape == (2,)
    heads = attention_maps(model, random_ids(24)[0], per_head=True)
    assert heads.shape[:2] == (2, model.config.num_attention_heads)
    np.testing.assert_allclose(heads.mean(axis=1), maps, atol=1e-6)


def test_sink_head_mass_finds_one_sink_head():
    from sinkstream.attention_maps import first_token_mass, sink_head_mass

    n = 64
    uniform = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    sink = uniform * 0.5
    sink[:, 0] += 0.5  # half of every row on token 0
    maps = np.stack([np.stack([uniform, uniform, uniform, uniform]), np.stack([uniform, sink, uniform, uniform])])
    got = sink_head_mass(maps)
    late = np.mean(1 / np.arange(n // 2 + 1, n + 1))
    np.testing.assert_allclose(got, [late, 0.5 + 0.5 * late])
    assert first_token_mass(maps.mean(axis=1))[1] < 0.2  # the head average hides it


@torch.no_grad()
def test_every_method_finite_and_text_positions_differ_past_the_window():
    from sinkstream.eval.ppl import run_method

    model = tiny_model("llama", layers=2)
    ids = random_ids(120)[0]
    for method in ("streaming", "dense", "recompute"):
        nll, info = run_method(model, ids, method, 4, 24, chunk=16, stride=7, progress=False)
        vals = nll[~np.isnan(nll)]
        assert vals.size and np.isfinite(vals).all() and np.isfinite(info["ppl"])
    cache = streaming_nll(model, ids, 4, 24, chunk=16, progress=False)
    text = streaming_nll(model, ids, 4, 24, chunk=16, positions="text", progress=False)
    n = 4 + 24  # identical while every token is still in the cache, different once sinks are far behind
    np.testing.assert_allclose(cache[: n - 1], text[: n - 1], atol=1e-5)
    assert np.abs(cache[n + 10 :] - text[n + 10 :]).max() > 1e-3


def test_streameval_questions_are_answerable_from_the_text():
    from sinkstream.eval.streameval import make_lines

    lines = make_lines(100, seed=1)
    text = "\n".join(x.text() for x in lines)
    for x in lines[::7]:  # each asked line's number is in the stream, once, on the line with that id
        assert text.count(f"line {x.name}:") == 1 and f"line {x.name}: REGISTER_CONTENT is <{x.value}>" in text
