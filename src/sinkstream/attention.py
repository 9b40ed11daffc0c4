"""``attn_implementation="sinkstream"``: SDPA, with plain matmuls for one-query decode steps.

A decode step has one query per row and head. PyTorch's CPU SDPA runs it through its flash kernel,
whose set-up per call costs more than the arithmetic at one query. Here one query is two small
matmuls and a softmax instead. The grouped-query heads of a key/value head are stacked as the rows
of one matmul, so keys and values are never copied per query head. Everything else goes to
transformers' own SDPA function unchanged: prefill chunks, learned per-head sinks (gpt-oss), soft
capping, dropout. Masks are built as for SDPA. Models with learned per-head sinks (gpt-oss) are
eager-only in transformers and are refused.

``register()`` adds the name to transformers' attention and mask registries (``load_model`` does it).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTN_NAME = "sinkstream"


def stream_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     **kwargs):
    """[B, H, q, D] query; one-query steps computed directly, the rest by SDPA."""
    if kwargs.get("s_aux") is not None:
        raise ValueError("learned per-head sinks (gpt-oss) need attn_implementation='eager'")
    b, h, q, d = query.shape
    softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    if q != 1 or softcap or (dropout and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    kvh, n = key.shape[1], key.shape[-2]
    scale = scaling if scaling is not None else d**-0.5
    scores = torch.matmul((query * scale).reshape(b, kvh, h // kvh, d), key.transpose(-1, -2))  # [B, KVH, G, n]
    if attention_mask is not None:
        mask = attention_mask[:, :, -1, -n:]  # [B, 1 or H, n]
        mask = mask.reshape(b, kvh, h // kvh, n) if mask.shape[1] == h else mask[:, :, None, :]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, KVH, G, D]
    return out.reshape(b, 1, h, d), None


def register() -> str:
    """Make ``attn_implementation="sinkstream"`` available to transformers models; returns the name."""
    AttentionInterface.register(ATTN_NAME, stream_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


def default_attention(model) -> str | None:
    """The implementation ``load_model`` picks when none is asked for: ours where the model takes one."""
    if getattr(model, "_supports_attention_backend", False) and model.config._attn_implementation == "sdpa":
        return register()
    return None
