"""A compact one-token decode step for the families that share Llama's block, over a ``SinkCache``.

    fused = FusedDecoder.for_model(model)       # Llama/SmolLM2, Mistral, Qwen2/2.5, Qwen3
    logits = fused.step(cache, ids)             # ids [B]: one new token per row -> logits [B, V]

In the style of gpt-fast's ``decode_one_token``: the projections are fused (q|k|v, gate|up) and kept in
the layout their kernel reads, a layer is a handful of calls, and the cache is the ``SinkCache``'s own
preallocated buffers (so prefill stays on the transformers forward, batches, snapshots and
``model.generate`` keep working, and the two paths can alternate on one stream).

Sinks. The transformers path re-rotates the ``n_sink`` sink keys each step so that they sit right
before the oldest window key. RoPE scores depend only on position differences, so this step rotates
the *query* a second time instead (to ``DecodeStep.sink_positions``) and scores it against the sinks as
they were computed (``sink_keys``): the same scores, without writing to the cache. Positions stay
bounded by the cache's rebase.

One step, two backends (objects with the same operations): ``NativeBackend`` (float32 models on the
CPU, when sinkstream's kernels build): packed int8/bf16 or float32 products and one kernel for rotary +
cache write + attention over only the filled slots. ``TorchBackend``: PyTorch ops only, every shape fixed
by the cache's capacity (the attention always spans the whole buffer under a mask), so a CUDA graph or
``torch.compile`` can capture it; it also serves bf16/fp16 models and other devices.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from . import native
from .cache import SinkCache
from .quant import PackedLinear

FUSED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
BACKENDS = ("auto", "native", "torch")


def unsupported_reason(model) -> str | None:
    """Why ``FusedDecoder`` cannot run ``model`` (None: it can)."""
    from .attention import sink_mode
    from .positions import layer_kinds

    cfg = model.config
    if cfg.model_type not in FUSED_FAMILIES:
        return f"the fused step covers {', '.join(FUSED_FAMILIES)}, not {cfg.model_type}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"the fused step computes SiLU MLPs, not {cfg.hidden_act}"
    if sink_mode(cfg) == "zero":
        return "zero-sink (softmax-off-by-one) models need their own attention"
    if set(layer_kinds(cfg, 1)) != {"rope"}:
        return "sliding-window layers are not in the fused step"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention soft-capping is not in the fused step"
    return None


class DenseLinear:
    """``x @ W + bias`` with W kept [in, out] contiguous (one-row products stream it row after row)."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None):
        self.weight_t, self.bias = weight_t, bias

    def __call__(self, x: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
        if acc is not None and self.bias is None:
            return acc.addmm_(x, self.weight_t)
        out = x @ self.weight_t
        if self.bias is not None:
            out += self.bias
        return out if acc is None else acc.add_(out)


def _fuse(parent: nn.Module, names: list[str]):
    """One linear for the outputs of ``parent``'s layers ``names``, side by side; those layers become views
    of it (no second copy of the weights). Float layers: ``DenseLinear``; packed: ``PackedLinear``."""
    mods = [getattr(parent, n) for n in names]
    if all(isinstance(m, PackedLinear) for m in mods):
        fused = PackedLinear.concat(mods)
        lo = 0
        for name, m in zip(names, mods):
            setattr(parent, name, fused.rows(lo, lo + m.out_features))
            lo += m.out_features
        return fused
    if not all(isinstance(m, nn.Linear) for m in mods):
        raise ValueError(f"cannot fuse {[type(m).__name__ for m in mods]}")
    from .cpu_matmul import release_file_pages

    weight_t = torch.cat([m.weight.detach() for m in mods]).t().contiguous()  # [in, sum(out)]
    has_bias = any(m.bias is not None for m in mods)
    bias = (
        torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in mods])
        if has_bias
        else None
    )
    lo = 0
    for m in mods:
        old = m.weight.data
        m.weight.data = weight_t[:, lo : lo + m.out_features].t()  # same values, a view of the fused matrix
        if has_bias and m.bias is not None:
            m.bias.data = bias[lo : lo + m.out_features]
        lo += m.out_features
        release_file_pages(old, parent)
    return DenseLinear(weight_t, bias)


