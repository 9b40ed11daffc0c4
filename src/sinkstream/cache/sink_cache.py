"""``SinkCache``: the transformers ``Cache`` over the layers of every layout a model has."""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache

from ..positions import layer_kinds, rope_for
from .counters import DecodeStep, LayoutCounters, Row
from .layers import SinkLayer


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
                self.counters[kind] = LayoutCounters(
                    kind, 0, config.sliding_window, rope_for(config, "sliding_attention")
                )
            elif kind == "alibi":
                self.counters[kind] = LayoutCounters(kind, n_sink, window, None)
            else:
                self.counters[kind] = LayoutCounters(kind, n_sink, window, rope_for(config, "full_attention"))
        super().__init__(layers=[SinkLayer.for_layout(self.counters[k], kv_dtype) for k in kinds])
        self.main = self.counters["alibi" if "alibi" in self.counters else "rope"]

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
            "counters": {
                k: {"step": t.step, "rows": [dict(vars(r)) for r in t.rows]} for k, t in self.counters.items()
            },
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

    def rebase_if_due(self, q: int) -> int:
        """The cache's rebase policy in one call, for whoever feeds it: rebase when feeding ``q`` more
        tokens would pass the bound; returns the shift applied (0 if none was due)."""
        return self.rebase() if self.rebase_due(q) else 0

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
