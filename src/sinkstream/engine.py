"""The streaming engine every front end uses: prefill, one decode step, sampling, generate().

    engine = Engine(model, tokenizer, n_sink=4, window=1020)
    for tok in engine.generate(prompt_ids, SamplingParams(max_new_tokens=64)):
        print(tok.text, end="", flush=True)

The cache is kept between calls, so a stream can go on for ever: each call prefills only the
new tokens. RoPE positions stay bounded: every ~window tokens the cache is rebased (one
re-rotation of the window), so positions never exceed ``n_sink + 2 * window``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .cache import SinkCache
from .cache.sink_cache import chunk_for
from .cpu_matmul import fast_cpu_matmul
from .decoding import DecodeBatch, RowState, eos_ids
from .fused import FusedDecoder, select_decoder
from .memory import peak_rss_mb
from .positions import ALIBI_FAMILIES
from .sampling import SamplingParams

__all__ = ["Engine", "Generation", "SamplingParams", "Token", "forward_stream"]


@dataclass
class Token:
    """One generated token: its id, and the text it completes (may be empty while held back)."""

    id: int
    text: str


class Generation:
    """One ``generate`` call: iterate it for its tokens; its ``row`` (``decoding.RowState``) then says how
    the answer ended (``finish_reason``, ``text`` cut before a stop string, ``generated`` ids,
    ``last_unfed``: whether the last one is not in the cache yet)."""

    def __init__(self, tokens: Iterator[Token], row: RowState):
        self._tokens, self.row = tokens, row

    def __iter__(self) -> Iterator[Token]:
        return self._tokens

    def close(self) -> None:
        """Stop early (the tokens sampled so far stay in the cache, the last one unfed)."""
        self._tokens.close()


@dataclass
class Stats:
    tokens_generated: int = 0
    tokens_prefilled: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    max_cache_tokens: int = 0
    rebases: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "interrupted"


def forward_stream(
    model,
    cache,
    ids: torch.Tensor,
    *,
    rows_differ: bool = False,
    rebase: bool = True,
    fused: FusedDecoder | None = None,
) -> tuple[torch.Tensor, bool]:
    """Feed ``ids`` [B, q] to ``model`` through ``cache``; return (last logits [B, V], whether the
    cache was rebased first). ``rows_differ``: the rows are streams of different lengths (per-row
    positions and mask). The one forward the engine and the server's worker share. With ``fused``,
    one-token steps run the fused decoder over the same cache; chunks run the transformers forward.

    One-token steps run their fp32 matmuls on oneDNN where that is fp32-exact (``fast_cpu_matmul``),
    faster than MKL with the decode weight layout. Their shapes are few (one per weight and batch
    size), so oneDNN's per-shape primitive cache stays small; many-row prefill chunks of every length
    keep PyTorch's default kernels."""
    rebased = rebase and isinstance(cache, SinkCache) and cache.rebase_if_due(ids.shape[-1]) > 0
    if fused is not None and ids.shape[-1] == 1 and isinstance(cache, SinkCache):
        return fused.step(cache, ids[:, 0]), rebased
    kw = {}
    if rows_differ:
        kw["attention_mask"] = cache.attention_mask(model.dtype, ids.device)
        if getattr(model.config, "model_type", None) not in ALIBI_FAMILIES:
            kw["position_ids"] = cache.position_ids(ids.shape[-1], ids.device)
    one_row = ids.shape[-1] == 1 and ids.device.type == "cpu"
    with fast_cpu_matmul() if one_row else nullcontext():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **kw)
    return out.logits[:, -1], rebased


