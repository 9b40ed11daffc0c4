"""The fused decode step against the transformers path, over long streams, batches, snapshots, and the
hand-over between the two; the packed weight formats against their dequantized references."""

from __future__ import annotations

import pytest
import torch

from helpers import random_ids, tiny_model, tiny_tokenizer
from sinkstream import Engine, SamplingParams, SinkCache, native
from sinkstream.attention import register
from sinkstream.cache import SinkCache as Cache
from sinkstream.engine import forward_stream
from sinkstream.fused import FUSED_FAMILIES, FusedDecoder, select_decoder, unsupported_reason
from sinkstream.quant import PackedEmbedding, PackedLinear, pack, quantize_int8, quantize_model, unpack

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


# -- weight formats ----------------------------------------------------------------------------------
@pytest.fixture(params=["int8", "bfloat16"])
def fmt(request):
    return request.param


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 40])
def test_packed_linear_equals_its_dequantized_reference(fmt, rows):
    """The kernels (one to sixteen rows) and the dequantizing path (more rows) against ``x @ W_deq.T``: each
    product only differs from float32 by its summation order."""
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 44, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(44, 96, generator=gen))
    layer = PackedLinear.from_linear(lin, fmt)
    plain = (unpack(layer.weight) if layer.packed else layer.weight).float()
    if layer.scale is not None:
        plain = plain * layer.scale[:, None]
    assert torch.equal(layer.dequantized(), plain) and torch.equal(layer.dequantized(8, 20), plain[8:20])
    x = torch.randn(rows, 96, generator=gen)
    ref = x.double() @ layer.dequantized().double().t() + lin.bias.detach().double()
    tol = 1e-5 * float((x.abs().double() @ layer.dequantized().abs().double().t()).max())
    assert float((layer(x).double() - ref).abs().max()) <= tol
    acc = torch.randn(rows, 44, generator=gen)
    start = acc.clone()
    layer(x, acc=acc)
    assert float((acc.double() - start.double() - ref).abs().max()) <= tol + 1e-6
    if fmt == "int8":  # the quantization error itself: at most half a step of each row's scale
        assert float((layer.dequantized() - lin.weight.detach()).abs().div(layer.scale[:, None]).max()) <= 0.5 + 1e-4


def test_pack_round_trips_and_rows_share_memory():
    w = torch.randint(-127, 128, (12, 16), dtype=torch.int8)
    assert torch.equal(unpack(pack(w)), w)
    q, scale = quantize_int8(torch.randn(12, 16))
    layer = PackedLinear(pack(q), scale, None, 16, 12, packed=True)
    part = layer.rows(4, 12)
    assert part.weight.data_ptr() == layer.weight[1:].data_ptr()
    x = torch.randn(2, 16)
    assert torch.allclose(part(x), layer(x)[:, 4:], atol=1e-6)


def test_tied_embedding_reads_the_quantized_head():
    model = tiny_model("llama", tie_word_embeddings=True)
    assert quantize_model(model, "int8") > 0
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, PackedEmbedding) and emb.table is head
    ids = torch.tensor([[0, 3, 99, 50]])
    assert torch.equal(emb(ids), head.dequantized()[ids])


def test_without_the_kernels_pytorch_computes_the_same(monkeypatch):
    """Where sinkstream's kernels do not build: weights in PyTorch's layout, the torch backend, same logits."""
    ids = random_ids(80, seed=2)
    ref = _model("llama")
    quantize_model(ref, "int8")
    want = [forward_stream(ref, c := Cache(4, WINDOW, config=ref.config), ids[:, :20])[0]]
    fused_ref = FusedDecoder(ref, BACKENDS[0])
    want += [forward_stream(ref, c, ids[:, t : t + 1], fused=fused_ref)[0] for t in range(20, 80)]
    monkeypatch.setattr(native, "available", lambda: False)
    model = _model("llama")
    quantize_model(model, "int8")
    assert not any(m.packed for m in model.modules() if isinstance(m, PackedLinear))
    fused = select_decoder(model)
    assert fused.backend == "torch"
    got = [forward_stream(model, c := Cache(4, WINDOW, config=model.config), ids[:, :20])[0]]
    got += [forward_stream(model, c, ids[:, t : t + 1], fused=fused)[0] for t in range(20, 80)]
    for a, b in zip(got, want):  # int8 x bf16 activations (PyTorch's kernel) vs float32 activations
        assert torch.allclose(a, b, atol=0.05 * float(b.abs().max()))


def test_int8_model_stays_close_to_float32():
    """Criterion: teacher-forced over 300 tokens of a tiny model, the int8 model's next-token argmax equals
    the float32 model's at >= 95% of positions and its logits stay within 3% of their range."""
    ids = random_ids(300, seed=4)
    fp32, int8 = _model("llama"), _model("llama")
    quantize_model(int8, "int8")
    with torch.no_grad():
        a = fp32(ids).logits[0]
        b = int8(ids).logits[0]
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    spread = float(a.max() - a.min())
    assert agree >= 0.95 and float((a - b).abs().max()) <= 0.03 * spread, (agree, float((a - b).abs().max()), spread)
