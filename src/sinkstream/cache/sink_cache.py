"""``SinkCache``: the transformers ``Cache`` over one layout object per kind of attention layer."""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..positions import layer_kinds, rope_for
from .layouts import BUFFERS, LAYOUTS, DecodeStep, Layout, Row

FORMAT = 2  # snapshots: one tensor per layout and buffer (format 1: one per layer, still read)


def _layout(kind: str, n_sink: int, window: int, config, n_layers: int, kv_dtype, pin) -> Layout:
    if kind == "sliding":  # no sinks: the model's own window
        return LAYOUTS[kind](0, config.sliding_window, rope_for(config, "sliding_attention"), n_layers, kv_dtype)
    rope = None if kind == "alibi" else rope_for(config, "full_attention")
    return LAYOUTS[kind](n_sink, window, rope, n_layers, kv_dtype, pin)


def chunk_for(window: int, most: int | None = None) -> int:
    """The most tokens to feed one stream in one forward: a chunk evicts its own length before it is
    attended, so half the window keeps at least that much context; ``most`` (a configured chunk)
    instead, at most the whole window."""
    return min(most or max(1, window // 2), window)


def _slots(t: torch.Tensor, cap: int) -> torch.Tensor:
    """``t`` [..., slots, D] with ``cap`` slots (zeros added at the end)."""
    return torch.nn.functional.pad(t, (0, 0, 0, cap - t.shape[-2])) if t.shape[-2] < cap else t


class SinkLayer(CacheLayerMixin):
    """One attention layer as transformers sees it: layer ``index`` of its ``layout``, whose rows and
    buffers it reads and writes (the layout owns them; this is a view)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, layout: Layout, index: int):  # CacheLayerMixin.__init__ would set buffers: they are the layout's
        self.layout, self.index = layout, index

    @property
    def is_sliding(self) -> bool:
        return self.layout.is_sliding

    @property
    def is_initialized(self) -> bool:
        return self.layout.initialized

    def _buffer(self, which: int) -> torch.Tensor | None:
        return self.layout.per_layer[self.index][which] if self.layout.initialized else None

    keys = property(lambda self: self._buffer(0))  # [B, H, slots, D]
    values = property(lambda self: self._buffer(1))
    sink_keys = property(lambda self: self._buffer(2))  # [B, H, n_sink, D], as computed
    sink_values = property(lambda self: self._buffer(3))
    n_sink = property(lambda self: self.layout.n_sink)
    window = property(lambda self: self.layout.window)
    rope = property(lambda self: self.layout.rope)

    # -- transformers layer API -----------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if not self.layout.initialized:
            b, h, _, d = key_states.shape
            self.layout.allocate(b, h, d, value_states.shape[-1], key_states.dtype, key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.layout.update(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.layout.mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.layout.seq_length()

    def get_max_length(self) -> int:
        return self.layout.cap

    def reset(self) -> None:
        self.layout.reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SinkCache cannot be cropped: evicted tokens are gone")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SinkCache does not support beam search")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("use SinkCache.select_rows")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("SinkCache does not support num_return_sequences > 1")

    def contents(self, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions) of one row's cached tokens in this layer (``Layout.contents``)."""
        return self.layout.contents(self.index, row)


class SinkCache(Cache):
    """Attention-sink streaming cache (StreamingLLM) for transformers 5.x models.

    Keeps the first ``n_sink`` tokens and the ``window`` most recent ones; every cached token is
    seen by attention at its position inside the cache. The newest token attends to at most
    ``n_sink + window`` keys, itself included. Use it as ``past_key_values`` in plain forward calls
    or in ``model.generate``. ``config`` (the model's config) is needed to re-position the sinks
    and to know which layers slide. ``kv_dtype`` stores keys and values in another dtype than the
    model computes them in (float16 halves the bytes a decode step reads); attention casts them back.

    One layout object per kind of attention layer (``layouts``: ``rope``, ``sliding``, ``alibi``) holds
    the rows and the buffers of all its layers; ``layers`` are the per-layer views transformers calls.
    ``main`` is the full-attention layout, whose rows are the streams' counters (tokens seen, cached).

    ``pin``: this stream's sinks are its first ``pin`` tokens instead of ``n_sink`` (a pinned prefix: a
    system prompt and tools kept for the whole stream), its window what is left of ``n_sink + window``.
    Rows with different pins may share a batch.

    Streaming does not extend the context: a token that left the window is gone.
    """

    def __init__(
        self, n_sink: int = 4, window: int = 1020, *, config=None, kv_dtype: torch.dtype | None = None,
        pin: int | None = None,
    ):  # fmt: skip
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
        if pin is not None and (isinstance(pin, bool) or not isinstance(pin, int)):
            raise TypeError(f"pin must be an int, got {pin!r}")
        kinds = layer_kinds(config, n_sink + window)
        self.layouts: dict[str, Layout] = {
            kind: _layout(kind, n_sink, window, config, kinds.count(kind), kv_dtype, pin)
            for kind in dict.fromkeys(kinds)
        }
        views, seen = [], dict.fromkeys(self.layouts, 0)
        for kind in kinds:
            views.append(SinkLayer(self.layouts[kind], seen[kind]))
            seen[kind] += 1
        super().__init__(layers=views)
        self.main = self.layouts["alibi" if "alibi" in self.layouts else "rope"]

    def _empty_like(self) -> SinkCache:
        return SinkCache(self.n_sink, self.window, config=self.config, kv_dtype=self.kv_dtype)

    # -- counters -------------------------------------------------------------------------------------
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
    def pins(self) -> list[int]:
        """Each row's sinks: its first ``pin`` tokens stay in the cache for the whole stream."""
        return [r.pin for r in self.main.rows] if self.main.rows else [self.main.pin]

    def prefill_chunk(self, most: int | None = None) -> int:
        """The most tokens to feed a one-row stream in one forward (``chunk_for`` the row's window: what
        its sinks leave of the cache)."""
        return chunk_for(self.n_sink + self.window - self.pins[0], most)

    @property
    def tokens_cached(self) -> int:
        """Tokens stored now (at most ``n_sink + window``; the fullest row of a batch)."""
        return max(self.cached_per_row, default=0)

    # -- what a forward over rows of different lengths needs ------------------------------------------
    def position_ids(self, q: int = 1, device=None) -> torch.Tensor:
        """[B, q] positions of the next q tokens of every row (RoPE frame; ALiBi ignores them)."""
        start = torch.tensor([r.seen - r.shift for r in self.main.rows], device=device)
        return start[:, None] + torch.arange(q, device=device)

    def attention_mask(self, dtype=torch.float32, device=None):
        """The mask of a one-token-per-row step: a 4D additive mask [B, 1, 1, kv] (a dict per layer type
        for hybrid models; a 2D [B, kv] padding mask for ALiBi models, which build their bias from it)."""
        masks = {}
        for layout in self.layouts.values():
            rows = layout.after(1)
            lo, hi = layout.view(rows)
            valid = torch.stack([layout.valid(r, lo, hi) for r in rows]).to(device)
            if layout.kind == "alibi":
                return valid.long()
            m = torch.zeros(valid.shape, dtype=dtype, device=device).masked_fill(~valid, torch.finfo(dtype).min)
            masks["sliding_attention" if layout.is_sliding else "full_attention"] = m[:, None, None, :]
        return masks if len(masks) > 1 else masks["full_attention"]

    # -- rows -------------------------------------------------------------------------------------------
    @classmethod
    def stack(cls, caches: list[SinkCache]) -> SinkCache:
        """One batch cache whose rows are the given caches' rows, in order (their tensors are copied)."""
        if not caches:
            raise ValueError("nothing to stack")
        first = caches[0]
        for c in caches:
            if (c.n_sink, c.window, type(c.config)) != (first.n_sink, first.window, type(first.config)):
                raise ValueError("stacked caches must have the same n_sink, window and model")
            if not all(layout.initialized for layout in c.layouts.values()):
                raise ValueError("stacked caches must each have seen at least one token")
        out = first._empty_like()
        for kind, layout in out.layouts.items():
            parts = [c.layouts[kind] for c in caches]
            layout.rows = [copy.copy(r) for p in parts for r in p.rows]
            layout.set_buffers(Layout.joined(parts))
        return out

    def extract(self, rows: list[int]) -> SinkCache:
        """A new cache holding copies of the given rows (in that order); this one is unchanged."""
        if not rows:
            raise ValueError("nothing to extract")
        out = self._empty_like()
        for kind, layout in out.layouts.items():
            src = self.layouts[kind]
            layout.rows = [copy.copy(src.rows[b]) for b in rows]
            if src.initialized:
                idx = torch.tensor(rows, dtype=torch.long, device=src.keys.device)
                layout.set_buffers({name: t[:, idx] for name, t in src.buffers().items()})  # indexing copies
        return out

    def select_rows(self, rows: list[int]) -> None:
        """Keep only the given rows (in that order): finished streams leave a batch."""
        for layout in self.layouts.values():
            layout.take_rows(rows)

    # -- snapshots --------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta): everything needed to continue this stream exactly (see ``from_state``).
        Between forwards only; the tensors are the live buffers (copy them if the stream goes on)."""
        tensors = {f"{kind}.{name}": t for kind, layout in self.layouts.items() for name, t in layout.buffers().items()}
        meta = {
            "format": FORMAT,
            "n_sink": self.n_sink,
            "window": self.window,
            "kv_dtype": None if self.kv_dtype is None else str(self.kv_dtype).removeprefix("torch."),
            "model_type": getattr(self.config, "model_type", None),
            "layouts": {kind: {"rows": [dict(vars(r)) for r in layout.rows]} for kind, layout in self.layouts.items()},
        }
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, *, config, device=None) -> SinkCache:
        """The cache ``state()`` described, for a model with ``config`` (checked against the snapshot).
        Snapshots of the first format (one tensor per layer) load too."""
        if meta.get("format") not in (1, FORMAT):
            raise ValueError(f"unknown SinkCache snapshot format {meta.get('format')!r}")
        if meta.get("model_type") != getattr(config, "model_type", None):
            raise ValueError(f"snapshot is of a {meta.get('model_type')} model, not {config.model_type}")
        kv = meta.get("kv_dtype")
        out = cls(meta["n_sink"], meta["window"], config=config, kv_dtype=getattr(torch, kv) if kv else None)
        kinds = meta["layouts"] if meta["format"] == FORMAT else meta["counters"]
        if set(kinds) != set(out.layouts):
            raise ValueError("snapshot layer kinds do not match this model")
        if meta["format"] == 1:
            tensors = out._per_layout(tensors)
        for kind, layout in out.layouts.items():
            layout.rows = [Row(**{"pin": layout.n_sink, **r}) for r in kinds[kind]["rows"]]  # format 1: no pins
            if all(f"{kind}.{name}" in tensors for name in BUFFERS):
                # own, aligned memory; an ALiBi snapshot from before pins had fewer slots: the rest are free
                layout.set_buffers({n: _slots(tensors[f"{kind}.{n}"].to(device=device, copy=True), layout.cap)
                                    if n in ("keys", "values") else tensors[f"{kind}.{n}"].to(device=device, copy=True)
                                    for n in BUFFERS})  # fmt: skip
        return out

    def _per_layout(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Format 1's per-layer tensors (``layers.{i}.{name}``) stacked into this cache's per-layout ones."""
        out = {}
        for kind in self.layouts:
            indices = [i for i, layer in enumerate(self.layers) if layer.layout.kind == kind]
            for name in BUFFERS:
                keys = [f"layers.{i}.{name}" for i in indices]
                if all(k in tensors for k in keys):
                    out[f"{kind}.{name}"] = torch.stack([tensors[k] for k in keys])
        return out

    # -- one-token steps written by a fused decoder ------------------------------------------------------
    def advance_decode(self) -> DecodeStep:
        """Advance every row by one token and say where it goes (see ``DecodeStep``); the caller writes
        the keys. The sink slots of ``keys`` are then left as computed (``sink_delta`` None): a later
        transformers forward re-places them, a fused step reads ``sink_keys`` instead."""
        if set(self.layouts) != {"rope"}:
            raise ValueError("advance_decode is for caches whose layers are all RoPE sink layers")
        layout = self.layouts["rope"]
        step = DecodeStep([], [], [], [], [])
        for r in layout.rows:
            before = copy.copy(r)
            step.positions.append(r.seen - r.shift)
            layout.advance_row(r, 1)
            step.slots.append(layout.slot_of_new(before, r))
            step.sink_positions.append(step.positions[-1] - (layout.sink_target(r) or 0))
            step.lengths.append(r.pin + r.n_window if r.n_window else r.n_sinks)
            step.sinks.append(r.pin)
            r.sink_delta = None
        return step

    def decode_buffers(self) -> list[tuple[torch.Tensor, ...]]:
        """Every layer's (keys, values, sink_keys, sink_values), for a fused step (all RoPE sink layers)."""
        return self.layouts["rope"].per_layer

    def init_rows(self, batch: int, heads: int, head_dim: int, dtype, device) -> None:
        """Empty rows and buffers for ``batch`` rows (what the first transformers forward would make)."""
        for layout in self.layouts.values():
            layout.rows = [layout.new_row() for _ in range(batch)]
            layout.allocate(batch, heads, head_dim, head_dim, dtype, device)

    def rebase_due(self, q: int) -> bool:
        """Whether feeding ``q`` more tokens would take positions past ``n_sink + 2 * window``: the bound
        sinkstream keeps RoPE angles under (one window re-rotation per ~window tokens, amortized O(1))."""
        return "rope" in self.layouts and self.get_seq_length() + q > self.n_sink + 2 * self.window

    def rebase_if_due(self, q: int) -> int:
        """The cache's rebase policy in one call, for whoever feeds it: rebase when feeding ``q`` more
        tokens would pass the bound; returns the shift applied (0 if none was due)."""
        return self.rebase() if self.rebase_due(q) else 0

    def rebase(self) -> int:
        """Re-rotate every row's window once so its positions restart at ``n_sink``; returns the largest
        shift. RoPE only (ALiBi has no positions to rebase). Not for use under ``generate``."""
        if "rope" not in self.layouts:
            return 0
        main = self.layouts["rope"]
        amounts = [max(0, r.seen - r.n_window - r.shift - r.n_sinks) if r.n_window else 0 for r in main.rows]
        if not any(amounts):
            return 0
        for layout in self.layouts.values():
            for r, a in zip(layout.rows, amounts):
                r.shift += a
                if layout.kind == "rope":
                    r.sink_delta = layout.sink_target(r)
        for layout in self.layouts.values():
            layout.rotate_rows(amounts)
        return max(amounts)