class Engine:
    """A model plus one streaming SinkCache (batch of one stream)."""

    def __init__(
        self,
        model,
        tokenizer,
        n_sink: int = 4,
        window: int = 1020,
        *,
        prefill_chunk: int | None = None,
        rebase: bool = True,
        dense: bool = False,
        decode: str = "auto",
        kv_dtype: torch.dtype | None = None,
        pin: int | None = None,
    ):
        if prefill_chunk is not None and prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be > 0, got {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.n_sink, self.window = n_sink, window
        self.max_chunk = prefill_chunk  # the configured chunk (None: half the stream's window, ``reset``)
        self.pin = pin  # the sinks of new streams (``SinkCache(pin=)``; None: n_sink)
        self.rebase = rebase and not dense
        self.dense = dense  # a plain growing cache instead (the baseline that breaks)
        self.kv_dtype = kv_dtype  # keys/values stored in this dtype (None: the model's)
        self.device = next(model.parameters()).device
        self.eos_ids = eos_ids(model, tokenizer)
        # one-token steps: the fused decoder where it applies (``decode``: auto | fused | transformers)
        self.fused = None if dense else select_decoder(model, decode)
        self.stats = Stats()
        self.reset()

    def reset(self, pin: int | None = None) -> None:
        """Forget the stream: a fresh, empty cache whose sinks are the stream's first ``pin`` tokens (a
        pinned prefix; default: the engine's ``pin``, else ``n_sink``)."""
        pin = self.pin if pin is None else pin
        if self.dense:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self.model.config)
            self.prefill_chunk = chunk_for(self.window, self.max_chunk)
        else:
            self.cache = SinkCache(self.n_sink, self.window, config=self.model.config, kv_dtype=self.kv_dtype, pin=pin)
            self.prefill_chunk = self.cache.prefill_chunk(self.max_chunk)
        self.last_logits: torch.Tensor | None = None

    @property
    def tokens_seen(self) -> int:
        return self.cache.get_seq_length() if self.dense else self.cache.tokens_seen

    @property
    def tokens_cached(self) -> int:
        return self.cache.get_seq_length() if self.dense else self.cache.tokens_cached

    def cache_bytes(self) -> int:
        """Bytes held by the cache's key/value tensors (each storage counted once)."""
        if isinstance(self.cache, SinkCache):
            tensors = [t for layout in self.cache.layouts.values() for t in layout.buffers().values()]
        else:
            tensors = [t for layer in self.cache.layers for t in (layer.keys, layer.values) if t is not None]
        seen, total = set(), 0
        for t in tensors:
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids`` [1, q] (q <= window) through the model; return the last logits [1, V]."""
        return self._forward(self.cache, ids)

    def _forward(self, cache: SinkCache, ids: torch.Tensor, rows_differ: bool = False) -> torch.Tensor:
        logits, rebased = forward_stream(
            self.model, cache, ids, rows_differ=rows_differ, rebase=self.rebase, fused=self.fused
        )
        self.stats.rebases += rebased
        self.stats.max_cache_tokens = max(self.stats.max_cache_tokens, self.tokens_cached)
        if cache is self.cache:
            self.last_logits = logits
        return logits

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Stream ``ids`` through the cache in chunks; return the logits after the last one."""
        if len(ids) == 0:
            if self.last_logits is None:
                raise ValueError("nothing to prefill: empty prompt on an empty stream")
            return self.last_logits
        t0 = time.perf_counter()
        ids_t = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)[None]
        for s in range(0, ids_t.shape[-1], self.prefill_chunk):
            self.forward(ids_t[:, s : s + self.prefill_chunk])
        self.stats.tokens_prefilled += len(ids)
        self.stats.prefill_s += time.perf_counter() - t0
        return self.last_logits

    def step(self, token_id: int) -> torch.Tensor:
        """One decode step: feed one token, return the next logits."""
        return self.forward(torch.tensor([[token_id]], device=self.device))

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, constraint=None) -> Generation:
        """Prefill ``prompt_ids`` then yield tokens as they are sampled (iterate the result; afterwards
        it holds why the answer ended, its text and ids).

        Stops on an EOS token (not yielded, not fed), a stop string (the text is cut before it),
        or ``max_new_tokens``. The last sampled token is not fed to the model: the next call
        feeds whatever the caller passes (a chat feeds the end-of-turn marker). A ``constraint``
        (``grammar.Grammars``) holds the answer to a grammar.
        """
        row = self._row(params or SamplingParams(), prompt_ids, constraint)
        return Generation(self._generate_one(prompt_ids, row), row)

    def _generate_one(self, prompt_ids: Sequence[int], row: RowState) -> Iterator[Token]:
        logits = self.prefill(prompt_ids)
        for _, token in self._decode(self.cache, [row], logits):
            yield token
        self.stats.finish_reason = row.finish_reason

    @torch.no_grad()
    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        constraints: Sequence | None = None,
        pins: Sequence[int] | None = None,
    ) -> Iterator[tuple[int, Token]]:
        """Independent streams decoded together: yields ``(prompt index, Token)`` as tokens come.

        Each prompt is prefilled alone (exactly as ``generate`` would), then all rows decode in one
        batched step per token, each at its own length and position; a row leaves the batch when it
        stops. With a seed, every row gets its own generator seeded alike, so each row samples what it
        would alone. ``constraints`` (one per prompt, or None) hold rows to grammars; ``pins`` (one per
        prompt, or None) are the rows' pinned prefixes (``reset``). The engine's own stream is reset."""
        params = params or SamplingParams()
        if not prompts:
            return
        caches, logits = [], []
        for ids, pin in zip(prompts, pins or [None] * len(prompts)):
            self.reset(pin)
            logits.append(self.prefill(ids))
            caches.append(self.cache)
        self.reset()
        cache = SinkCache.stack(caches)
        del caches
        constraints = constraints or [None] * len(prompts)
        rows = [self._row(params, ids, c) for ids, c in zip(prompts, constraints)]
        yield from self._decode(cache, rows, torch.cat(logits))

    def _row(self, params: SamplingParams, prompt_ids: Sequence[int], constraint=None) -> RowState:
        return RowState.start(
            self.tokenizer, params, self.eos_ids, self.device, prompt_ids=list(prompt_ids), constraint=constraint
        )

    @torch.no_grad()
    def _decode(self, cache, rows: list[RowState], logits: torch.Tensor) -> Iterator[tuple[int, Token]]:
        """The decode loop (``DecodeBatch``): every live row samples and takes its token, those that go
        on are fed in one step, rows that finished leave the batch. Yields (row, Token)."""
        batch = DecodeBatch()
        for r, row in enumerate(rows):
            batch.add(row, logits[r : r + 1], owner=r)
        t0 = time.perf_counter()
        try:
            while len(batch):
                live = batch.owners
                step = batch.step()
                for r, outcome in zip(live, step.rows):
                    yield from ((r, token) for token in self._tokens(outcome))
                if not step.keep:
                    return
                if step.dropped:
                    cache.select_rows(step.keep)
                ids = torch.tensor(step.next_ids, device=self.device)[:, None]
                batch.fed(self._forward(cache, ids, rows_differ=len(step.keep) > 1))
        finally:
            self.stats.decode_s += time.perf_counter() - t0

    def _tokens(self, outcome) -> Iterator[Token]:
        if outcome.text is not None:
            self.stats.tokens_generated += 1
            yield Token(outcome.token, outcome.text)
        if outcome.tail:
            yield Token(-1, outcome.tail)

    def summary(self) -> dict:
        """Stats of everything this engine did, as one JSON-able dict."""
        s = self.stats
        total_s = s.prefill_s + s.decode_s
        return {
            "tokens_generated": s.tokens_generated,
            "tokens_prefilled": s.tokens_prefilled,
            "tokens_seen": self.tokens_seen,
            "tokens_cached": self.tokens_cached,
            "max_cache_tokens": s.max_cache_tokens,
            "cache_capacity": None if self.dense else self.n_sink + self.window,
            "tokens_pinned": None if self.dense else self.cache.pins[0],
            "tokens_per_s": round(s.tokens_generated / total_s, 2) if total_s else 0.0,
            "decode_tokens_per_s": round(s.tokens_generated / s.decode_s, 2) if s.decode_s else 0.0,
            "prefill_tokens_per_s": round(s.tokens_prefilled / s.prefill_s, 2) if s.prefill_s else 0.0,
            "rebases": s.rebases,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