def _single(parent: nn.Module, name: str):
    mod = getattr(parent, name)
    return mod if isinstance(mod, PackedLinear) else _fuse(parent, [name])


@dataclass
class _Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: object  # each linear: a callable (x, acc=None), the backend's
    o: object
    gate_up: object
    down: object
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 (Llama's)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


class TorchBackend:
    """The step in PyTorch ops, every shape fixed by the cache's capacity (the attention spans the whole
    buffer under a mask), so ``torch.compile`` or a CUDA graph can capture it; any dtype and device."""

    name = "torch"

    def __init__(self, heads: int, kv_heads: int, head_dim: int, scaling: float, eps: float):
        self.heads, self.kv_heads, self.head_dim, self.scaling, self.eps = heads, kv_heads, head_dim, scaling, eps

    def linear(self, lin):
        return lin

    def frames(self, x, cos, sin):
        """The hidden state and the rotary frames as the step computes with them."""
        return x, cos, sin

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, w, self.eps)

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        g, u = gu.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u

    def attend(self, qkv, kv, slots, lengths, cos, sin, layer: _Layer, sinks=None) -> torch.Tensor:
        """Rotary, the new key and value written at their slots, attention over the buffer [B, H * D].
        ``sinks`` [B]: each row's sink slots (default: all of the sink buffers')."""
        keys_buf, values_buf, sink_keys, sink_values = kv
        b, h, kvh, d = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        g, ns, cap = h // kvh, sink_keys.shape[2], keys_buf.shape[2]
        q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
        q, k, v = q.view(b, h, d), k.view(b, kvh, d), v.view(b, kvh, d)
        if layer.q_norm is not None:
            q, k = self.rms_norm(q, layer.q_norm), self.rms_norm(k, layer.k_norm)
        k = _rope(k, cos[:, :1], sin[:, :1])
        q_win = _rope(q, cos[:, :1], sin[:, :1]) * self.scaling
        q_sink = _rope(q, cos[:, 1:], sin[:, 1:]) * self.scaling
        rows = torch.arange(b, device=qkv.device)
        keys_buf[rows, :, slots] = k.to(keys_buf.dtype)
        values_buf[rows, :, slots] = v.to(values_buf.dtype)
        sinks = torch.full_like(slots, ns) if sinks is None else sinks
        if ns:  # a new token in a sink slot is also kept as computed
            is_sink = (slots < sinks)[:, None, None]
            s = slots.clamp(max=ns - 1)
            sink_keys[rows, :, s] = torch.where(is_sink, k, sink_keys[rows, :, s]).to(keys_buf.dtype)
            sink_values[rows, :, s] = torch.where(is_sink, v, sink_values[rows, :, s]).to(keys_buf.dtype)
        keys, values = keys_buf.to(q.dtype), values_buf.to(q.dtype)
        scores = q_win.view(b, kvh, g, d) @ keys.transpose(-1, -2)  # [B, KV, G, cap]
        if ns:  # a row's sink slots score against its sinks as computed
            sink_scores = q_sink.view(b, kvh, g, d) @ sink_keys.to(q.dtype).transpose(-1, -2)  # [B, KV, G, ns]
            is_sink = (torch.arange(ns, device=qkv.device)[None, :] < sinks[:, None])[:, None, None, :]
            scores = torch.cat([torch.where(is_sink, sink_scores, scores[..., :ns]), scores[..., ns:]], dim=-1)
        valid = torch.arange(cap, device=qkv.device)[None, :] < lengths[:, None]  # [B, cap]
        scores = scores.float().masked_fill(~valid[:, None, None, :], float("-inf"))
        out = scores.softmax(-1).to(values.dtype) @ values  # [B, KV, G, D]
        return out.reshape(b, h * d)


