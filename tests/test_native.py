"""sinkstream's CPU kernels (native/decode.cpp), one op at a time, each against a reference computed with
PyTorch ops: rms_norm, silu_mul, packed_linear (int8 and bf16 tiles, with and without an accumulator) and
attend (rotary, the new key written at its slot, attention over the filled slots, sinks seen as computed)."""

from __future__ import annotations

import pytest
import torch

from sinkstream import native
from sinkstream.fused import TorchBackend, _Layer, rms_norm
from sinkstream.quant import PackedLinear

pytestmark = pytest.mark.skipif(not native.available(), reason=f"no native kernels: {native.unavailable_reason()}")
GEN = torch.Generator().manual_seed(0)


def _randn(*shape) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


@pytest.mark.parametrize("rows", [1, 3])
def test_rms_norm(rows):
    x, w = _randn(rows, 96), _randn(96)
    torch.testing.assert_close(native.ops().rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), atol=1e-5, rtol=1e-5)


def test_silu_mul():
    gu = _randn(2, 2 * 64)
    g, u = gu.chunk(2, dim=-1)
    torch.testing.assert_close(native.ops().silu_mul(gu), torch.nn.functional.silu(g) * u, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_packed_linear(fmt, rows):
    lin = torch.nn.Linear(96, 48, bias=True)
    with torch.no_grad():
        lin.weight.copy_(_randn(48, 96))
    layer = PackedLinear.from_linear(lin, fmt)
    assert layer.packed
    x = _randn(rows, 96)
    ref = x.double() @ layer.dequantized().double().t() + lin.bias.detach().double()
    tol = 1e-5 * float((x.abs().double() @ layer.dequantized().abs().double().t()).max())
    out = native.ops().packed_linear(x, layer.weight, layer.scale, layer.bias, None)
    assert float((out.double() - ref).abs().max()) <= tol
    acc = _randn(rows, 48)
    start = acc.clone()
    native.ops().packed_linear(x, layer.weight, layer.scale, layer.bias, acc)  # adds into acc
    assert float((acc.double() - start.double() - ref).abs().max()) <= tol + 1e-6


@pytest.mark.parametrize("per_row", [False, True], ids=["sinks of the buffer", "sinks per row"])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("n_sink", [0, 4])
def test_attend(n_sink, qk_norm, per_row):
    """Rows at different fills (a new sink, a filling window, a full ring), with the sink buffers' sinks or
    each row's own (pinned prefixes of different lengths): the output and every buffer it writes equal the
    PyTorch backend's, which spans the whole buffer under a mask."""
    heads, kv_heads, dim, cap = 4, 2, 16, n_sink + 12
    rows = 3
    qkv = _randn(rows, (heads + 2 * kv_heads) * dim)
    buffers = [_randn(rows, kv_heads, cap, dim), _randn(rows, kv_heads, cap, dim),
               _randn(rows, kv_heads, n_sink, dim), _randn(rows, kv_heads, n_sink, dim)]  # fmt: skip
    buffers[1][:, :, :n_sink] = buffers[3]  # as in a cache: a sink's value is stored twice, never rotated
    slots = torch.tensor([min(1, n_sink), n_sink + 5, cap - 1] if n_sink else [0, 5, cap - 1])
    lengths = torch.tensor([int(slots[0]) + 1, n_sink + 6, cap])
    angles = _randn(rows, 2, 1) * torch.arange(1, 5).float()  # [B, 2, rot/2]: the token's frame, the sinks'
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # rot_dim 8 < dim: partial
    norms = (_randn(dim), _randn(dim)) if qk_norm else (None, None)
    layer = _Layer(None, None, None, None, None, None, *norms)
    sinks = torch.tensor([n_sink, max(n_sink - 3, 0), n_sink // 2]) if per_row else None
    ref_buffers = [b.clone() for b in buffers]
    want = TorchBackend(heads, kv_heads, dim, dim**-0.5, 1e-6).attend(qkv, ref_buffers, slots, lengths, cos, sin, layer,
                                                                      sinks)  # fmt: skip
    got = native.ops().attend(qkv, *buffers, slots, lengths, cos.contiguous(), sin.contiguous(), heads, *norms, 1e-6,
                              dim**-0.5, sinks)  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for b, ref in zip(buffers, ref_buffers):
        torch.testing.assert_close(b, ref, atol=1e-6, rtol=1e-5)
