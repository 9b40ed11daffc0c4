"""The fused decode step against the transformers path, over long streams, batches, snapshots, and the
hand-over between the two, on each backend."""

from __future__ import annotations

import pytest
import torch

from helpers import random_ids, tiny_model, tiny_tokenizer
from sinkstream import Engine, SamplingParams, SinkCache, native
from sinkstream.attention import register
from sinkstream.cache import SinkCache as Cache
from sinkstream.engine import forward_stream
from sinkstream.fused import FUSED_FAMILIES, FusedDecoder, select_decoder, unsupported_reason

FAMILIES = ["llama", "llama-scaled", "mistral", "qwen2", "qwen3"]  # every model_type the fused step covers
BACKENDS = ["native", "torch"] if native.available() else ["torch"]
WINDOW = 28  # 2,000 steps: ~70 evictions per window and ~70 rebases


def _model(family: str, seed: int = 0):
    model = tiny_model(family, layers=2, attn="sdpa", seed=seed)
    model.set_attn_implementation(register())  # what load_model gives
    return model


def test_families_listed_are_the_tested_ones():
    assert {tiny_model(f).config.model_type for f in FAMILIES} == set(FUSED_FAMILIES)


@pytest.mark.parametrize("n_sink", [0, 1, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_step_equals_transformers_over_2000_steps(family, n_sink):
    """Logits of every step within 1e-4, with evictions and rebases, for each backend in lockstep."""
    ref = _model(family)
    runs = [(FusedDecoder(_model(family), backend), Cache(n_sink, WINDOW, config=ref.config)) for backend in BACKENDS]
    ref_cache = Cache(n_sink, WINDOW, config=ref.config)
    ids = random_ids(2000, seed=3)[0]
    worst = dict.fromkeys(BACKENDS, 0.0)
    rebases = 0
    with torch.no_grad():
        for t in range(2000):
            x = ids[t : t + 1][None]
            want, rebased = forward_stream(ref, ref_cache, x)
            rebases += rebased
            for backend, (fused, cache) in zip(BACKENDS, runs):
                got, _ = forward_stream(fused.model, cache, x, fused=fused)
                worst[backend] = max(worst[backend], float((got - want).abs().max()))
    assert rebases > 50 and ref_cache.tokens_cached == n_sink + WINDOW
    assert all(w < 1e-4 for w in worst.values()), worst


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_rows_of_different_lengths_equals_each_alone(backend):
    """Rows that joined at different lengths (some still filling, some past rebases), stepped together,
    get what each gets alone; a row leaving the batch changes nothing for the others."""
    family = "qwen3"
    fused = FusedDecoder(_model(family), backend)
    model = fused.model
    lengths = [3, 17, 45, 130]  # a row still placing its sinks, one filling, two evicting
    alone, caches = [], []
    for i, n in enumerate(lengths):
        cache = Cache(4, WINDOW, config=model.config)
        forward_stream(model, cache, random_ids(n, seed=i)[:, : min(n, WINDOW)], fused=fused)
        for t in range(min(n, WINDOW), n):
            forward_stream(model, cache, random_ids(n, seed=i)[:, t : t + 1], fused=fused)
        caches.append(cache)
    batch = Cache.stack(caches)
    steps = random_ids(60, seed=9)[0]
    for cache in caches:
        row = []
        for t in range(60):
            row.append(forward_stream(model, cache, steps[t : t + 1][None], fused=fused)[0][0])
        alone.append(torch.stack(row))
    live = list(range(len(lengths)))
    for t in range(60):
        if t == 30:  # the second row leaves
            batch.select_rows([0, 2, 3])
            live = [0, 2, 3]
        got, _ = forward_stream(model, batch, steps[t : t + 1].expand(len(live))[:, None], fused=fused)
        for b, c in enumerate(live):
            assert torch.allclose(got[b], alone[c][t], atol=1e-5), (t, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_and_transformers_steps_alternate_on_one_stream(backend):
    """Prefill chunks (transformers) between runs of fused steps: the sinks the fused step leaves unplaced
    are placed by the next transformers forward; every logit equals an all-transformers stream."""
    ref, fused = _model("llama"), FusedDecoder(_model("llama"), backend)
    a, b = Cache(4, WINDOW, config=ref.config), Cache(4, WINDOW, config=ref.config)
    ids = random_ids(400, seed=5)[0]
    t = 0
    for turn in range(12):
        chunk = ids[t : t + 7][None]
        want, _ = forward_stream(ref, a, chunk)
        got, _ = forward_stream(fused.model, b, chunk, fused=fused)
        assert torch.allclose(got, want, atol=1e-4), turn
        t += 7
        for _ in range(25):
            want, _ = forward_stream(ref, a, ids[t : t + 1][None])
            got, _ = forward_stream(fused.model, b, ids[t : t + 1][None], fused=fused)
            assert torch.allclose(got, want, atol=1e-4), turn
            t += 1
    k_ref, _, pos_ref = a.layers[1].contents()
    k_got, _, pos_got = b.layers[1].contents()
    assert torch.equal(pos_ref, pos_got) and torch.allclose(k_ref, k_got, atol=1e-4)


def test_snapshot_restore_continue_equals_uninterrupted():
    model, tok = _model("llama"), tiny_tokenizer()
    engine = Engine(model, tok, n_sink=4, window=WINDOW)
    assert engine.fused is not None
    params = SamplingParams(max_new_tokens=40, temperature=0.8, seed=3)
    list(engine.generate(random_ids(90, seed=1)[0].tolist(), params))
    tensors, meta = engine.cache.state()
    saved = ({k: v.clone() for k, v in tensors.items()}, meta)
    first = [t.id for t in engine.generate([5, 6, 7], params)]
    engine.cache = SinkCache.from_state(*saved, config=model.config)
    again = [t.id for t in engine.generate([5, 6, 7], params)]
    assert first == again and len(first) > 10


def test_engine_uses_the_fused_step_where_it_applies():
    assert select_decoder(_model("llama")) is not None
    assert select_decoder(_model("llama"), "transformers") is None
    neox = tiny_model("gpt_neox")
    assert unsupported_reason(neox) and select_decoder(neox) is None
    with pytest.raises(ValueError, match="fused step covers"):
        select_decoder(neox, "fused")
