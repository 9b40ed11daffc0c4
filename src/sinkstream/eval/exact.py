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
from transformers.cache_utils import Cache, CacheLayerMixin

from ..positions import ALIBI_FAMILIES, Rope, layer_kinds, rope_for

ATTN_NAME = "sinkstream_exact_chunks"


class ExactLayer(CacheLayerMixin):
    """The rolling window of one layer: the last ``window - 1`` keys/values (text order, frame positions)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, n_sink: int, window: int, rope: Rope):
        super().__init__()
        self.n_sink, self.window, self.rope = n_sink, window, rope
        self.sink_k = self.sink_v = None  # the first n_sink tokens' keys at positions 0..n_sink-1
        self.first = 0  # text index of keys[0] of the current call
        self.kept_first = 0  # text index of the first kept token

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        if self.n_sink and (self.sink_k is None or self.sink_k.shape[-2] < self.n_sink):
            have = 0 if self.sink_k is None else self.sink_k.shape[-2]
            need = max(0, min(self.n_sink - have, self.n_sink - self.kept_first - self.keys.shape[-2]))
            new_k, new_v = key_states[:, :, :need], value_states[:, :, :need]
            self.sink_k = new_k.clone() if self.sink_k is None else torch.cat([self.sink_k, new_k], dim=-2)
            self.sink_v = new_v.clone() if self.sink_v is None else torch.cat([self.sink_v, new_v], dim=-2)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.first = self.kept_first
        keep = min(self.window - 1, keys.shape[-2])
        self.keys, self.values = keys[:, :, keys.shape[-2] - keep :], values[:, :, values.shape[-2] - keep :]
        self.kept_first = self.first + keys.shape[-2] - keep
        return keys, values

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1

    def shift_frame(self, amount: int) -> None:
        if self.is_initialized and self.keys.shape[-2]:
            self.keys = self.rope.shift(self.keys, -amount)


class ExactStream(Cache):
    """State of one exact chunked stream (pass it as ``past_key_values`` and as ``sink_stream``)."""

    def __init__(self, config, n_sink: int, window: int, positions: str = "cache"):
        kinds = layer_kinds(config, n_sink + window)
        if "alibi" in kinds:
            raise ValueError("exact chunked streaming needs RoPE attention (ALiBi families stream token by token)")
        ropes = {k: rope_for(config, "sliding_attention" if k == "sliding" else "full_attention") for k in set(kinds)}
        layers = [
            ExactLayer(0, config.sliding_window, ropes[k]) if k == "sliding" else ExactLayer(n_sink, window, ropes[k])
            for k in kinds
        ]
        super().__init__(layers=layers)
        self.n_sink, self.window, self.positions = n_sink, window, positions
        self.seen = 0  # text index of the next chunk's first token
        self.shift = 0  # frame position = text index - shift
        self.masks: dict = {}  # window-block masks of the current forward (see ``_band``)
        self.zero_sink = getattr(config, "sinkstream_sink_mode", None) == "zero"  # softmax-off-by-one model

    def next_positions(self, q: int, device) -> torch.Tensor:
        """Frame positions of the next ``q`` tokens; re-centres the frame when it has run far."""
        if self.positions == "cache" and self.seen - self.shift > 2 * max(layer.window for layer in self.layers) + q:
            amount = self.seen - self.shift - self.n_sink - max(layer.window for layer in self.layers)
            for layer in self.layers:
                layer.shift_frame(amount)
            self.shift += amount
        return (torch.arange(q, device=device) + self.seen - self.shift)[None]


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
