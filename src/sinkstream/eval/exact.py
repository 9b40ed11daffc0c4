"""Exact chunked streaming: the logits token-by-token streaming gives, computed a chunk at a time.

Token ``j`` of a stream through ``n_sink`` sinks + a ``window`` attends to the sinks (the first
``n_sink`` tokens) and to the tokens ``max(n_sink, j - window + 1) .. j``. Inside that window the
in-cache distances equal the text distances, so one banded causal mask over [the previous
``window - 1`` tokens' keys ; the chunk] gives the window part with keys at their text positions.
The sinks are a separate score block: each query is rotated to its in-cache position
``min(j, n_sink + window - 1)`` and scored against the sink keys at 0..n_sink-1; both blocks share
one softmax. Every token's hidden states (hence every deeper layer's keys and values) are then
those of the token-by-token run, and a chunk costs one forward instead of ``chunk`` decode steps.

This runs through transformers' attention interface (a registered attention function, set on the
model for the duration of the evaluation), with a cache whose layers return the rolling window.
Families whose attention does not go through the interface (MPT, BLOOM: ALiBi) are not handled here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface

from ..cache.exact import ExactLayer, ExactStream
from ..positions import ALIBI_FAMILIES

ATTN_NAME = "sinkstream_exact_chunks"


def _band(st: ExactStream, layer: ExactLayer, c: int, n_keys: int, device) -> torch.Tensor:
    """Additive mask [c, n_keys] of the window block (shared by every layer with this window in a forward)."""
    key = (st.seen, layer.first, layer.window, layer.n_sink, c, n_keys, device)
    mask = st.masks.get(key)
    if mask is None:
        j = torch.arange(c, device=device) + st.seen  # text index of every query
        i = torch.arange(n_keys, device=device) + layer.first  # text index of every key
        allowed = (i[None] <= j[:, None]) & (i[None] >= torch.clamp(j[:, None] - layer.window + 1, min=layer.n_sink))
        mask = torch.zeros(c, n_keys, device=device).masked_fill_(~allowed, float("-inf"))
        st.masks = {k: v for k, v in st.masks.items() if k[0] == st.seen} | {key: mask}
    return mask


def exact_attention(
    module, query, key, value, attention_mask, scaling, dropout=0.0, sink_stream=None, s_aux=None, **kwargs
):
    """Sinks block + banded window block, one softmax (see the module docstring).

    Grouped-query heads share their key/value head without copies (queries of a group are stacked), and
    the two blocks are merged with one running max and denominator instead of concatenating scores.
    """
    st: ExactStream = sink_stream
    layer: ExactLayer = st.layers[module.layer_idx]
    b, h, c, d = query.shape
    kvh = key.shape[1]
    dev = query.device
    if s_aux is None and st.zero_sink:  # softmax-off-by-one: a logit fixed at 0 with no value, every head
        s_aux = query.new_zeros(h)
    softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)

    def scores_for(q, k):  # [b, kvh, groups * c, n] float32, scaled and soft-capped
        s = torch.matmul((q * scaling).reshape(b, kvh, -1, d), k.transpose(-1, -2)).float()
        return s.div_(softcap).tanh_().mul_(softcap) if softcap else s

    scores = scores_for(query, key)
    scores.view(b, kvh, h // kvh, c, -1).add_(_band(st, layer, c, key.shape[-2], dev))
    peak = scores.amax(-1, keepdim=True)
    extra = []  # (scores, values or None) of the sink block and gpt-oss' learned sink logit
    if layer.n_sink:
        j = torch.arange(c) + st.seen
        target = j if st.positions == "text" else torch.clamp(j, max=layer.n_sink + layer.window - 1)
        cos, sin = layer.rope.cos_sin((target - (j - st.shift)).tolist(), dev)  # [c, 1, 1, rot]
        qr = layer.rope.rotate(query, cos[:, 0].transpose(0, 1), sin[:, 0].transpose(0, 1))
        s_scores = scores_for(qr, layer.sink_k)
        early = torch.arange(layer.sink_k.shape[-2])[None] > j[:, None]  # sinks not yet seen (first chunk)
        if early.any():
            s_scores.view(b, kvh, h // kvh, c, -1).masked_fill_(early.to(dev), float("-inf"))
        extra.append((s_scores, layer.sink_v))
    if s_aux is not None:  # gpt-oss: a learned per-head logit in every softmax, with no value
        aux = s_aux.float().reshape(1, kvh, h // kvh, 1, 1).expand(b, -1, -1, c, 1).reshape(b, kvh, -1, 1)
        extra.append((aux, None))
    for s, _ in extra:
        peak = torch.maximum(peak, s.amax(-1, keepdim=True))
    probs = scores.sub_(peak).exp_()
    denom = probs.sum(-1, keepdim=True)
    out = torch.matmul(probs.to(value.dtype), value).float()
    for s, v in extra:
        p = (s - peak).exp_()
        denom += p.sum(-1, keepdim=True)
        if v is not None:
            out += torch.matmul(p.to(v.dtype), v).float()
    out = (out / denom).to(query.dtype).reshape(b, h, c, d)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def exact_attention_on(model):
    """Use the exact chunked attention on ``model`` inside the block (its own choice is restored)."""
    AttentionInterface.register(ATTN_NAME, exact_attention)
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def supports_exact(model) -> bool:
    return bool(getattr(model, "_supports_attention_backend", False)) and model.config.model_type not in ALIBI_FAMILIES


@torch.no_grad()
def exact_stream_logits(
    model, ids: torch.Tensor, n_sink: int, window: int, chunk: int = 256, positions: str = "cache"
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, logits [c, V])`` for consecutive chunks of ``ids`` [N]: each row equals the
    logits token-by-token streaming through ``SinkCache(n_sink, window)`` gives at that token."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    ids = ids.reshape(-1)
    device = next(model.parameters()).device
    stream = ExactStream(model.config, n_sink, window, positions)
    with exact_attention_on(model):
        for s in range(0, ids.shape[0], chunk):
            x = ids[s : s + chunk].to(device)[None]
            pos = stream.next_positions(x.shape[1], device)
            out = model(input_ids=x, position_ids=pos, past_key_values=stream, use_cache=True, sink_stream=stream)
            stream.seen += x.shape[1]
            yield s, out.logits[0]
