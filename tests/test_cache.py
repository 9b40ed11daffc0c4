"""SinkCache against references computed another way (tiny random models, fp32)."""

import json

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from helpers import random_ids, tiny_model
from sinkstream import SinkCache, UnsupportedModelError
from sinkstream.engine import Engine


def in_cache_tokens(t: int, n_sink: int, window: int) -> list[int]:
    """Text indices of the tokens the newest token t attends to: sinks + the window ending at t."""
    return list(range(min(n_sink, t + 1))) + list(range(max(n_sink, t - window + 1), t + 1))


@torch.no_grad()
def test_cache_larger_than_sequence_equals_plain_model(family):
    model = tiny_model(family, layers=2)
    ids = random_ids(60)
    sink, dyn = SinkCache(4, 200, config=model.config), DynamicCache(config=model.config)
    full = model(ids).logits[0]
    for t in range(ids.shape[1]):
        a = model(ids[:, t : t + 1], past_key_values=sink).logits[0, -1]
        b = model(ids[:, t : t + 1], past_key_values=dyn).logits[0, -1]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(a, full[t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_sink", [0, 1, 4])
@torch.no_grad()
def test_one_layer_streaming_equals_recompute(family, n_sink):
    """With one layer, KVs depend only on token and position, so every step must equal a
    from-scratch forward over [sinks + window] at positions 0..n-1."""
    window, steps = 28, (500 if family == "llama" else 300)
    model = tiny_model(family, layers=1)
    ids = random_ids(steps, seed=n_sink)
    cache = SinkCache(n_sink, window, config=model.config)
    for t in range(steps):
        out = model(ids[:, t : t + 1], past_key_values=cache).logits[0, -1]
        ref = model(ids[:, in_cache_tokens(t, n_sink, window)]).logits[0, -1]  # positions 0..n-1
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0, msg=f"step {t}")
        assert cache.tokens_cached == min(t + 1, n_sink + window)
    assert cache.tokens_seen == steps


@torch.no_grad()
def test_multi_layer_first_layer_kv_equal_fresh_computation(family):
    model = tiny_model(family, layers=3)
    n_sink, window = 4, 20
    ids = random_ids(137)
    cache = SinkCache(n_sink, window, config=model.config)
    for t in range(ids.shape[1]):
        model(ids[:, t : t + 1], past_key_values=cache)
    keys, values, pos = cache.layers[0].contents()
    kept = in_cache_tokens(ids.shape[1] - 1, n_sink, window)
    if cache.layers[0].is_sliding:  # hybrid models: layer 0 keeps the model's own sliding window
        kept = kept[-cache.layers[0].window :]
    fresh = DynamicCache()  # plain full layers: keeps every key
    model(ids[:, kept], position_ids=pos[None], past_key_values=fresh)
    torch.testing.assert_close(keys, fresh.layers[0].keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(values, fresh.layers[0].values, atol=1e-5, rtol=0)
    # in-cache positions: sinks right before the window, contiguous, newest last
    assert pos.tolist() == list(range(int(pos[0]), int(pos[0]) + len(kept)))


@torch.no_grad()
def test_chunked_prefill_equals_plain_model(family):
    """Chunks through a cache that holds every token (hybrid models: their sliding layers do evict)."""
    model = tiny_model(family, layers=2)
    ids = random_ids(61)
    full = model(ids).logits[0]
    cache = SinkCache(4, 200, config=model.config)
    outs = [model(ids[:, s : s + 7], past_key_values=cache).logits[0] for s in range(0, ids.shape[1], 7)]
    torch.testing.assert_close(torch.cat(outs), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_generate_equals_engine_greedy(family):
    model = tiny_model(family, layers=2)
    model.generation_config.eos_token_id = None  # compare 200 tokens without early stop
    prompt = random_ids(12)
    cache = SinkCache(4, 28, config=model.config)
    out = model.generate(prompt, past_key_values=cache, max_new_tokens=230, do_sample=False, use_cache=True)
    engine = Engine(model, tokenizer=_NoTok(), n_sink=4, window=28)
    engine.eos_ids = set()
    toks = []
    logits = engine.prefill(prompt[0].tolist())
    for _ in range(230):
        toks.append(int(logits.argmax(-1)))
        logits = engine.step(toks[-1])
    assert out[0, 12:].tolist() == toks
    assert cache.tokens_seen == 12 + 229 and cache.tokens_cached == 32  # ran 200+ tokens past the window


class _NoTok:
    eos_token_id = None


@torch.no_grad()
def test_cache_bounded_over_5000_steps():
    model = tiny_model("llama", layers=1, hidden_size=32, intermediate_size=32)
    engine = Engine(model, _NoTok(), n_sink=4, window=16)
    ids = random_ids(5000)[0].tolist()
    max_len = max_pos = 0
    for t in ids:
        engine.step(t)
        max_len = max(max_len, engine.cache.layers[0].keys.shape[-2], engine.tokens_cached)
        max_pos = max(max_pos, engine.cache.get_seq_length())
    assert engine.tokens_seen == 5000
    assert engine.tokens_cached == 20 and max_len <= 20
    assert max_pos <= 4 + 2 * 16  # the engine rebases: RoPE positions stay bounded
    assert engine.stats.rebases > 100


@torch.no_grad()
def test_engine_rebase_stays_exact_one_layer():
    """Across many rebases, every step still equals the from-scratch recompute."""
    model = tiny_model("qwen2", layers=1)
    n_sink, window = 4, 12
    engine = Engine(model, _NoTok(), n_sink=n_sink, window=window)
    ids = random_ids(400)
    for t in range(ids.shape[1]):
        out = engine.step(int(ids[0, t]))[0]
        ref = model(ids[:, in_cache_tokens(t, n_sink, window)]).logits[0, -1]
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0, msg=f"step {t}")
    assert engine.stats.rebases >= 30


@torch.no_grad()
def test_prompt_three_times_the_window(family):
    n_sink, window = 4, 24
    one = tiny_model(family, layers=1)
    ids = random_ids(3 * window + 5)
    engine = Engine(one, _NoTok(), n_sink=n_sink, window=window)
    logits = engine.prefill(ids[0].tolist())
    assert engine.tokens_seen == ids.shape[1] and engine.tokens_cached == n_sink + window
    t = ids.shape[1] - 1
    ref = one(ids[:, in_cache_tokens(t, n_sink, window)]).logits[0, -1]
    torch.testing.assert_close(logits[0], ref, atol=1e-4, rtol=0)
    # a multi-layer model: bounded, and the decode after the prompt runs
    deep = Engine(tiny_model(family, layers=3), _NoTok(), n_sink=n_sink, window=window)
    deep.prefill(ids[0].tolist())
    deep.step(5)
    assert deep.tokens_cached == n_sink + window and deep.tokens_seen == ids.shape[1] + 1
    # a plain forward with more than a window at once is refused with a clear message
    with pytest.raises(ValueError, match="chunks of at most"):
        one(ids, past_key_values=SinkCache(n_sink, window, config=one.config))


def _move_to_offset(cache: SinkCache, offset: int) -> None:
    """Make the cache look as if ``offset`` more tokens had been streamed before the window:
    window keys rotated to their positions there, tokens seen advanced."""
    for layer in cache.layers:
        win = layer.keys[:, :, layer.n_sink :]
        win.copy_(layer.rope.shift(win, offset))
    for layout in cache.layouts.values():
        for r in layout.rows:
            r.seen += offset
            r.sink_delta = None  # the next step re-places the sinks


@torch.no_grad()
def test_engine_at_offset_4_million_equals_offset_0():
    model = tiny_model("llama", layers=2)
    ids = random_ids(200)[0].tolist()
    a, b = (Engine(model, _NoTok(), n_sink=4, window=32) for _ in range(2))
    for t in ids[:60]:
        a.step(t)
        b.step(t)
    _move_to_offset(b.cache, 4_000_000)
    assert b.tokens_seen == 4_000_060
    for t in ids[60:]:
        torch.testing.assert_close(b.step(t), a.step(t), atol=1e-4, rtol=0)
    assert b.cache.get_seq_length() <= 4 + 2 * 32


def test_bad_arguments_and_unsupported_family():
    model = tiny_model("llama", layers=1)
    with pytest.raises(ValueError, match="window"):
        SinkCache(4, 0, config=model.config)
    with pytest.raises(ValueError, match="n_sink"):
        SinkCache(-1, 8, config=model.config)
    with pytest.raises(ValueError, match="config"):
        SinkCache(4, 8)
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match=r"absolute positions.*llama"):
        SinkCache(4, 8, config=GPT2Config())
    from helpers import tiny_config

    odd = tiny_config("qwen3", layers=2)
    odd.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(UnsupportedModelError, match="layer types"):
        SinkCache(4, 8, config=odd)
    odd.layer_types, odd.sliding_window = ["sliding_attention"] * 2, 16
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        SinkCache(4, 8, config=odd)
    with pytest.raises(ValueError, match="sliding window"):  # Mistral slides on every layer
        SinkCache(4, 60, config=tiny_config("mistral", layers=1, sliding_window=32))
    alibi_falcon = tiny_config("falcon-mq", layers=1)
    alibi_falcon.alibi = True
    with pytest.raises(UnsupportedModelError, match="ALiBi"):
        SinkCache(4, 8, config=alibi_falcon)


@torch.no_grad()
def test_sdpa_and_eager_agree_past_the_window(family):
    if not tiny_model(family, layers=1)._supports_sdpa:
        pytest.skip(f"{family} has no SDPA attention in transformers (eager only)")
    ids = random_ids(200)
    logits = {}
    for attn in ("eager", "sdpa"):
        model = tiny_model(family, layers=2, attn=attn)
        engine = Engine(model, _NoTok(), n_sink=4, window=24)
        first = engine.prefill(ids[0, :50].tolist())  # chunks with a materialized mask
        steps = [engine.step(int(t))[0] for t in ids[0, 50:]]
        logits[attn] = torch.cat([first, torch.stack(steps)])
    torch.testing.assert_close(logits["sdpa"], logits["eager"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "mpt"])
@torch.no_grad()
def test_state_round_trip_continues_bitwise(family, tmp_path):
    from safetensors.torch import load_file, save_file

    from helpers import tiny_tokenizer

    model = tiny_model(family, layers=2)
    ids = random_ids(260, seed=2)[0].tolist()
    engine = Engine(model, tiny_tokenizer(), n_sink=4, window=24, prefill_chunk=8)
    engine.prefill(ids[:200])
    tensors, meta = engine.cache.state()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "c.safetensors")
    (tmp_path / "c.json").write_text(json.dumps(meta))
    ref = torch.stack([engine.step(t)[0] for t in ids[200:]])
    assert meta == json.loads((tmp_path / "c.json").read_text())  # a snapshot, not a view of live counters
    again = Engine(model, tiny_tokenizer(), n_sink=4, window=24)
    again.cache = SinkCache.from_state(
        load_file(tmp_path / "c.safetensors"), json.loads((tmp_path / "c.json").read_text()), config=model.config
    )
    got = torch.stack([again.step(t)[0] for t in ids[200:]])
    assert torch.equal(got, ref), (got - ref).abs().max()
    with pytest.raises(ValueError, match="snapshot"):
        SinkCache.from_state(tensors, meta | {"model_type": "bert"}, config=model.config)