class NativeBackend(TorchBackend):
    """The step on sinkstream's CPU kernels (float32 models): packed int8/bf16 or float32 products and
    one kernel for rotary + cache write + attention over only the filled slots. The kernels are resolved
    once (``torch.ops`` lookups and module calls cost more than a small kernel), so a layer is a handful
    of direct kernel calls."""

    name = "native"

    def __init__(self, *args):
        super().__init__(*args)
        ops = native.ops()
        self._linear, self._rms = ops.packed_linear.default, ops.rms_norm.default
        self._silu, self._attend = ops.silu_mul.default, ops.attend.default

    def linear(self, lin):
        """The kernel call for ``lin`` (a packed or a plain dense product); other layouts keep their module."""
        if isinstance(lin, PackedLinear) and lin.packed:
            op, w, scale, bias = self._linear, lin.weight, lin.scale, lin.bias
            return lambda x, acc=None: op(x, w, scale, bias, acc)
        if isinstance(lin, DenseLinear) and lin.bias is None:
            w = lin.weight_t
            return lambda x, acc=None: x @ w if acc is None else acc.addmm_(x, w)
        return lin

    def frames(self, x, cos, sin):
        return x.float().contiguous(), cos.float().contiguous(), sin.float().contiguous()

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._rms(x, w, self.eps)

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        return self._silu(gu)

    def attend(self, qkv, kv, slots, lengths, cos, sin, layer: _Layer, sinks=None) -> torch.Tensor:
        return self._attend(qkv, *kv, slots, lengths, cos, sin, self.heads, layer.q_norm, layer.k_norm, self.eps,
                            self.scaling, sinks)  # fmt: skip


