"""SinkCache: attention sinks + a rolling window, as a transformers ``Cache``.

Layout of one layer (``cap = n_sink + window`` slots, preallocated once):

    slots [0, n_sink)          the sink keys, re-positioned just before the oldest window key
    slots [n_sink, cap)        the window, a ring buffer of the most recent keys

Positions. Every token gets its rotary position when the model computes its key; the cache
never re-rotates window keys on a decode step. The query and the window keep the distances they
have in the text (the window is contiguous), and only the ``n_sink`` sink keys are rotated so
that their distance to the query is the in-cache distance: they sit right before the oldest
window key. A decode step therefore writes one slot and rotates ``n_sink`` keys: O(1) per token.

Frames. ``get_seq_length()`` is the rotary position the next token takes: the number of tokens
seen minus ``shift``. ``shift`` stays 0 unless ``rebase()`` is called, which re-rotates the window
once so positions restart small (the engine does that every ~window tokens, so RoPE angles stay
bounded however long the stream runs). ``model.generate`` passes its own absolute positions: do
not call ``rebase()`` on a cache used by ``generate``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .positions import Rope, rope_for


class SinkLayer(CacheLayerMixin):
    """One attention layer's sinks + window."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, n_sink: int, window: int, rope: Rope | None):
        super().__init__()
        self.n_sink, self.window, self.rope = n_sink, window, rope
        self.cap = n_sink + window
        self.seen = 0  # tokens seen (unbounded)
        self.shift = 0  # rotary position = text index - shift
        self.n_sk = 0  # sinks stored
        self.n_win = 0  # window tokens stored
        self.head = 0  # ring slot (relative to the window area) of the oldest window token
        self.sink_keys: torch.Tensor | None = None  # sinks as inserted, at rotary positions sink_pos..
        self.sink_pos = 0
        self.sink_delta = 0  # shift currently applied to the sink slots

    # -- transformers layer API ---------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros((b, h, self.cap, d))  # [B, Hkv, cap, D]
        self.values = value_states.new_zeros((b, h, self.cap, value_states.shape[-1]))
        self.sink_keys = key_states.new_zeros((b, h, 0, d))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        take, w = self._split(q)
        if take:
            self.keys[:, :, self.n_sk : self.n_sk + take] = key_states[:, :, :take]
            self.values[:, :, self.n_sk : self.n_sk + take] = value_states[:, :, :take]
            self.sink_keys = torch.cat([self.sink_keys, key_states[:, :, :take]], dim=-2)
            if self.n_sk == 0:
                self.sink_pos = self.seen - self.shift
            self.n_sk += take
        if w == 1 and q == 1:
            self._ring_write(key_states, value_states)
        elif w:
            self._linear_write(key_states[:, :, take:], value_states[:, :, take:])
        self.seen += q
        self._place_sinks()
        n = self.n_sk + self.n_win
        return self.keys[:, :, :n], self.values[:, :, :n]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        take, w = self._split(query_length)
        kv_length = self.n_sk + take + min(self.n_win, self.window - w) + w
        kv_offset = self.get_seq_length() + query_length - kv_length
        return kv_length, kv_offset

    def get_seq_length(self) -> int:
        return self.seen - self.shift

    def get_max_length(self) -> int:
        return self.cap

    def reset(self) -> None:
        self.__init__(self.n_sink, self.window, self.rope)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            idx = beam_idx.to(self.device)
            self.keys, self.values = self.keys[idx], self.values[idx]
            self.sink_keys = self.sink_keys[idx]

    batch_select_indices = reorder_cache

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self.sink_keys = self.sink_keys.repeat_interleave(repeats, dim=0)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SinkCache cannot be cropped: evicted tokens are gone")

    # -- internals ------------------------------------------------------------------------------
    def _split(self, q: int) -> tuple[int, int]:
        """How many of ``q`` new tokens become sinks, and how many enter the window."""
        take = min(q, self.n_sink - self.n_sk)  # the stream's first tokens become the sinks
        if q - take > self.window:
            raise ValueError(
                f"SinkCache got a chunk of {q} tokens for a window of {self.window}: feed long inputs in "
                f"chunks of at most {self.window} tokens (sinkstream's engine does)"
            )
        return take, q - take

    def _ring_write(self, k, v) -> None:
        """Write one token into the window ring, evicting the oldest when full (no copy)."""
        if self.n_win < self.window:
            slot = (self.head + self.n_win) % self.window
            self.n_win += 1
        else:
            slot = self.head
            self.head = (self.head + 1) % self.window
        self.keys[:, :, self.n_sink + slot] = k[:, :, 0]
        self.values[:, :, self.n_sink + slot] = v[:, :, 0]

    def _window_in_order(self, t: torch.Tensor) -> torch.Tensor:
        win = t[:, :, self.n_sink : self.cap]
        if self.head == 0:
            return win[:, :, : self.n_win]
        return torch.cat([win[:, :, self.head :], win[:, :, : self.head]], dim=-2)[:, :, : self.n_win]

    def _linear_write(self, k, v) -> None:
        """Append a chunk: keep the most recent ``window - chunk`` tokens, lay the window out in order."""
        w = k.shape[-2]
        kept = min(self.n_win, self.window - w)
        old_k = self._window_in_order(self.keys)[:, :, self.n_win - kept :]
        old_v = self._window_in_order(self.values)[:, :, self.n_win - kept :]
        new_k, new_v = torch.cat([old_k, k], dim=-2), torch.cat([old_v, v], dim=-2)
        self.keys[:, :, self.n_sink : self.n_sink + kept + w] = new_k
        self.values[:, :, self.n_sink : self.n_sink + kept + w] = new_v
        self.head, self.n_win = 0, kept + w

    def _place_sinks(self) -> None:
        """Rotate the sinks so they sit right before the oldest window key (in-cache distances)."""
        if self.n_win == 0 or self.n_sk == 0:
            return
        oldest = self.seen - self.n_win - self.shift  # rotary position of the oldest window key
        delta = oldest - self.n_sk - self.sink_pos
        if delta == self.sink_delta:
            return
        if self.rope is None:
            raise ValueError("SinkCache needs the model config to re-position sinks: SinkCache(..., config=model.config)")
        self.keys[:, :, : self.n_sk] = self.rope.rotate(self.sink_keys, delta)
        self.sink_delta = delta

    def contents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, rotary positions) of the cached tokens in cache order: sinks, then the
        window oldest first. Keys are as attention sees them (sinks re-positioned)."""
        k = torch.cat([self.keys[:, :, : self.n_sk], self._window_in_order(self.keys)], dim=-2)
        v = torch.cat([self.values[:, :, : self.n_sk], self._window_in_order(self.values)], dim=-2)
        oldest = self.seen - self.n_win - self.shift
        pos = torch.cat([torch.arange(self.n_sk) + (oldest - self.n_sk if self.n_win else self.sink_pos),
                         torch.arange(self.n_win) + oldest])
        return k, v, pos

    def rebase(self) -> int:
        """Re-rotate the window so the oldest window key sits at position ``n_sink``; returns the shift."""
        if self.n_win == 0:
            return 0
        amount = (self.seen - self.n_win - self.shift) - self.n_sk
        if amount <= 0:
            return 0
        if self.rope is None:
            raise ValueError("SinkCache needs the model config to rebase positions")
        win = self.keys[:, :, self.n_sink : self.n_sink + self.n_win]
        win.copy_(self.rope.rotate(win, -amount))
        self.shift += amount
        self._place_sinks()
        return amount


class SinkCache(Cache):
    """Attention-sink streaming cache (StreamingLLM) for transformers 5.x models.

    Keeps the first ``n_sink`` tokens and the ``window`` most recent ones; every cached token is
    seen by attention at its position inside the cache. The newest token attends to at most
    ``n_sink + window`` keys, itself included. Use it as ``past_key_values`` in plain forward calls
    or in ``model.generate``. ``config`` (the model's config) is needed to re-position the sinks.

    Streaming does not extend the context: a token that left the window is gone.
    """

    def __init__(self, n_sink: int = 4, window: int = 1020, *, config=None):
        for name, value in (("n_sink", n_sink), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {n_sink}")
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        if config is None and n_sink > 0:
            raise ValueError(
                "SinkCache needs the model's config to re-position the sinks: "
                "SinkCache(n_sink, window, config=model.config)"
            )
        self.n_sink, self.window = n_sink, window
        rope = rope_for(config) if config is not None else None
        if config is not None:
            layers = [SinkLayer(n_sink, window, rope) for _ in range(config.num_hidden_layers)]
            super().__init__(layers=layers)
        else:
            super().__init__(layer_class_to_replicate=lambda: SinkLayer(n_sink, window, None))

    @classmethod
    def for_model(cls, model, n_sink: int = 4, window: int = 1020) -> "SinkCache":
        return cls(n_sink, window, config=model.config)

    @property
    def tokens_seen(self) -> int:
        """Tokens streamed through the cache so far (unbounded)."""
        return self.layers[0].seen if self.layers else 0

    @property
    def tokens_cached(self) -> int:
        """Tokens stored now (at most ``n_sink + window``)."""
        return self.layers[0].n_sk + self.layers[0].n_win if self.layers else 0

    def rebase(self) -> int:
        """Re-rotate all windows once so positions restart at ``n_sink``. Not for use under ``generate``."""
        shifts = {layer.rebase() for layer in self.layers}
        return max(shifts) if shifts else 0