class _NaiveSinkLayer(CacheLayerMixin):
    """The paper's rule the slow way, for one-token steps: every token's key is kept as it came (rotated
    at the in-cache index the step gave it) with that index; eviction pops the oldest window token
    from a list; every step re-rotates every kept key, in float64, from where it was rotated to its
    present index in the cache. No ring buffer, no rebase, no re-used cos/sin."""

    is_compileable = False
    is_sliding = False

    def __init__(self, n_sink: int, window: int, inv_freq: torch.Tensor):
        super().__init__()
        self.n_sink, self.cap, self.inv_freq = n_sink, n_sink + window, inv_freq.double()
        self.items: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (key, value, index rotated at)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def _rotate(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        rot = 2 * self.inv_freq.shape[0]
        ang = delta * self.inv_freq
        cos, sin = torch.cat((ang, ang)).cos(), torch.cat((ang, ang)).sin()
        x = k.double()
        r, rest = x[..., :rot], x[..., rot:]
        half = torch.cat((-r[..., rot // 2 :], r[..., : rot // 2]), dim=-1)
        return torch.cat((r * cos + half * sin, rest), dim=-1).to(k.dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        assert key_states.shape[-2] == 1
        if len(self.items) == self.cap:
            self.items.pop(self.n_sink)
        self.items.append((key_states, value_states, len(self.items)))
        keys = [self._rotate(k, i - at) for i, (k, _, at) in enumerate(self.items)]
        return torch.cat(keys, dim=-2), torch.cat([v for _, v, _ in self.items], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return min(len(self.items) + query_length, self.cap), 0

    def get_seq_length(self) -> int:
        return len(self.items)

    def get_max_length(self) -> int:
        return self.cap


@pytest.mark.parametrize("fam", ["llama", "gpt_neox", "qwen2"])
@torch.no_grad()
def test_engine_equals_a_naive_sink_cache_over_2000_steps(fam):
    """Two layers (so deeper layers' keys depend on the streamed context), a 4 + 28 cache: 2,000
    one-token steps through the engine's ring-buffer cache (with its rebases, in the default
    one-query attention) give the logits of a list-based cache that re-rotates every key every step."""
    from sinkstream.attention import register

    register()
    n_sink, window = 4, 28
    fast = tiny_model(fam, layers=2, attn="sinkstream")
    slow = tiny_model(fam, layers=2, attn="eager")
    inv_freq = next(m.inv_freq for m in slow.modules() if hasattr(m, "inv_freq"))
    ref = Cache(layers=[_NaiveSinkLayer(n_sink, window, inv_freq) for _ in range(slow.config.num_hidden_layers)])
    engine = Engine(fast, _NoTok(), n_sink=n_sink, window=window)
    ids = random_ids(2000, seed=3)[0].tolist()
    for t, tok in enumerate(ids):
        index = min(t, n_sink + window - 1)
        want = slow(
            torch.tensor([[tok]]),
            past_key_values=ref,
            position_ids=torch.tensor([[index]]),
            cache_position=torch.tensor([index]),
            use_cache=True,
        ).logits[0, -1]
        got = engine.step(tok)[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=f"step {t}")
    assert engine.stats.rebases > 10 and engine.tokens_cached == n_sink + window
