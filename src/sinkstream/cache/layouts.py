"""The three cache layouts, one object each: a batch's rows (their counters), the arithmetic that moves
them, and the buffers of every layer of that layout as one tensor per kind of buffer.

``RingLayout``    full-attention RoPE layers: the sinks in slots [0, n_sink), re-rotated to sit right
                  before the oldest window key; the window a ring buffer after them, keys never
                  re-rotated on a step.
``SlidingLayout`` the sliding layers of hybrid models (Gemma 3, gpt-oss): a ring of the model's own
                  ``sliding_window`` keys and no sinks (the model never attends further back anyway).
``AlibiLayout``   ALiBi layers (MPT, BLOOM), whose bias is read off the key *index*: each row's sinks and
                  window contiguous and in order, in ``n_sink + 2 * window`` slots. Evicting the oldest
                  window key moves the window's start by one slot and the sinks are copied right before
                  it; at the end of the buffer the block moves back to the front (amortized O(1)).

Buffers are ``keys`` / ``values`` [layers, batch, heads, slots, dim] and ``sink_keys`` / ``sink_values``
[layers, batch, heads, n_sink, dim] (the sinks as computed, never re-rotated). A forward advances the
rows once, when the layout's first layer writes (``update(0, …)``): that computes a ``ForwardPlan`` the
layout's other layers follow with a few tensor writes. Stacking rows, extracting a row, a snapshot and
a rebase are one tensor operation per buffer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..positions import Rope

BUFFERS = ("keys", "values", "sink_keys", "sink_values")


@dataclass
class Row:
    """Counters of one stream (batch row) in one layout."""

    seen: int = 0  # tokens seen (unbounded)
    shift: int = 0  # rotary position = text index - shift
    n_sinks: int = 0  # sinks stored
    n_window: int = 0  # window tokens stored
    head: int = 0  # ring layouts: ring slot of the oldest window token
    start: int = 0  # alibi layout: slot of the oldest window token
    sink_pos: int = 0  # rotary position the first sink was computed at
    sink_delta: int | None = 0  # rotation currently applied to the sink slots
    pin: int = 0  # the stream's sinks: its first ``pin`` tokens (the plain sinks, or a pinned prefix; set by
    # the layout that starts the row)


@dataclass
class DecodeStep:
    """One token per row, for a decode step that writes and attends the keys itself (``fused``).

    For every row: the rotary ``position`` of its new token; ``sink_position``, where the query must be
    rotated to see the sinks *as they were computed* at their in-cache distance (RoPE scores depend on
    differences only, so this equals re-rotating the sinks); the ``slot`` the new key goes to (a slot
    below the row's ``sinks`` makes it a sink); and ``length``: the row's tokens are slots [0, length) after it."""

    positions: list[int]
    sink_positions: list[int]
    slots: list[int]
    lengths: list[int]
    sinks: list[int]  # each row's sink slots [0, sinks) (its pin)


@dataclass
class ForwardPlan:
    """What every layer of a layout does in one forward (computed once, when its first layer writes)."""

    q: int
    kv_lo: int = 0  # the keys returned are slots [kv_lo, kv_hi)
    kv_hi: int = 0
    # decode (one token per row)
    slot: int | None = None  # the slot of every row, when they agree
    slots: torch.Tensor | None = None  # [B] otherwise
    sink_rows: list[int] = field(default_factory=list)  # rows whose token becomes a sink
    moved: list[int] = field(default_factory=list)  # rows whose sinks move (rope) or are copied again (alibi)
    rot_all: bool = False  # every row moved (then no index tensor is needed)
    cos: torch.Tensor | None = None  # [R, 1, 1, rot_dim]
    sin: torch.Tensor | None = None
    compact: list[tuple[int, int, int]] = field(default_factory=list)  # alibi: (row, src, count)
    # chunk (all rows alike)
    to_sinks: int = 0  # tokens that become sinks
    kept: int = 0  # old window tokens kept
    old: Row | None = None  # the rows' counters before the chunk


class Layout:
    """The rows and buffers of every layer of one layout (see the module docstring)."""

    kind = ""
    is_sliding = False
    bounded_chunks = True  # a chunk may not bring more than ``window`` tokens to the window
    masks_per_row = False  # a mask built from (kv_length, offset) fits rows of different lengths

    def __init__(self, n_sink: int, window: int, rope: Rope | None, n_layers: int, kv_dtype=None, pin=None):
        self.n_sink, self.window, self.rope, self.n_layers, self.kv_dtype = n_sink, window, rope, n_layers, kv_dtype
        self.total = n_sink + window  # every row's sinks + window
        self.pin = n_sink if pin is None else pin  # the sinks of the rows this layout starts
        if not 0 <= self.pin < self.total:
            raise ValueError(f"a stream's sinks ({self.pin}) must leave room for a window in {self.total} slots")
        self.max_pin = max(n_sink, self.pin)  # the sink buffers' slots
        self.cap = self.capacity()
        self.reset()

    def capacity(self) -> int:
        return self.total

    def new_row(self) -> Row:
        return Row(pin=self.pin)

    def window_of(self, r: Row) -> int:
        """The row's window: what its sinks leave of the layout's slots."""
        return self.total - r.pin

    def reset(self) -> None:
        self.rows: list[Row] = []
        self.plan: ForwardPlan | None = None
        self.keys = self.values = self.sink_keys = self.sink_values = None
        self.per_layer: list[tuple[torch.Tensor, ...]] = []  # each layer's (keys, values, sink_keys, sink_values)

    # -- buffers ------------------------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return self.keys is not None

    def allocate(self, batch: int, heads: int, dim: int, value_dim: int, dtype, device) -> None:
        """Zeroed buffers for ``batch`` rows, stored in ``kv_dtype`` (else ``dtype``)."""
        kw = {"dtype": self.kv_dtype or dtype, "device": device}
        lay = (self.n_layers, batch, heads)
        self.set_buffers({
            "keys": torch.zeros(*lay, self.cap, dim, **kw),
            "values": torch.zeros(*lay, self.cap, value_dim, **kw),
            "sink_keys": torch.zeros(*lay, self.max_pin, dim, **kw),
            "sink_values": torch.zeros(*lay, self.max_pin, value_dim, **kw),
        })  # fmt: skip

    def buffers(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in BUFFERS} if self.initialized else {}

    def set_buffers(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in BUFFERS:
            setattr(self, name, tensors[name])
        self.max_pin = tensors["sink_keys"].shape[-2]
        # each layer's slices, made once for the fused decode step, which reads them for every layer under
        # no_grad (writes that autograd tracks, in a forward with gradients on, take fresh slices: ``layer``)
        self.per_layer = [tuple(tensors[name][i] for name in BUFFERS) for i in range(self.n_layers)]

    def layer(self, i: int) -> tuple[torch.Tensor, ...]:
        """Layer i's (keys, values, sink_keys, sink_values) [B, H, slots, D], sliced now."""
        return self.keys[i], self.values[i], self.sink_keys[i], self.sink_values[i]

    def take_rows(self, rows: list[int]) -> None:
        """Keep only the given rows of every buffer, in that order (copies)."""
        if self.initialized:
            idx = torch.tensor(rows, dtype=torch.long, device=self.keys.device)
            self.set_buffers({name: t[:, idx] for name, t in self.buffers().items()})
        self.rows = [copy.copy(self.rows[b]) for b in rows]

    @classmethod
    def joined(cls, parts: list[Layout]) -> dict[str, torch.Tensor]:
        """The buffers of ``parts``' rows, in order, as one batch (sink buffers padded to the widest)."""
        width = max(p.max_pin for p in parts)

        def padded(t: torch.Tensor, name: str) -> torch.Tensor:
            short = width - t.shape[-2] if name.startswith("sink") else 0
            return torch.nn.functional.pad(t, (0, 0, 0, short)) if short else t

        return {name: torch.cat([padded(getattr(p, name), name) for p in parts], dim=1) for name in BUFFERS}

    # -- views of the rows --------------------------------------------------------------------------------
    def uniform(self) -> bool:
        return all(r == self.rows[0] for r in self.rows[1:])

    def span(self, r: Row) -> tuple[int, int]:
        """Slots [lo, hi) holding row r's tokens (some slots in between may be of other rows' size)."""
        return 0, r.n_sinks + r.n_window

    def view(self, rows: list[Row]) -> tuple[int, int]:
        spans = [self.span(r) for r in rows]
        return min(s[0] for s in spans), max(s[1] for s in spans)

    def valid(self, r: Row, lo: int, hi: int) -> torch.Tensor:
        """Bool [hi - lo]: which returned slots hold row r's tokens."""
        idx = torch.arange(lo, hi)
        return (idx < r.n_sinks) | ((idx >= r.pin) & (idx < r.pin + r.n_window))

    def after(self, q: int) -> list[Row]:
        """The rows' counters after feeding q tokens to each (pure)."""
        rows = [copy.copy(r) for r in self.rows]
        for r in rows:
            self.advance_row(r, q)
        return rows

    def seq_length(self) -> int:
        """The rotary position the next token takes (the longest row's)."""
        return max((r.seen - r.shift for r in self.rows), default=0)

    def mask_sizes(self, q: int) -> tuple[int, int]:
        if not self.rows:
            return q, 0
        self.check_chunk(q)
        if not self.masks_per_row and len(self.rows) > 1 and not self.uniform():
            raise ValueError(
                "SinkCache rows hold streams of different lengths: pass position_ids=cache.position_ids() "
                "and attention_mask=cache.attention_mask() (sinkstream's engine does)"
            )
        kv = self.kv_length(q)
        return kv, self.seq_length() + q - kv

    def kv_length(self, q: int) -> int:
        """Keys a forward of q tokens per row attends to."""
        lo, hi = self.view(self.after(q))
        return hi - lo

    def check_chunk(self, q: int) -> None:
        if q == 1:
            return
        if len(self.rows) > 1 and not self.uniform():
            raise ValueError(
                "SinkCache rows hold streams of different lengths: feed them one token per row, with "
                "cache.position_ids() and cache.attention_mask() (sinkstream's engine does)"
            )
        window = self.window_of(self.rows[0]) if self.rows else self.window
        if self.bounded_chunks and self.rows and q - self.split(self.rows[0], q)[0] > window:
            raise ValueError(
                f"SinkCache got a chunk of {q} tokens for a window of {window}: feed long inputs in "
                f"chunks of at most {window} tokens (sinkstream's engine does)"
            )

    # -- advancing ----------------------------------------------------------------------------------------
    def split(self, r: Row, q: int) -> tuple[int, int]:
        """How many of q new tokens become sinks, and how many enter the window."""
        to_sinks = min(q, r.pin - r.n_sinks)
        return to_sinks, q - to_sinks

    def _take_sinks(self, r: Row, q: int) -> tuple[int, int]:
        """Count the sinks among q new tokens and the tokens seen; (to_sinks, to the window)."""
        to_sinks, w = self.split(r, q)
        if to_sinks and r.n_sinks == 0:
            r.sink_pos = r.seen - r.shift
            r.start = r.pin
        r.n_sinks += to_sinks
        r.seen += q
        return to_sinks, w

    def advance_row(self, r: Row, q: int) -> tuple[int, int]:
        """Update r for q new tokens; return (old window tokens kept, alibi compaction source or -1)."""
        raise NotImplementedError

    def slot_of_new(self, before: Row, after: Row) -> int:
        """Slot of the one token a decode step wrote for a row (after its counters moved)."""
        raise NotImplementedError

    def sink_target(self, r: Row) -> int | None:
        """Rotation that puts r's sinks right before its oldest window key (None: nothing to place)."""
        if r.n_window == 0 or r.n_sinks == 0:
            return None
        oldest = r.seen - r.n_window - r.shift
        return oldest - r.n_sinks - r.sink_pos

    def begin(self, batch: int, q: int, device) -> ForwardPlan:
        """Advance every row by q tokens: the plan this forward's layers follow."""
        if not self.rows:
            self.rows = [self.new_row() for _ in range(batch)]
        self.check_chunk(q)
        plan = ForwardPlan(q)
        if q > 1:
            plan.old = copy.copy(self.rows[0])
            plan.to_sinks = self.split(plan.old, q)[0]
        slots, deltas = [], []
        for b, r in enumerate(self.rows):
            before = copy.copy(r)
            plan.kept, src = self.advance_row(r, q)
            if q == 1:
                slots.append(self.slot_of_new(before, r))
                if before.n_sinks < before.pin:
                    plan.sink_rows.append(b)
            if src >= 0:
                plan.compact.append((b, src, plan.kept))
            self._moved(plan, b, before, r, src, deltas)
        plan.kv_lo, plan.kv_hi = self.view(self.rows)
        if q == 1:
            if all(s == slots[0] for s in slots):
                plan.slot = slots[0]
            else:
                plan.slots = torch.tensor(slots, device=device)
        if plan.moved:
            plan.rot_all = len(plan.moved) == len(self.rows)
            if deltas:
                plan.cos, plan.sin = self.rope.cos_sin(deltas, device)
        self.plan = plan
        return plan

    def _moved(self, plan: ForwardPlan, b: int, before: Row, r: Row, src: int, deltas: list[int]) -> None:
        """Note row b in ``plan.moved`` when its sinks must be placed again after this advance."""

    # -- one layer's forward --------------------------------------------------------------------------------
    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's new keys and values [B, H, q, D]: written where the plan says; returns the keys and
        values it attends to (the layout's first layer advances the rows first)."""
        if not self.initialized:
            self.allocate(k.shape[0], k.shape[1], k.shape[-1], v.shape[-1], k.dtype, k.device)
        if i == 0:
            self.begin(k.shape[0], k.shape[-2], k.device)
        plan = self.plan
        keys, values = self.keys[i], self.values[i]
        self._before_write(i, plan)
        if plan.q > 1:
            out = self._write_chunk(i, plan, k, v)
            if out is not None:
                return out[0].to(k.dtype), out[1].to(v.dtype)
        else:
            self._write_one(i, plan, k, v)
        if plan.moved:
            self._place_sinks(i, plan)
        k_out, v_out = keys[:, :, plan.kv_lo : plan.kv_hi], values[:, :, plan.kv_lo : plan.kv_hi]
        if k_out.dtype != k.dtype:  # stored in kv_dtype: attention computes in the model's dtype
            k_out, v_out = k_out.to(k.dtype), v_out.to(v.dtype)
        return k_out, v_out

    def _write_one(self, i: int, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        keys, values, sink_keys, sink_values = self.layer(i)
        if plan.slot is not None:
            keys[:, :, plan.slot] = k[:, :, 0]
            values[:, :, plan.slot] = v[:, :, 0]
        else:
            rows = torch.arange(k.shape[0], device=k.device)
            keys[rows, :, plan.slots] = k[:, :, 0]
            values[rows, :, plan.slots] = v[:, :, 0]
        for b in plan.sink_rows:
            s = plan.slot if plan.slot is not None else int(plan.slots[b])
            sink_keys[b, :, s] = k[b, :, 0]
            sink_values[b, :, s] = v[b, :, 0]

    def _before_write(self, i: int, plan: ForwardPlan) -> None:
        """What the layout must do to layer i's buffers before this forward's keys are written."""

    def _write_chunk(self, i: int, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor):
        """Append a chunk (all rows alike). Returns the keys/values to attend to when they are not a view."""
        old, to_sinks = plan.old, plan.to_sinks
        if to_sinks:
            for t, new in zip(self.layer(i), (k, v, k, v)):
                t[:, :, old.n_sinks : old.n_sinks + to_sinks] = new[:, :, :to_sinks]
        k, v = k[:, :, to_sinks:], v[:, :, to_sinks:]
        return self._append_window(i, plan, k, v) if k.shape[-2] else None

    def _append_window(self, i: int, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor):
        raise NotImplementedError

    def _place_sinks(self, i: int, plan: ForwardPlan) -> None:
        raise NotImplementedError

    # -- whole-layout operations ----------------------------------------------------------------------------
    def rotate_rows(self, amounts: list[int]) -> None:
        """Re-rotate each row's keys by ``-amounts[b]`` (a rebase); layouts without positions ignore it."""

    def contents(self, i: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions) of one row's cached tokens in layer i, in cache order: sinks, then the
        window oldest first. Keys are as attention sees them (sinks re-positioned). Positions are rotary
        positions (RoPE) or key indices (ALiBi)."""
        raise NotImplementedError


class RingLayout(Layout):
    """Full-attention RoPE layers: sinks, then a ring window (see the module docstring). A row's ring
    starts after its own sinks: slots [pin, total)."""

    kind = "rope"

    def advance_row(self, r: Row, q: int) -> tuple[int, int]:
        _, w = self._take_sinks(r, q)
        window = self.window_of(r)
        kept = min(r.n_window, window - w)
        if q == 1 and w and r.n_window == window:
            r.head = (r.head + 1) % window
        elif q == 1:
            r.n_window += w
        else:
            r.head, r.n_window = 0, kept + w
        return kept, -1

    def slot_of_new(self, before: Row, after: Row) -> int:
        if before.n_sinks < before.pin:
            return before.n_sinks
        window = self.window_of(before)
        if before.n_window < window:
            return before.pin + (before.head + before.n_window) % window
        return before.pin + before.head

    def _moved(self, plan, b, before, r, src, deltas) -> None:
        target = self.sink_target(r)
        if target is not None and target != r.sink_delta:
            plan.moved.append(b)
            deltas.append(target)
            r.sink_delta = target

    def _in_order(self, t: torch.Tensor, old: Row) -> torch.Tensor:
        """The window of one layer's buffer (all rows alike), oldest first."""
        win = t[:, :, old.pin : old.pin + self.window_of(old)]
        if old.head:
            win = torch.cat([win[:, :, old.head :], win[:, :, : old.head]], dim=-2)
        return win[:, :, : old.n_window]

    def _joined(self, i: int, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor):
        """The kept old window keys/values followed by the chunk's."""
        old, kept = plan.old, plan.kept
        new_k = torch.cat([self._in_order(self.keys[i], old)[:, :, old.n_window - kept :], k], dim=-2)
        new_v = torch.cat([self._in_order(self.values[i], old)[:, :, old.n_window - kept :], v], dim=-2)
        return new_k, new_v

    def _append_window(self, i: int, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor):
        new_k, new_v = self._joined(i, plan, k, v)  # laid out in order, so the chunk's causal mask holds
        n, pin = plan.kept + k.shape[-2], plan.old.pin
        self.keys[i, :, :, pin : pin + n] = new_k
        self.values[i, :, :, pin : pin + n] = new_v
        return None

    def _place_sinks(self, i: int, plan: ForwardPlan) -> None:
        """Rotate the sinks of the moved rows, from their stored originals, to right before their oldest
        window key."""
        if self.rope is None:
            raise ValueError(
                "SinkCache needs the model config to re-position sinks: SinkCache(..., config=model.config)"
            )
        keys, sink_keys = self.keys[i], self.sink_keys[i]
        for pin, rows, at in self._by_pin(plan.moved, plan.rot_all):
            cos, sin = (plan.cos, plan.sin) if at is None else (plan.cos[at], plan.sin[at])
            if rows is None:
                keys[:, :, :pin] = self.rope.rotate(sink_keys[:, :, :pin], cos, sin)
            else:
                keys[rows, :, :pin] = self.rope.rotate(sink_keys[rows, :, :pin], cos, sin)

    def _by_pin(self, rows: list[int], every: bool):
        """Groups of ``rows`` with the same sinks: (pin, their row indices or None for every row of the
        batch, their positions in ``rows`` or None for all of them)."""
        pins = sorted({self.rows[b].pin for b in rows})
        device = self.keys.device
        if len(pins) == 1:
            yield pins[0], None if every else torch.tensor(rows, device=device), None
            return
        for pin in pins:
            at = [j for j, b in enumerate(rows) if self.rows[b].pin == pin]
            yield pin, torch.tensor([rows[j] for j in at], device=device), torch.tensor(at, device=device)

    def rotate_rows(self, amounts: list[int]) -> None:
        """Re-rotate each row's window by ``-amounts[b]`` and re-place its sinks, every layer at once."""
        if not self.initialized:
            return
        rows = [b for b, a in enumerate(amounts) if a]
        cos, sin = self.rope.cos_sin([-amounts[b] for b in rows], self.keys.device)
        targets = [self.sink_target(self.rows[b]) or 0 for b in rows]
        sink_cos, sink_sin = self.rope.cos_sin(targets, self.keys.device)
        for pin, idx, at in self._by_pin(rows, every=False):
            c, s = (cos, sin) if at is None else (cos[at], sin[at])
            win = self.keys[:, idx, :, pin : self.total]  # [L, R, H, window, D]
            self.keys[:, idx, :, pin : self.total] = self.rope.rotate(win, c, s)
            if pin:
                c, s = (sink_cos, sink_sin) if at is None else (sink_cos[at], sink_sin[at])
                self.keys[:, idx, :, :pin] = self.rope.rotate(self.sink_keys[:, idx, :, :pin], c, s)

    def contents(self, i: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.rows[row]
        window = self.window_of(r)
        order = [(r.head + j) % window + r.pin for j in range(r.n_window)]
        idx = torch.tensor(list(range(r.n_sinks)) + order, dtype=torch.long, device=self.keys.device)
        k, v = self.keys[i, row : row + 1, :, idx], self.values[i, row : row + 1, :, idx]  # copies
        target = self.sink_target(r)
        if r.n_sinks and r.sink_delta != target:  # sinks left as computed by a fused step
            k[:, :, : r.n_sinks] = self.rope.shift(self.sink_keys[i, row : row + 1, :, : r.n_sinks], target or 0)
        oldest = r.seen - r.n_window - r.shift
        first_sink = oldest - r.n_sinks if r.n_window else r.sink_pos
        pos = torch.cat([torch.arange(r.n_sinks) + first_sink, torch.arange(r.n_window) + oldest])
        return k, v, pos


class SlidingLayout(RingLayout):
    """The sliding-window layers of hybrid models: a ring of the model's own window, no sinks."""

    kind = "sliding"
    is_sliding = True
    bounded_chunks = False  # a chunk attends to the layer's own window - 1 keys and to itself

    def advance_row(self, r: Row, q: int) -> tuple[int, int]:
        _, w = self._take_sinks(r, q)
        kept = min(r.n_window, self.window - 1) if q > 1 else r.n_window
        if q == 1 and r.n_window == self.window:
            r.head = (r.head + 1) % self.window
        else:
            r.n_window, r.head = min(self.window, kept + w), (r.head if q == 1 else 0)
        return kept, -1

    def slot_of_new(self, before: Row, after: Row) -> int:
        return (before.head + before.n_window) % self.window if before.n_window < self.window else before.head

    def _moved(self, plan, b, before, r, src, deltas) -> None:
        """No sinks to place."""

    def kv_length(self, q: int) -> int:
        return max(min(r.n_window, self.window - 1) for r in self.rows) + q

    def _append_window(self, i: int, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor):
        """The chunk attends to window - 1 old keys and itself; the last ``window`` are kept."""
        new_k, new_v = self._joined(i, plan, k, v)
        n = min(self.window, new_k.shape[-2])
        self.keys[i, :, :, :n] = new_k[:, :, -n:]
        self.values[i, :, :, :n] = new_v[:, :, -n:]
        return new_k, new_v


class AlibiLayout(Layout):
    """ALiBi layers: sinks and window contiguous, in order (see the module docstring)."""

    kind = "alibi"
    masks_per_row = True  # ALiBi models build their bias from the 2D mask of each row

    def capacity(self) -> int:
        return 2 * self.total  # a row's pin + twice its window, whatever the pin

    def span(self, r: Row) -> tuple[int, int]:
        if r.n_sinks < r.pin or r.n_window == 0:
            return 0, r.n_sinks
        return r.start - r.pin, r.start + r.n_window

    def valid(self, r: Row, lo: int, hi: int) -> torch.Tensor:
        idx = torch.arange(lo, hi)
        a, b = self.span(r)
        return (idx >= a) & (idx < b)

    def seq_length(self) -> int:
        """Positions are key indices: the next single token's index."""
        if not self.rows:
            return 0
        lo, hi = self.view(self.after(1))
        return hi - lo - 1

    def advance_row(self, r: Row, q: int) -> tuple[int, int]:
        _, w = self._take_sinks(r, q)
        kept = min(r.n_window, self.window_of(r) - w)
        src = -1
        r.start += r.n_window - kept
        if w and r.start + kept + w > self.cap:
            src, r.start = r.start, r.pin
        r.n_window = kept + w
        return kept, src

    def slot_of_new(self, before: Row, after: Row) -> int:
        if before.n_sinks < before.pin:
            return before.n_sinks
        return after.start + after.n_window - 1

    def _moved(self, plan, b, before, r, src, deltas) -> None:
        if r.n_sinks and r.n_window and self.span(r)[0] != self.span(before)[0] and src < 0:
            plan.moved.append(b)

    def _before_write(self, i: int, plan: ForwardPlan) -> None:
        for b, src, n in plan.compact:  # the block reached the end of the buffer: move it to the front
            pin = self.rows[b].pin
            for t, sinks in ((self.keys, self.sink_keys), (self.values, self.sink_values)):
                t[i, b, :, pin : pin + n] = t[i, b, :, src : src + n].clone()
                t[i, b, :, :pin] = sinks[i, b, :, :pin]

    def _append_window(self, i: int, plan: ForwardPlan, k: torch.Tensor, v: torch.Tensor):
        r = self.rows[0]
        end = r.start + r.n_window
        self.keys[i, :, :, end - k.shape[-2] : end] = k
        self.values[i, :, :, end - k.shape[-2] : end] = v
        return None

    def _place_sinks(self, i: int, plan: ForwardPlan) -> None:
        """Copy the moved rows' sinks right before their window's new start."""
        for b in plan.moved:
            r = self.rows[b]
            lo = self.span(r)[0]
            self.keys[i, b, :, lo : lo + r.pin] = self.sink_keys[i, b, :, : r.pin]
            self.values[i, b, :, lo : lo + r.pin] = self.sink_values[i, b, :, : r.pin]

    def contents(self, i: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo, hi = self.span(self.rows[row])
        k, v = self.keys[i, row : row + 1, :, lo:hi], self.values[i, row : row + 1, :, lo:hi]
        return k, v, torch.arange(hi - lo)


LAYOUTS = {layout.kind: layout for layout in (RingLayout, SlidingLayout, AlibiLayout)}
