"""The layer classes, one per layout: ``RingLayer`` (RoPE sinks + a ring window), ``SlidingLayer``
(the sliding layers of hybrid models) and ``AlibiLayer`` (a contiguous block for ALiBi models)."""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ..positions import Rope
from .counters import ForwardPlan, LayoutCounters, Row


class SinkLayer(CacheLayerMixin):
    """One attention layer's sinks + window (its counters live in the shared ``LayoutCounters``).
    What differs by layout — where a chunk's window goes, how sinks are placed, the order of the
    cached tokens — is each subclass's: ``RingLayer``, ``SlidingLayer``, ``AlibiLayer``."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, counters: LayoutCounters, kv_dtype: torch.dtype | None = None):
        super().__init__()
        self.counters, self.kv_dtype = counters, kv_dtype
        self.step = 0

    @staticmethod
    def for_layout(counters: LayoutCounters, kv_dtype: torch.dtype | None = None) -> SinkLayer:
        layer = {"rope": RingLayer, "sliding": SlidingLayer, "alibi": AlibiLayer}[counters.kind]
        return layer(counters, kv_dtype)

    @property
    def n_sink(self) -> int:
        return self.counters.n_sink

    @property
    def window(self) -> int:
        return self.counters.window

    @property
    def rope(self) -> Rope | None:
        return self.counters.rope

    # -- transformers layer API ---------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = self.kv_dtype or key_states.dtype, key_states.device
        kw = {"dtype": self.dtype}
        self.keys = key_states.new_zeros((b, h, self.counters.cap, d), **kw)  # [B, Hkv, cap, D]
        self.values = value_states.new_zeros((b, h, self.counters.cap, value_states.shape[-1]), **kw)
        self.sink_keys = key_states.new_zeros((b, h, self.n_sink, d), **kw)  # as computed, never re-rotated
        self.sink_values = value_states.new_zeros((b, h, self.n_sink, value_states.shape[-1]), **kw)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.counters.plan_for(self, key_states.shape[0], key_states.shape[-2])
        self._before_write(plan)
        if plan.q > 1:
            out = self._write_chunk(plan, key_states, value_states)
            if out is not None:
                return out[0].to(key_states.dtype), out[1].to(value_states.dtype)
        else:
            self._write_one(plan, key_states, value_states)
        if plan.moved:
            self._place_sinks(plan)
        k, v = self.keys[:, :, plan.kv_lo : plan.kv_hi], self.values[:, :, plan.kv_lo : plan.kv_hi]
        if k.dtype != key_states.dtype:  # stored in kv_dtype: attention computes in the model's dtype
            k, v = k.to(key_states.dtype), v.to(value_states.dtype)
        return k, v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.counters.mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.counters.seq_length()

    def get_max_length(self) -> int:
        return self.counters.cap

    def reset(self) -> None:
        super().__init__()
        self.counters.reset()
        self.step = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SinkCache cannot be cropped: evicted tokens are gone")

    # -- writes -------------------------------------------------------------------------------
    def _write_one(self, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        if plan.slot is not None:
            self.keys[:, :, plan.slot] = k[:, :, 0]
            self.values[:, :, plan.slot] = v[:, :, 0]
        else:
            rows = torch.arange(k.shape[0], device=k.device)
            self.keys[rows, :, plan.slots] = k[:, :, 0]
            self.values[rows, :, plan.slots] = v[:, :, 0]
        for b in plan.sink_rows:
            s = plan.slot if plan.slot is not None else int(plan.slots[b])
            self.sink_keys[b, :, s] = k[b, :, 0]
            self.sink_values[b, :, s] = v[b, :, 0]

    def _before_write(self, plan: ForwardPlan) -> None:
        """What a layout must do to its buffers before this forward's keys are written."""

    def _write_chunk(self, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor):
        """Append a chunk (all rows alike). Returns the keys/values to attend to when they are not a view."""
        old, to_sinks = plan.old, plan.to_sinks
        if to_sinks:
            for t, new in ((self.keys, k), (self.values, v), (self.sink_keys, k), (self.sink_values, v)):
                t[:, :, old.n_sinks : old.n_sinks + to_sinks] = new[:, :, :to_sinks]
        k, v = k[:, :, to_sinks:], v[:, :, to_sinks:]
        return self._append_window(plan, k, v) if k.shape[-2] else None

    def _append_window(self, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor):
        raise NotImplementedError

    def _place_sinks(self, plan: ForwardPlan) -> None:
        raise NotImplementedError

    # -- batch rows ---------------------------------------------------------------------------
    def _tensors(self) -> list[str]:
        return ["keys", "values", "sink_keys", "sink_values"]

    def select_rows(self, idx: torch.Tensor) -> None:
        if self.is_initialized:
            for name in self._tensors():
                setattr(self, name, getattr(self, name)[idx.to(self.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SinkCache does not support beam search")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("use SinkCache.select_rows")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("SinkCache does not support num_return_sequences > 1")

    def rotate_rows(self, amounts: list[int]) -> None:
        """Re-rotate each row's keys by ``-amounts[b]`` (a rebase); layouts without positions ignore it."""

    def contents(self, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions) of one row's cached tokens in cache order: sinks, then the window
        oldest first. Keys are as attention sees them (sinks re-positioned). Positions are rotary
        positions (RoPE) or key indices (ALiBi)."""
        raise NotImplementedError


class RingLayer(SinkLayer):
    """Full-attention RoPE layers: the sinks in slots [0, n_sink), re-rotated to sit right before the
    oldest window key; the window a ring buffer after them, keys never re-rotated on a step."""

    @property
    def window_base(self) -> int:  # the ring's first slot
        return self.n_sink

    def _in_order(self, t: torch.Tensor, old: Row) -> torch.Tensor:
        """The window (all rows alike), oldest first."""
        win = t[:, :, self.window_base : self.window_base + self.window]
        if old.head:
            win = torch.cat([win[:, :, old.head :], win[:, :, : old.head]], dim=-2)
        return win[:, :, : old.n_window]

    def _joined(self, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept old window keys/values followed by the chunk's."""
        old, kept = plan.old, plan.kept
        new_k = torch.cat([self._in_order(self.keys, old)[:, :, old.n_window - kept :], k], dim=-2)
        new_v = torch.cat([self._in_order(self.values, old)[:, :, old.n_window - kept :], v], dim=-2)
        return new_k, new_v

    def _append_window(self, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor):
        new_k, new_v = self._joined(plan, k, v)  # laid out in order, so the chunk's causal mask holds
        n = plan.kept + k.shape[-2]
        self.keys[:, :, self.n_sink : self.n_sink + n] = new_k
        self.values[:, :, self.n_sink : self.n_sink + n] = new_v
        return None

    def _place_sinks(self, plan: ForwardPlan) -> None:
        """Rotate the sinks of the moved rows, from their stored originals, to right before their oldest
        window key."""
        if self.rope is None:
            raise ValueError(
                "SinkCache needs the model config to re-position sinks: SinkCache(..., config=model.config)"
            )
        if plan.rot_all:
            self.keys[:, :, : self.n_sink] = self.rope.rotate(self.sink_keys, plan.cos, plan.sin)
        else:
            rows = plan.rot_rows
            self.keys[rows, :, : self.n_sink] = self.rope.rotate(self.sink_keys[rows], plan.cos, plan.sin)

    def rotate_rows(self, amounts: list[int]) -> None:
        """Re-rotate each row's window by ``-amounts[b]`` and re-place its sinks."""
        if not self.is_initialized:
            return
        rows = [b for b, a in enumerate(amounts) if a]
        cos, sin = self.rope.cos_sin([-amounts[b] for b in rows], self.device)
        base, idx = self.window_base, torch.tensor(rows, device=self.device)
        win = self.keys[idx, :, base : base + self.window]
        self.keys[idx, :, base : base + self.window] = self.rope.rotate(win, cos, sin)
        if self.n_sink:
            deltas = [self.counters.sink_target(self.counters.rows[b]) or 0 for b in rows]
            cos, sin = self.rope.cos_sin(deltas, self.device)
            self.keys[idx, :, : self.n_sink] = self.rope.rotate(self.sink_keys[idx], cos, sin)

    def contents(self, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r, t = self.counters.rows[row], self.counters
        order = [(r.head + i) % self.window + self.window_base for i in range(r.n_window)]
        idx = torch.tensor(list(range(r.n_sinks)) + order, dtype=torch.long, device=self.device)
        k, v = self.keys[row : row + 1, :, idx], self.values[row : row + 1, :, idx]  # copies
        target = t.sink_target(r)
        if r.n_sinks and r.sink_delta != target:  # sinks left as computed by a fused step
            k[:, :, : r.n_sinks] = self.rope.shift(self.sink_keys[row : row + 1, :, : r.n_sinks], target or 0)
        oldest = r.seen - r.n_window - r.shift
        first_sink = oldest - r.n_sinks if r.n_window else r.sink_pos
        pos = torch.cat([torch.arange(r.n_sinks) + first_sink, torch.arange(r.n_window) + oldest])
        return k, v, pos


class SlidingLayer(RingLayer):
    """The sliding-window layers of hybrid models (Gemma 3, gpt-oss): a ring of the model's own
    ``sliding_window`` keys and no sinks, since the model never attends further back anyway."""

    is_sliding = True

    @property
    def window_base(self) -> int:
        return 0

    def _append_window(self, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor):
        """The chunk attends to window - 1 old keys and itself; the last ``window`` are kept."""
        new_k, new_v = self._joined(plan, k, v)
        n = min(self.window, new_k.shape[-2])
        self.keys[:, :, :n] = new_k[:, :, -n:]
        self.values[:, :, :n] = new_v[:, :, -n:]
        return new_k, new_v


class AlibiLayer(SinkLayer):
    """ALiBi layers (MPT, BLOOM), whose bias is read off the key *index*: each row's sinks and window
    are kept contiguous and in order. Evicting the oldest window key moves the window's start by one
    slot and the sinks are copied right before it; at the end of the ``n_sink + 2 * window`` buffer
    the block moves back to the front (amortized O(1))."""

    def _before_write(self, plan: ForwardPlan) -> None:
        for b, src, n in plan.compact:  # the block reached the end of the buffer: move it to the front
            for t, sinks in ((self.keys, self.sink_keys), (self.values, self.sink_values)):
                t[b, :, self.n_sink : self.n_sink + n] = t[b, :, src : src + n].clone()
                t[b, :, : self.n_sink] = sinks[b]

    def _append_window(self, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor):
        r = self.counters.rows[0]
        end = r.start + r.n_window
        self.keys[:, :, end - k.shape[-2] : end] = k
        self.values[:, :, end - k.shape[-2] : end] = v
        return None

    def _place_sinks(self, plan: ForwardPlan) -> None:
        """Copy the moved rows' sinks right before their window's new start."""
        for b in plan.moved:
            lo = self.counters.span(self.counters.rows[b])[0]
            self.keys[b, :, lo : lo + self.n_sink] = self.sink_keys[b]
            self.values[b, :, lo : lo + self.n_sink] = self.sink_values[b]

    def contents(self, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo, hi = self.counters.span(self.counters.rows[row])
        return self.keys[row : row + 1, :, lo:hi], self.values[row : row + 1, :, lo:hi], torch.arange(hi - lo)
