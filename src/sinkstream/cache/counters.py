"""The per-row counters of one cache layout, advanced once per forward by the layout's first layer.

``Row`` holds one stream's counters (tokens seen, position shift, sinks and window stored, where the
window starts); ``LayoutCounters`` holds a batch's rows for one layout and turns a forward into a
``ForwardPlan`` that every layer of the layout then follows with a few tensor writes. ``DecodeStep``
is the same plan for a decode step that writes and attends the keys itself (the fused step).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..positions import Rope

if TYPE_CHECKING:
    from .layers import SinkLayer


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
            elif (
                self.kind == "alibi"
                and r.n_sinks
                and r.n_window
                and self.span(r)[0] != self.span(before)[0]
                and src < 0
            ):
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
