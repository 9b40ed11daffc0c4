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
        layers = [ExactLayer(0, config.sliding_window, ropes[k]) if k == "sliding" else ExactLayer(n_sink, window, ropes[k])
                  for k in kinds]
        super().__init__(layers=layers)
        self.n_sink, self.window, self.positions = n_sink, window, positions
        self.seen = 0  # text index of the next chunk's first token
        self.shift = 0  # frame position = text index - shift

    def next_positions(self, q: int, device) -> torch.Tensor:
        """Frame positions of the next ``q`` tokens; re-centres the frame when it has run far."""
        if self.positions == "cache" and self.seen - self.shift > 2 * max(layer.window for layer in self.layers) + q:
            amount = self.seen - self.shift - self.n_sink - max(layer.window for layer in self.layers)
            for layer in self.layers:
                layer.shift_frame(amount)
            self.shift += amount
        return (torch.arange(q, device=device) + self.seen - self.shift)[None]


def exact_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, sink_stream=None,
                    s_aux=None, **kwargs):
    """Sinks block + banded window block, one softmax (see the module docstring)."""
    st: ExactStream = sink_stream
    layer: ExactLayer = st.layers[module.layer_idx]
    c = query.shape[-2]
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    dev = query.device
    j = torch.arange(c, device=dev) + st.seen  # text index of every query
    i = torch.arange(k.shape[-2], device=dev) + layer.first  # text index of every key
    allowed = (i[None] <= j[:, None]) & (i[None] >= torch.clamp(j[:, None] - layer.window + 1, min=layer.n_sink))
    scores = torch.matmul(query, k.transpose(-1, -2)) * scaling
    softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    if layer.n_sink:
        frame = j - st.shift
        target = j if st.positions == "text" else torch.clamp(j, max=layer.n_sink + layer.window - 1)
        cos, sin = layer.rope.cos_sin((target - frame).tolist(), dev)  # [c, 1, 1, rot]
        qr = layer.rope.rotate(query, cos[:, 0].transpose(0, 1), sin[:, 0].transpose(0, 1))
        ks, vs = layer.sink_k, layer.sink_v
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)
        s_scores = torch.matmul(qr, ks.transpose(-1, -2)) * scaling
        if softcap:
            s_scores = torch.tanh(s_scores / softcap) * softcap
        s_allowed = torch.arange(ks.shape[-2], device=dev)[None] <= j[:, None]
        scores = torch.cat([s_scores.masked_fill(~s_allowed, float("-inf")), scores], dim=-1)
        v = torch.cat([vs, v], dim=-2)
    if s_aux is not None:  # gpt-oss: a learned per-head sink logit in every softmax
        extra = s_aux.reshape(1, -1, 1, 1).expand(query.shape[0], -1, c, 1).to(scores.dtype)
        scores = torch.cat([scores, extra], dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    if s_aux is not None:
        probs = probs[..., :-1]
    out = torch.matmul(probs, v)
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
def exact_stream_logits(model, ids: torch.Tensor, n_sink: int, window: int, chunk: int = 256,
                        positions: str = "cache") -> Iterator[tuple[int, torch.Tensor]]:
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