class FusedDecoder:
    """The one-token step of one model (build it once: ``for_model``), on one backend."""

    _built: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    @classmethod
    def for_model(cls, model, backend: str = "auto") -> FusedDecoder:
        """The model's decoder (built on first use; its linear layers are fused in place then)."""
        per_model = cls._built.setdefault(model, {})
        key = cls._backend(model, backend)
        if key not in per_model:
            per_model[key] = cls(model, key)
        return per_model[key]

    @staticmethod
    def _backend(model, backend: str) -> str:
        if backend not in BACKENDS:
            raise ValueError(f"unknown fused backend '{backend}'; choose one of {', '.join(BACKENDS)}")
        p = next(model.parameters())
        can_native = p.device.type == "cpu" and p.dtype == torch.float32 and native.available()
        if backend == "native" and not can_native:
            raise ValueError(
                "the native backend needs a float32 model on the CPU and sinkstream's kernels "
                f"({native.unavailable_reason() or 'available'})"
            )
        return "native" if backend == "native" or (backend == "auto" and can_native) else "torch"

    def __init__(self, model, backend: str = "auto"):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(reason)
        cfg = model.config
        self.model, self.backend = model, self._backend(model, backend)
        inner = model.model
        first = inner.layers[0].self_attn
        self.kv_heads, self.head_dim = cfg.num_key_value_heads, first.head_dim
        shape = (cfg.num_attention_heads, self.kv_heads, self.head_dim, first.scaling, cfg.rms_norm_eps)
        self.ops = NativeBackend(*shape) if self.backend == "native" else TorchBackend(*shape)
        self.layers = [self._layer(block) for block in inner.layers]
        self.final_norm = inner.norm.weight.detach()
        self.embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
        self.lm_head = head if isinstance(head, PackedLinear) else DenseLinear(head.weight.detach().t(), None)
        self.rotary = inner.rotary_emb
        self._run = self._forward  # or its compiled form (``compile``)

    def _layer(self, block) -> _Layer:
        attn, mlp, lin = block.self_attn, block.mlp, self.ops.linear
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return _Layer(
            block.input_layernorm.weight.detach(),
            block.post_attention_layernorm.weight.detach(),
            lin(_fuse(attn, ["q_proj", "k_proj", "v_proj"])),
            lin(_single(attn, "o_proj")),
            lin(_fuse(mlp, ["gate_proj", "up_proj"])),
            lin(_single(mlp, "down_proj")),
            None if qn is None else qn.weight.detach(),
            None if kn is None else kn.weight.detach(),
        )

    # -- the step ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, cache: SinkCache, ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``ids`` [B]) through ``cache``; the next logits [B, V] (float32).
        The cache must be rebased by the caller when ``cache.rebase_due(1)`` (the engine does)."""
        b = ids.shape[0]
        device = ids.device
        if cache.batch_size == 0:
            cache.init_rows(b, self.kv_heads, self.head_dim, self.final_norm.dtype, device)
        if cache.batch_size != b:
            raise ValueError(f"the cache holds {cache.batch_size} rows, the step got {b} tokens")
        plan = cache.advance_decode()
        positions = torch.tensor([plan.positions, plan.sink_positions], device=device).t()  # [B, 2]
        slots = torch.tensor(plan.slots, device=device)
        lengths = torch.tensor(plan.lengths, device=device)
        sinks = torch.tensor(plan.sinks, device=device)  # each row's pin
        return self._run(ids, positions, slots, lengths, cache.decode_buffers(), sinks)

    def compile(self, **options) -> None:
        """Capture the step's tensor work with ``torch.compile(**options)`` (on CUDA,
        ``mode="reduce-overhead"`` records it as a CUDA graph). Every shape is fixed by the batch size and
        the cache's capacity; a new batch size compiles again. The torch backend only."""
        if self.backend != "torch":
            raise ValueError("compile() is for the torch backend (the native one is compiled C++ already)")
        compiled = torch.compile(self._forward, **options)

        def run(ids, positions, slots, lengths, buffers, sinks):
            for t in (t for layer in buffers for t in layer):
                torch._dynamo.mark_static_address(t)  # written in place: CUDA graphs must not copy them
            return compiled(ids, positions, slots, lengths, buffers, sinks)

        self._run = run

    def _forward(self, ids, positions, slots, lengths, buffers, sinks) -> torch.Tensor:
        """The step's tensor work: ids [B], positions [B, 2], slots [B], lengths [B], per-layer buffers,
        sinks [B] (each row's pin)."""
        ops = self.ops
        x = self.embed(ids)  # [B, D]
        cos, sin = self.rotary(x, positions)  # [B, 2, rot]: the new token's frame, then the sinks'
        x, cos, sin = ops.frames(x.to(self.final_norm.dtype), cos, sin)
        for layer, kv in zip(self.layers, buffers):
            att = ops.attend(layer.qkv(ops.rms_norm(x, layer.input_norm)), kv, slots, lengths, cos, sin, layer, sinks)
            layer.o(att, acc=x)  # x += o(att)
            layer.down(ops.silu_mul(layer.gate_up(ops.rms_norm(x, layer.post_norm))), acc=x)
        return self.lm_head(ops.rms_norm(x, self.final_norm)).float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate_half RoPE of x [B, heads, D] with cos/sin [B, 1, rot] (rot <= D: partial rotary)."""
    rot = cos.shape[-1]
    r, rest = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-r[..., half:], r[..., :half]], dim=-1)
    return torch.cat([r * cos + rotated * sin, rest], dim=-1)


DECODE_MODES = ("auto", "fused", "transformers")


def select_decoder(model, decode: str = "auto") -> FusedDecoder | None:
    """The fused decoder one-token steps use: ``auto`` wherever it applies, ``fused`` or an error saying
    why not, ``transformers`` never (the model's own forward)."""
    if decode not in DECODE_MODES:
        raise ValueError(f"unknown decode '{decode}'; choose one of {', '.join(DECODE_MODES)}")
    if decode == "transformers":
        return None
    reason = unsupported_reason(model)
    if reason:
        if decode == "fused":
            raise ValueError(f"--decode fused: {reason}")
        return None
    return FusedDecoder.for_model(model)
