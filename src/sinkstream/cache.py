"""SinkCache: attention sinks + a rolling window, as a transformers ``Cache``.

Three layer layouts, one per kind of attention layer (all preallocated once, per batch row):

``rope``     full-attention RoPE layers (``n_sink + window`` slots)
             slots [0, n_sink): the sink keys, re-positioned just before the oldest window key;
             slots [n_sink, cap): the window, a ring buffer of the most recent keys.
``sliding``  the sliding-window layers of hybrid models (Gemma3, gpt-oss): a ring of the model's own
             ``sliding_window`` keys, no sinks (the model never attends further back anyway).
``alibi``    ALiBi layers (MPT, BLOOM), whose bias is read off the key *index*: the cache is kept
             contiguous (``n_sink + 2 * window`` slots). Evicting the oldest window key moves the
             window's start by one and the ``n_sink`` sinks are copied right before it; every
             ``window`` tokens the block is compacted back to the front (amortized O(1)).

Positions (RoPE). Every token gets its rotary position when the model computes its key; window keys
are never re-rotated on a decode step. The query and the window keep the distances they have in the
text (the window is contiguous), and only the ``n_sink`` sink keys are rotated so that their distance
to the query is the in-cache distance: they sit right before the oldest window key. A decode step
writes one slot and rotates ``n_sink`` keys: O(1) per token.

Frames. ``get_seq_length()`` is the rotary position the next token takes: tokens seen minus
``shift``. ``shift`` stays 0 unless ``rebase()`` is called, which re-rotates the windows once so
positions restart small (the engine does that every ~window tokens, so RoPE angles stay bounded
however long the stream runs). ``model.generate`` passes its own absolute positions: do not call
``rebase()`` on a cache used by ``generate``.

Batches. Every row of a batch has its own counters: rows may hold streams of different lengths
(``SinkCache.stack`` joins single-stream caches, ``select_rows`` drops rows). A forward over rows of
different lengths must feed one token per row and pass ``cache.position_ids()`` and
``cache.attention_mask()``; the engine does.

The bookkeeping of a layer kind (``LayoutCounters``) is advanced once per forward, by the first layer of that
kind; the other layers reuse its plan, so per-layer Python work is a few tensor writes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .positions import Rope, layer_kinds, rope_for


@dataclass
class Row:
    """Counters of one stream (batch row) in one layer kind."""

    seen: int = 0  # tokens seen (unbounded)
    shift: int = 0  # rotary position = text index - shift
    n_sinks: int = 0  # sinks stored
    n_window: int = 0  # window tokens stored
    head: int = 0  # ring layouts: ring slot of the oldest window token
    start: int = 0  # alibi layout: slot of the oldest window token
    sink_pos: int = 0  # rotary position the first sink was computed at
    sink_delta: int | None = 0  # rotation currently applied to the sink slots


@dataclass
class DecodeStep:
    """One token per row, for a decode step that writes and attends the keys itself (``fused``).

    For every row: the rotary ``position`` of its new token; ``sink_position``, where the query must be
    rotated to see the sinks *as they were computed* at their in-cache distance (RoPE scores depend on
    differences only, so this equals re-rotating the sinks); the ``slot`` the new key goes to (a slot
    below ``n_sink`` makes it a sink); and ``length``: the row's tokens are slots [0, length) after it."""

    positions: list[int]
    sink_positions: list[int]
    slots: list[int]
    lengths: list[int]


