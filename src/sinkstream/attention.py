"""``attn_implementation="sinkstream"``: SDPA, with plain matmuls for one-query decode steps.

A decode step has one query per row and head. PyTorch's CPU SDPA runs it through its flash kernel,
whose set-up per call costs more than the arithmetic at one query. Here one query is two small
matmuls and a softmax instead. The grouped-query heads of a key/value head are stacked as the rows
of one matmul, so keys and values are never copied per query head. Everything else goes to
transformers' own SDPA function unchanged: prefill chunks, learned per-head sinks (gpt-oss), soft
capping, dropout. Masks are built as for SDPA. Models with learned per-head sinks (gpt-oss) are
eager-only in transformers and are refused.

``register()`` adds the name to transformers' attention and mask registries (``load_model`` does it).

``attn_implementation="sinkstream_zero"``: softmax-off-by-one ("zero sink", paper sec. 3.3), for models
trained with ``sinkstream train --sink-mode zero``: every attention softmax gets an extra logit fixed at 0
whose value is 0, i.e. ``exp(s_i) / (1 + sum_j exp(s_j))``. Computed as SDPA over the keys plus one zero
key with a zero value (``q . 0 = 0``), so it runs at SDPA's speed; ``sinkstream_zero_eager`` is the same
sum written out, returning the attention weights (``sinkstream attn`` uses it). ``load_model`` picks it
for a model whose config says ``sinkstream_sink_mode: "zero"``.
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .cpu_matmul import default_matmul

ATTN_NAME = "sinkstream"


def stream_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """[B, H, q, D] query; one-query steps computed directly, the rest by SDPA."""
    if kwargs.get("s_aux") is not None:
        raise ValueError("learned per-head sinks (gpt-oss) need attn_implementation='eager'")
    b, h, q, d = query.shape
    softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    if q != 1 or softcap or (dropout and module.training):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    kvh, n = key.shape[1], key.shape[-2]
    scale = scaling if scaling is not None else d**-0.5
    with default_matmul():  # not oneDNN: it would cache a primitive per key length (RSS grew 1.3 MB a step)
        scores = torch.matmul((query * scale).reshape(b, kvh, h // kvh, d), key.transpose(-1, -2))  # [B, KVH, G, n]
        if attention_mask is not None:
            mask = attention_mask[:, :, -1, -n:]  # [B, 1 or H, n]
            mask = mask.reshape(b, kvh, h // kvh, n) if mask.shape[1] == h else mask[:, :, None, :]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
        out = torch.matmul(probs, value)  # [B, KVH, G, D]
    return out.reshape(b, 1, h, d), None


ZERO_NAME, ZERO_EAGER = "sinkstream_zero", "sinkstream_zero_eager"


def _zero_sink_inputs(query, key, value, attention_mask):
    """Keys/values with one zero key/value appended (GQA expanded), and the mask widened to match."""
    b, h, q, d = query.shape
    kvh, n = key.shape[1], key.shape[-2]
    if kvh != h:
        key, value = key.repeat_interleave(h // kvh, 1), value.repeat_interleave(h // kvh, 1)
    key = torch.cat([key, key.new_zeros(b, h, 1, d)], dim=2)
    value = torch.cat([value, value.new_zeros(b, h, 1, value.shape[-1])], dim=2)
    if attention_mask is None:  # plain causal, queries at the end of the keys
        attention_mask = (
            torch.arange(n, device=query.device)[None] <= torch.arange(q, device=query.device)[:, None] + n - q
        )
    mask = attention_mask[..., -n:] if attention_mask.shape[-1] > n else attention_mask
    pad = torch.ones if mask.dtype == torch.bool else torch.zeros
    mask = torch.cat([mask, pad(*mask.shape[:-1], 1, dtype=mask.dtype, device=mask.device)], dim=-1)
    return key, value, mask


def zero_sink_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Softmax-off-by-one attention, [B, H, q, D] in, [B, q, H, D] out."""
    if kwargs.get("s_aux") is not None:
        raise ValueError("a zero-sink model has no learned per-head sinks")
    key, value, mask = _zero_sink_inputs(query, key, value, attention_mask)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def zero_sink_attention_eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The same, written out: also returns the weights over the real keys [B, H, q, n] (rows sum to < 1)."""
    n = key.shape[-2]
    key, value, mask = _zero_sink_inputs(query, key, value, attention_mask)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), probs[..., :n]


def register_zero() -> str:
    """Make ``sinkstream_zero`` and ``sinkstream_zero_eager`` available; returns the first name."""
    mask = functools.partial(sdpa_mask, allow_is_causal_skip=False)  # the extra key rules out SDPA's is_causal
    for name, fn in ((ZERO_NAME, zero_sink_attention), (ZERO_EAGER, zero_sink_attention_eager)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, mask)
    return ZERO_NAME


def sink_mode(config) -> str:
    """How a model was pre-trained: "vanilla", "learnable" or "zero" (``sinkstream train`` records it)."""
    return getattr(config, "sinkstream_sink_mode", None) or "vanilla"


def register() -> str:
    """Make ``attn_implementation="sinkstream"`` available to transformers models; returns the name."""
    AttentionInterface.register(ATTN_NAME, stream_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


def default_attention(model) -> str | None:
    """The implementation ``load_model`` picks when none is asked for: ours where the model takes one."""
    if sink_mode(model.config) == "zero":
        return register_zero()
    if getattr(model, "_supports_attention_backend", False) and model.config._attn_implementation == "sdpa":
        return register()
    return None
