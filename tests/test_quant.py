"""The packed weight formats (quant.py): each product against its dequantized reference, packing round
trips, a tied embedding reading the quantized head, and how close an int8 model stays to float32; where
the kernels do not build, PyTorch computes the same step."""

from __future__ import annotations

import pytest
import torch

from helpers import random_ids, tiny_model
from sinkstream import native
from sinkstream.attention import register
from sinkstream.cache import SinkCache as Cache
from sinkstream.engine import forward_stream
from sinkstream.fused import FusedDecoder, select_decoder
from sinkstream.quant import PackedEmbedding, PackedLinear, pack, quantize_int8, quantize_model, unpack

BACKENDS = ["native", "torch"] if native.available() else ["torch"]
WINDOW = 28


def _model(family: str, seed: int = 0):
    model = tiny_model(family, layers=2, attn="sdpa", seed=seed)
    model.set_attn_implementation(register())  # what load_model gives
    return model


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