@dataclass
class ForwardPlan:
    """What every layer of a kind does in one forward (computed once, by the first layer)."""

    q: int
    kv_lo: int = 0  # the keys returned are slots [kv_lo, kv_hi)
    kv_hi: int = 0
    # decode (one token per row)
    slot: int | None = None  # the slot of every row, when they agree
    slots: torch.Tensor | None = None  # [B] otherwise
    sink_rows: list[int] = field(default_factory=list)  # rows whose token becomes a sink
    moved: list[int] = field(default_factory=list)  # rope: rows whose sinks move; alibi: rows whose sinks are re-copied
    rot_all: bool = False  # every row moved (then no index tensor is needed)
    rot_rows: torch.Tensor | None = None  # ``moved`` as an index tensor, when only some rows moved
    cos: torch.Tensor | None = None  # [R, 1, 1, rot_dim]
    sin: torch.Tensor | None = None
    compact: list[tuple[int, int, int]] = field(default_factory=list)  # alibi: (row, src, count)
    # chunk (all rows alike)
    to_sinks: int = 0  # tokens that become sinks
    kept: int = 0  # old window tokens kept
    old: Row | None = None  # the rows' counters before the chunk


class LayoutCounters:
    """Per-row counters shared by the layers of one kind; advanced once per forward."""

    def __init__(self, kind: str, n_sink: int, window: int, rope: Rope | None):
        self.kind, self.n_sink, self.window, self.rope = kind, n_sink, window, rope
        self.cap = n_sink + window if kind != "alibi" else n_sink + 2 * window
        self.reset()

    def reset(self) -> None:
        self.rows: list[Row] = []
        self.step = 0
        self.plan: ForwardPlan | None = None

    # -- views of the state ---------------------------------------------------------------------
    def uniform(self) -> bool:
        return all(r == self.rows[0] for r in self.rows[1:])

    def span(self, r: Row) -> tuple[int, int]:
        """Slots [lo, hi) holding row r's tokens (ring layouts: some slots may be of other rows' size)."""
        if self.kind != "alibi":
            return 0, r.n_sinks + r.n_window
        if r.n_sinks < self.n_sink or r.n_window == 0:
            return 0, r.n_sinks
        return r.start - self.n_sink, r.start + r.n_window

    def view(self, rows: list[Row]) -> tuple[int, int]:
        spans = [self.span(r) for r in rows]
        return min(s[0] for s in spans), max(s[1] for s in spans)

    def valid(self, r: Row, lo: int, hi: int) -> torch.Tensor:
        """Bool [hi - lo]: which returned slots hold row r's tokens."""
        idx = torch.arange(lo, hi)
        if self.kind == "alibi":
            a, b = self.span(r)
            return (idx >= a) & (idx < b)
        return (idx < r.n_sinks) | ((idx >= self.n_sink) & (idx < self.n_sink + r.n_window))

    def after(self, q: int) -> list[Row]:
        """The rows' counters after feeding q tokens to each (pure)."""
        rows = [copy.copy(r) for r in self.rows]
        for r in rows:
            self._advance_row(r, q)
        return rows

    def seq_length(self) -> int:
        if not self.rows:
            return 0
        if self.kind == "alibi":  # positions are key indices: the next single token's index
            lo, hi = self.view(self.after(1))
            return hi - lo - 1
        return max(r.seen - r.shift for r in self.rows)

    def mask_sizes(self, q: int) -> tuple[int, int]:
        if not self.rows:
            return q, 0
        self._check_chunk(q)
        if self.kind != "alibi" and len(self.rows) > 1 and not self.uniform():
            raise ValueError(
                "SinkCache rows hold streams of different lengths: pass position_ids=cache.position_ids() "
                "and attention_mask=cache.attention_mask() (sinkstream's engine does)"
            )
        if self.kind == "sliding":
            kv = max(min(r.n_window, self.window - 1) for r in self.rows) + q
        else:
            lo, hi = self.view(self.after(q))
            kv = hi - lo
        return kv, self.seq_length() + q - kv

    # -- advancing ----------------------------------------------------------------------------
    def split(self, r: Row, q: int) -> tuple[int, int]:
        """How many of q new tokens become sinks, and how many enter the window."""
        to_sinks = min(q, self.n_sink - r.n_sinks)
        return to_sinks, q - to_sinks

    def _check_chunk(self, q: int) -> None:
        if q == 1:
            return
        if len(self.rows) > 1 and not self.uniform():
            raise ValueError(
                "SinkCache rows hold streams of different lengths: feed them one token per row, with "
                "cache.position_ids() and cache.attention_mask() (sinkstream's engine does)"
            )
        if self.kind != "sliding" and self.rows and q - self.split(self.rows[0], q)[0] > self.window:
            raise ValueError(
                f"SinkCache got a chunk of {q} tokens for a window of {self.window}: feed long inputs in "
                f"chunks of at most {self.window} tokens (sinkstream's engine does)"
            )

    def _advance_row(self, r: Row, q: int) -> tuple[int, int]:
        """Update r for q new tokens; return (kept old window tokens, alibi compaction source or -1)."""
        to_sinks, w = self.split(r, q)
        if to_sinks and r.n_sinks == 0:
            r.sink_pos = r.seen - r.shift
            r.start = self.n_sink
        r.n_sinks += to_sinks
        r.seen += q
        src = -1
        if self.kind == "sliding":
            kept = min(r.n_window, self.window - 1) if q > 1 else r.n_window
            if q == 1 and r.n_window == self.window:
                r.head = (r.head + 1) % self.window
            else:
                r.n_window, r.head = min(self.window, kept + w), (r.head if q == 1 else 0)
            return kept, src
        kept = min(r.n_window, self.window - w)
        if self.kind == "alibi":
            r.start += r.n_window - kept
            if w and r.start + kept + w > self.cap:
                src, r.start = r.start, self.n_sink
            r.n_window = kept + w
            return kept, src
        if q == 1 and w and r.n_window == self.window:
            r.head = (r.head + 1) % self.window
        elif q == 1:
            r.n_window += w
        else:
            r.head, r.n_window = 0, kept + w
        return kept, src

    def sink_target(self, r: Row) -> int | None:
        """Rotation that puts r's sinks right before its oldest window key (None: nothing to place)."""
        if r.n_window == 0 or r.n_sinks == 0:
            return None
        oldest = r.seen - r.n_window - r.shift
        return oldest - r.n_sinks - r.sink_pos

    def plan_for(self, layer: SinkLayer, batch: int, q: int) -> ForwardPlan:
        if layer.step == self.step:  # the first layer of this kind in this forward
            if not self.rows:
                self.rows = [Row() for _ in range(batch)]
            self._check_chunk(q)
            self.plan = self._advance(q, layer.device)
            self.step += 1
        layer.step = self.step
        return self.plan

    def _advance(self, q: int, device) -> ForwardPlan:
        plan = ForwardPlan(q)
        if q > 1:
            plan.old = copy.copy(self.rows[0])
            plan.to_sinks = self.split(plan.old, q)[0]
        slots, moved, deltas = [], [], []
        for b, r in enumerate(self.rows):
            before = copy.copy(r)
            kept, src = self._advance_row(r, q)
            plan.kept = kept
            if q == 1:
                slots.append(self._slot_of_new(before, r))
                if before.n_sinks < self.n_sink:
                    plan.sink_rows.append(b)
            if src >= 0:
                plan.compact.append((b, src, kept))
            if self.kind == "rope":
                target = self.sink_target(r)
                if target is not None and target != r.sink_delta:
                    moved.append(b)
                    deltas.append(target)
                    r.sink_delta = target
            elif self.kind == "alibi" and r.n_sinks and r.n_window and self.span(r)[0] != self.span(before)[0] and src < 0:
                moved.append(b)
        plan.kv_lo, plan.kv_hi = self.view(self.rows)
        if q == 1:
            if all(s == slots[0] for s in slots):
                plan.slot = slots[0]
            else:
                plan.slots = torch.tensor(slots, device=device)
        if moved:
            plan.moved, plan.rot_all = moved, len(moved) == len(self.rows)
            if not plan.rot_all:
                plan.rot_rows = torch.tensor(moved, device=device)
            if deltas:
                plan.cos, plan.sin = self.rope.cos_sin(deltas, device)
        return plan

    def _slot_of_new(self, before: Row, after: Row) -> int:
        """Slot of the one token a decode step wrote for a row (after its counters moved)."""
        if before.n_sinks < self.n_sink:
            return before.n_sinks
        if self.kind == "alibi":
            return after.start + after.n_window - 1
        if self.kind == "sliding":
            return (before.head + before.n_window) % self.window if before.n_window < self.window else before.head
        if before.n_window < self.window:
            return self.n_sink + (before.head + before.n_window) % self.window
        return self.n_sink + before.head


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


