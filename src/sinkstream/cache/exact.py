"""The cache of exact chunked streaming (``eval.exact``): each layer returns the rolling window's keys
at their text positions, and the stream keeps the sinks apart and re-centres the rotary frame."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..positions import Rope, layer_kinds, rope_for


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
