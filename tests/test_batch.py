"""Batches of independent streams: every row equals its stream run alone."""

import pytest
import torch

from helpers import random_ids, tiny_model, tiny_tokenizer
from sinkstream import Engine, SamplingParams, SinkCache
from sinkstream.positions import ALIBI_FAMILIES


def _step(model, cache, ids, family):
    """One token per row, rows at different lengths: per-row positions and mask from the cache."""
    kw = {"attention_mask": cache.attention_mask(torch.float32)}  # 4D (a dict for hybrids); 2D for ALiBi
    if family not in ALIBI_FAMILIES:
        kw["position_ids"] = cache.position_ids(ids.shape[-1])
    return model(ids, past_key_values=cache, **kw).logits[:, -1]


@torch.no_grad()
def test_batch_equals_alone(family):
    _batch_equals_alone(family, "eager")


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
def test_batch_equals_alone_sdpa(family):
    _batch_equals_alone(family, "sdpa")


@torch.no_grad()
def _batch_equals_alone(family, attn):
    model = tiny_model(family, layers=2, attn=attn)
    n_sink, window, steps = 4, 24, 70
    lengths = [3, 30, 75]  # one stream still filling its sinks, one mid-window, one far past it
    streams = [random_ids(n + steps, seed=i)[0] for i, n in enumerate(lengths)]
    alone = []
    for ids, n in zip(streams, lengths):
        engine = Engine(model, tiny_tokenizer(), n_sink=n_sink, window=window, prefill_chunk=8)
        engine.prefill(ids[:n].tolist())
        alone.append(torch.stack([engine.step(int(t))[0] for t in ids[n:]]))
    caches = []
    for ids, n in zip(streams, lengths):  # each stream prefilled alone, then stacked
        engine = Engine(model, tiny_tokenizer(), n_sink=n_sink, window=window, prefill_chunk=8)
        engine.prefill(ids[:n].tolist())
        caches.append(engine.cache)
    cache = SinkCache.stack(caches)
    assert cache.seen_per_row == lengths
    for s in range(steps):
        if s == 40 and cache.rebase():  # a rebase in the middle changes nothing either
            pass
        ids = torch.stack([x[n + s] for x, n in zip(streams, lengths)])[:, None]
        out = _step(model, cache, ids, family)
        for b in range(len(lengths)):
            torch.testing.assert_close(out[b], alone[b][s], atol=1e-4, rtol=0, msg=f"row {b} step {s}")
    assert cache.cached_per_row == [min(n + steps, n_sink + window) for n in lengths]
    cache.select_rows([2, 0])  # a row leaves: the others go on unchanged
    ids = torch.stack([streams[2][-1], streams[0][-1]])[:, None]
    assert _step(model, cache, ids, family).shape[0] == 2


@torch.no_grad()
def test_generate_batch_equals_generate_alone():
    model = tiny_model("qwen2", layers=2)
    tok = tiny_tokenizer()
    prompts = ["Hello there", "A much longer prompt that goes past the window of the cache, " * 2, "x"]
    ids = [tok(p).input_ids for p in prompts]
    for params in (SamplingParams(max_new_tokens=60), SamplingParams(max_new_tokens=60, temperature=1.0, seed=3)):
        engine = Engine(model, tok, n_sink=4, window=32)
        alone = []
        for p in ids:
            engine.reset()
            alone.append([t.id for t in engine.generate(p, params) if t.id >= 0])
        batch = [[] for _ in prompts]
        for row, t in engine.generate_batch(ids, params):
            if t.id >= 0:
                batch[row].append(t.id)
        assert batch == alone


def test_ragged_rows_need_positions_and_mask():
    model = tiny_model("llama", layers=1)
    caches = []
    for n in (3, 9):
        c = SinkCache(2, 8, config=model.config)
        model(random_ids(n), past_key_values=c)
        caches.append(c)
    cache = SinkCache.stack(caches)
    with pytest.raises(ValueError, match="different lengths"):
        model(random_ids(2).T, past_key_values=cache)
    with pytest.raises(ValueError, match="different lengths"):
        model(random_ids(6).view(2, 3), past_key_values=cache)


@torch.no_grad()
def test_extract_a_row_and_go_on_alone():
    """A stream leaves a batch as its own cache (a copy) and continues exactly as it would have alone."""
    model = tiny_model("llama", layers=2)
    lengths, steps = [5, 40], 30
    streams = [random_ids(n + 2 * steps, seed=i)[0] for i, n in enumerate(lengths)]
    caches, alone = [], []
    for ids, n in zip(streams, lengths):
        engine = Engine(model, tiny_tokenizer(), n_sink=4, window=24, prefill_chunk=8)
        engine.prefill(ids[:n].tolist())
        caches.append(engine.cache)
        ref = Engine(model, tiny_tokenizer(), n_sink=4, window=24, prefill_chunk=8)
        ref.prefill(ids[:n].tolist())
        alone.append(torch.stack([ref.step(int(t))[0] for t in ids[n:]]))
    cache = SinkCache.stack(caches)
    for s in range(steps):
        ids = torch.stack([x[n + s] for x, n in zip(streams, lengths)])[:, None]
        _step(model, cache, ids, "llama")
    solo = cache.extract([1])
    assert solo.seen_per_row == [lengths[1] + steps] and cache.batch_size == 2
    engine = Engine(model, tiny_tokenizer(), n_sink=4, window=24)
    engine.cache = solo
    got = torch.stack([engine.step(int(t))[0] for t in streams[1][lengths[1] + steps :]])
    torch.testing.assert_close(got, alone[1][steps:], atol=1e-4, rtol=0)