class SinkCache(Cache):
    """Attention-sink streaming cache (StreamingLLM) for transformers 5.x models.

    Keeps the first ``n_sink`` tokens and the ``window`` most recent ones; every cached token is
    seen by attention at its position inside the cache. The newest token attends to at most
    ``n_sink + window`` keys, itself included. Use it as ``past_key_values`` in plain forward calls
    or in ``model.generate``. ``config`` (the model's config) is needed to re-position the sinks
    and to know which layers slide. ``kv_dtype`` stores keys and values in another dtype than the
    model computes them in (float16 halves the bytes a decode step reads); attention casts them back.

    Streaming does not extend the context: a token that left the window is gone.
    """

    def __init__(self, n_sink: int = 4, window: int = 1020, *, config=None, kv_dtype: torch.dtype | None = None):
        for name, value in (("n_sink", n_sink), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {n_sink}")
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        if config is None:
            raise ValueError(
                "SinkCache needs the model's config to re-position the sinks: "
                "SinkCache(n_sink, window, config=model.config)"
            )
        self.n_sink, self.window, self.config, self.kv_dtype = n_sink, window, config, kv_dtype
        kinds = layer_kinds(config, n_sink + window)
        self.counters: dict[str, LayoutCounters] = {}
        for kind in dict.fromkeys(kinds):
            if kind == "sliding":
                self.counters[kind] = LayoutCounters(kind, 0, config.sliding_window, rope_for(config, "sliding_attention"))
            elif kind == "alibi":
                self.counters[kind] = LayoutCounters(kind, n_sink, window, None)
            else:
                self.counters[kind] = LayoutCounters(kind, n_sink, window, rope_for(config, "full_attention"))
        super().__init__(layers=[SinkLayer.for_layout(self.counters[k], kv_dtype) for k in kinds])
        self.main = self.counters["alibi" if "alibi" in self.counters else "rope"]

    @classmethod
    def for_model(cls, model, n_sink: int = 4, window: int = 1020, kv_dtype: torch.dtype | None = None) -> SinkCache:
        return cls(n_sink, window, config=model.config, kv_dtype=kv_dtype)

    # -- counters -----------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return len(self.main.rows)

    @property
    def seen_per_row(self) -> list[int]:
        return [r.seen for r in self.main.rows]

    @property
    def cached_per_row(self) -> list[int]:
        return [r.n_sinks + r.n_window for r in self.main.rows]

    @property
    def tokens_seen(self) -> int:
        """Tokens streamed through the cache so far (unbounded; the longest row of a batch)."""
        return max(self.seen_per_row, default=0)

    @property
    def tokens_cached(self) -> int:
        """Tokens stored now (at most ``n_sink + window``; the fullest row of a batch)."""
        return max(self.cached_per_row, default=0)

    # -- what a forward over rows of different lengths needs ----------------------------------
    def position_ids(self, q: int = 1, device=None) -> torch.Tensor:
        """[B, q] positions of the next q tokens of every row (RoPE frame; ALiBi ignores them)."""
        start = torch.tensor([r.seen - r.shift for r in self.main.rows], device=device)
        return start[:, None] + torch.arange(q, device=device)

    def attention_mask(self, dtype=torch.float32, device=None):
        """The mask of a one-token-per-row step: a 4D additive mask [B, 1, 1, kv] (a dict per layer type
        for hybrid models; a 2D [B, kv] padding mask for ALiBi models, which build their bias from it)."""
        masks = {}
        for kind, counters in self.counters.items():
            rows = counters.after(1)
            lo, hi = counters.view(rows)
            valid = torch.stack([counters.valid(r, lo, hi) for r in rows]).to(device)
            if kind == "alibi":
                return valid.long()
            m = torch.zeros(valid.shape, dtype=dtype, device=device).masked_fill(~valid, torch.finfo(dtype).min)
            masks["sliding_attention" if kind == "sliding" else "full_attention"] = m[:, None, None, :]
        return masks if len(masks) > 1 else masks["full_attention"]

    # -- rows ---------------------------------------------------------------------------------
    @classmethod
    def stack(cls, caches: list[SinkCache]) -> SinkCache:
        """One batch cache whose rows are the given caches' rows, in order (their tensors are copied)."""
        if not caches:
            raise ValueError("nothing to stack")
        first = caches[0]
        for c in caches:
            if (c.n_sink, c.window, type(c.config)) != (first.n_sink, first.window, type(first.config)):
                raise ValueError("stacked caches must have the same n_sink, window and model")
            if not all(layer.is_initialized for layer in c.layers):
                raise ValueError("stacked caches must each have seen at least one token")
        out = cls(first.n_sink, first.window, config=first.config, kv_dtype=first.kv_dtype)
        for kind, counters in out.counters.items():
            counters.rows = [copy.copy(r) for c in caches for r in c.counters[kind].rows]
        for i, layer in enumerate(out.layers):
            src = [c.layers[i] for c in caches]
            layer.dtype, layer.device, layer.is_initialized = src[0].dtype, src[0].device, True
            for name in src[0]._tensors():
                setattr(layer, name, torch.cat([getattr(s, name) for s in src]))
        return out

    def extract(self, rows: list[int]) -> SinkCache:
        """A new cache holding copies of the given rows (in that order); this one is unchanged."""
        if not rows:
            raise ValueError("nothing to extract")
        out = SinkCache(self.n_sink, self.window, config=self.config, kv_dtype=self.kv_dtype)
        for kind, counters in out.counters.items():
            counters.rows = [copy.copy(self.counters[kind].rows[b]) for b in rows]
            counters.step = self.counters[kind].step
        for src, layer in zip(self.layers, out.layers):
            if src.is_initialized:
                idx = torch.tensor(rows, dtype=torch.long, device=src.device)
                for name in src._tensors():
                    setattr(layer, name, getattr(src, name)[idx])  # advanced indexing copies
                layer.dtype, layer.device, layer.is_initialized, layer.step = src.dtype, src.device, True, src.step
        return out

    def select_rows(self, rows: list[int]) -> None:
        """Keep only the given rows (in that order): finished streams leave a batch."""
        idx = torch.tensor(rows, dtype=torch.long)
        for counters in self.counters.values():
            counters.rows = [copy.copy(counters.rows[b]) for b in rows]
        for layer in self.layers:
            layer.select_rows(idx)

    # -- snapshots ----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta): everything needed to continue this stream exactly (see ``from_state``).
        Between forwards only; the tensors are the live buffers (copy them if the stream goes on)."""
        tensors = {}
        for i, layer in enumerate(self.layers):
            if layer.is_initialized:
                for name in layer._tensors():
                    tensors[f"layers.{i}.{name}"] = getattr(layer, name)
        meta = {
            "format": 1,
            "n_sink": self.n_sink,
            "window": self.window,
            "kv_dtype": None if self.kv_dtype is None else str(self.kv_dtype).removeprefix("torch."),
            "model_type": getattr(self.config, "model_type", None),
            "counters": {k: {"step": t.step, "rows": [dict(vars(r)) for r in t.rows]} for k, t in self.counters.items()},
        }
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, *, config, device=None) -> SinkCache:
        """The cache ``state()`` described, for a model with ``config`` (checked against the snapshot)."""
        if meta.get("format") != 1:
            raise ValueError(f"unknown SinkCache snapshot format {meta.get('format')!r}")
        if meta.get("model_type") != getattr(config, "model_type", None):
            raise ValueError(f"snapshot is of a {meta.get('model_type')} model, not {config.model_type}")
        kv = meta.get("kv_dtype")
        out = cls(meta["n_sink"], meta["window"], config=config, kv_dtype=getattr(torch, kv) if kv else None)
        if set(meta["counters"]) != set(out.counters):
            raise ValueError("snapshot layer kinds do not match this model")
        for kind, t in meta["counters"].items():
            out.counters[kind].rows = [Row(**r) for r in t["rows"]]
            out.counters[kind].step = t["step"]
        for i, layer in enumerate(out.layers):
            names = [f"layers.{i}.{n}" for n in layer._tensors()]
            if not all(n in tensors for n in names):
                continue
            for name, key in zip(layer._tensors(), names):
                setattr(layer, name, tensors[key].to(device=device, copy=True))  # own, aligned memory
            layer.dtype, layer.device = layer.keys.dtype, layer.keys.device
            layer.is_initialized, layer.step = True, layer.counters.step
        return out

    # -- one-token steps written by a fused decoder ------------------------------------------------
    def advance_decode(self) -> DecodeStep:
        """Advance every row by one token and say where it goes (see ``DecodeStep``); the caller writes
        the keys. The sink slots of ``keys`` are then left as computed (``sink_delta`` None): a later
        transformers forward re-places them, a fused step reads ``sink_keys`` instead."""
        if set(self.counters) != {"rope"}:
            raise ValueError("advance_decode is for caches whose layers are all RoPE sink layers")
        counters = self.counters["rope"]
        step = DecodeStep([], [], [], [])
        for r in counters.rows:
            before = copy.copy(r)
            step.positions.append(r.seen - r.shift)
            counters._advance_row(r, 1)
            step.slots.append(counters._slot_of_new(before, r))
            step.sink_positions.append(step.positions[-1] - (counters.sink_target(r) or 0))
            step.lengths.append(self.n_sink + r.n_window if r.n_window else r.n_sinks)
            r.sink_delta = None
        counters.step += 1
        for layer in self.layers:
            layer.step = counters.step
        return step

    def init_rows(self, batch: int, heads: int, head_dim: int, dtype, device) -> None:
        """Allocate empty buffers for ``batch`` rows (what the first transformers forward would do)."""
        for counters in self.counters.values():
            counters.rows = [Row() for _ in range(batch)]
        for layer in self.layers:
            layer.lazy_initialization(
                torch.empty(batch, heads, 1, head_dim, dtype=dtype, device=device),
                torch.empty(batch, heads, 1, head_dim, dtype=dtype, device=device),
            )

    def rebase_due(self, q: int) -> bool:
        """Whether feeding ``q`` more tokens would take positions past ``n_sink + 2 * window``: the bound
        sinkstream keeps RoPE angles under (one window re-rotation per ~window tokens, amortized O(1))."""
        return "rope" in self.counters and self.get_seq_length() + q > self.n_sink + 2 * self.window

    def rebase(self) -> int:
        """Re-rotate every row's window once so its positions restart at ``n_sink``; returns the largest
        shift. RoPE only (ALiBi has no positions to rebase). Not for use under ``generate``."""
        if "rope" not in self.counters:
            return 0
        main = self.counters["rope"]
        amounts = [max(0, r.seen - r.n_window - r.shift - r.n_sinks) if r.n_window else 0 for r in main.rows]
        if not any(amounts):
            return 0
        for counters in self.counters.values():
            for r, a in zip(counters.rows, amounts):
                r.shift += a
                if counters.kind == "rope":
                    r.sink_delta = counters.sink_target(r)
        for layer in self.layers:
            layer.rotate_rows(amounts)
        return max(amounts)
