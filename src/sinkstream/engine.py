"""The streaming engine every front end uses: prefill, one decode step, sampling, generate().

    engine = Engine(model, tokenizer, n_sink=4, window=1020)
    for tok in engine.generate(prompt_ids, SamplingParams(max_new_tokens=64)):
        print(tok.text, end="", flush=True)

The cache is kept between calls, so a stream can go on for ever: each call prefills only the
new tokens. RoPE positions stay bounded: every ~window tokens the cache is rebased (one
re-rotation of the window), so positions never exceed ``n_sink + 2 * window``.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .cache import SinkCache
from .fused import FusedDecoder, select_decoder
from .kernels import fast_cpu_matmul
from .positions import ALIBI_FAMILIES
from .sampling import SamplingParams, sample


@dataclass
class Token:
    """One generated token: its id, and the text it completes (may be empty while held back)."""

    id: int
    text: str


@dataclass
class Stats:
    tokens_generated: int = 0
    tokens_prefilled: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    max_cache_tokens: int = 0
    rebases: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "interrupted"


def rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Detokenizer:
    """Incremental detokenization: emits text as it becomes final, holding back partial
    characters and any tail that could still become a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # final text so far
        self.emitted = 0
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.prefix, self.read = 0, 0  # offsets into ids, as in vLLM's incremental decoding

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (newly final text, whether a stop string was hit)."""
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        full = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            self.text += full[len(prefix_text) :]
            self.prefix, self.read = self.read, len(self.ids)
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        return self._take(len(self.text) - self.hold), False

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted : upto], upto
        return out


def eos_ids(model, tokenizer) -> set[int]:
    """The token ids that end an answer: the model's generation config's and the tokenizer's."""
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return ids


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

    One-token steps run their fp32 matmuls on oneDNN where that is fp32-exact (``fast_cpu_matmul``):
    with the decode weight layout it is 1.2x MKL here (README, issue 6). Their shapes are few (one
    per weight and batch size), so oneDNN's per-shape primitive cache stays small; many-row prefill
    chunks of every length keep PyTorch's default kernels."""
    rebased = False
    if rebase and isinstance(cache, SinkCache) and cache.rebase_due(ids.shape[-1]):
        rebased = cache.rebase() > 0
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
    ):
        if prefill_chunk is not None and prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be > 0, got {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.n_sink, self.window = n_sink, window
        # a chunk evicts its own length before it is attended; half a window keeps >= window/2 context
        self.prefill_chunk = min(prefill_chunk or max(1, window // 2), window)
        self.rebase = rebase and not dense
        self.dense = dense  # a plain growing cache instead (the baseline that breaks)
        self.kv_dtype = kv_dtype  # keys/values stored in this dtype (None: the model's)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eos_ids = eos_ids(model, tokenizer)
        # one-token steps: the fused decoder where it applies (``decode``: auto | fused | transformers)
        self.fused = None if dense else select_decoder(model, decode)
        self.stats = Stats()
        self.reset()

    def reset(self) -> None:
        """Forget the stream: a fresh, empty cache."""
        if self.dense:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self.model.config)
        else:
            self.cache = SinkCache(self.n_sink, self.window, config=self.model.config, kv_dtype=self.kv_dtype)
        self.last_logits: torch.Tensor | None = None
        self.unfed: int | None = None  # the last sampled token, not yet fed to the model
        self.stop_hit = False  # the last generate() ended on a stop string

    @property
    def tokens_seen(self) -> int:
        return self.cache.get_seq_length() if self.dense else self.cache.tokens_seen

    @property
    def tokens_cached(self) -> int:
        return self.cache.get_seq_length() if self.dense else self.cache.tokens_cached

    def cache_bytes(self) -> int:
        """Bytes held by the cache's key/value tensors (each storage counted once)."""
        seen, total = set(), 0
        for layer in self.cache.layers:
            for t in vars(layer).values():
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
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
        self.unfed = None
        return self.forward(torch.tensor([[token_id]], device=self.device))

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Iterator[Token]:
        """Prefill ``prompt_ids`` then yield tokens as they are sampled.

        Stops on an EOS token (not yielded, not fed), a stop string (the text is cut before it),
        or ``max_new_tokens``. The last sampled token is not fed to the model: the next call
        feeds whatever the caller passes (a chat feeds the end-of-turn marker).
        """
        params = params or SamplingParams()
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        logits = self.prefill(prompt_ids)
        self.unfed = None
        self.stop_hit = False
        detok = Detokenizer(self.tokenizer, params.stop)
        self.stats.finish_reason = "length"
        t0 = time.perf_counter()
        next_id = -1
        try:
            for i in range(params.max_new_tokens):
                if i:
                    logits = self.step(next_id)
                next_id = int(sample(logits, params, gen)[0])
                if next_id in self.eos_ids:
                    self.stats.finish_reason = "stop"
                    break
                self.stats.tokens_generated += 1
                self.unfed = next_id
                text, hit = detok.add(next_id)
                yield Token(next_id, text)
                if hit:
                    self.stop_hit = True
                    self.stats.finish_reason = "stop"
                    break
            tail = detok.flush()
            if tail:
                yield Token(-1, tail)
        finally:
            self.stats.decode_s += time.perf_counter() - t0
            self.last_text = detok.text

    @torch.no_grad()
    def generate_batch(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None
    ) -> Iterator[tuple[int, Token]]:
        """Independent streams decoded together: yields ``(prompt index, Token)`` as tokens come.

        Each prompt is prefilled alone (exactly as ``generate`` would), then all rows decode in one
        batched step per token, each at its own length and position; a row leaves the batch when it
        stops. With a seed, every row gets its own generator seeded alike, so each row samples what it
        would alone. The engine's own stream is reset."""
        params = params or SamplingParams()
        if not prompts:
            return
        caches, logits = [], []
        for ids in prompts:
            self.reset()
            logits.append(self.prefill(ids))
            caches.append(self.cache)
        self.reset()
        cache = SinkCache.stack(caches)
        del caches
        logits = torch.cat(logits)
        gens = None
        if params.seed is not None:
            gens = [torch.Generator(device=self.device).manual_seed(params.seed) for _ in prompts]
        rows = list(range(len(prompts)))  # prompt index of every live batch row
        detoks = [Detokenizer(self.tokenizer, params.stop) for _ in prompts]
        t0 = time.perf_counter()
        next_ids = torch.empty(0, dtype=torch.long)
        try:
            for i in range(params.max_new_tokens):
                if i:
                    logits = self._forward(cache, next_ids[:, None], rows_differ=len(rows) > 1)
                next_ids = sample(logits, params, gens)
                keep = []
                for b, p in enumerate(rows):
                    tid = int(next_ids[b])
                    if tid in self.eos_ids:
                        continue
                    self.stats.tokens_generated += 1
                    text, hit = detoks[p].add(tid)
                    yield p, Token(tid, text)
                    if not hit:
                        keep.append(b)
                if not keep or i == params.max_new_tokens - 1:
                    break
                if len(keep) < len(rows):  # finished streams leave the batch
                    cache.select_rows(keep)
                    next_ids = next_ids[keep]
                    rows = [rows[b] for b in keep]
                    if gens is not None:
                        gens = [gens[b] for b in keep]
            for p, d in enumerate(detoks):
                tail = d.flush()
                if tail:
                    yield p, Token(-1, tail)
        finally:
            self.stats.decode_s += time.perf_counter() - t0

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
            "tokens_per_s": round(s.tokens_generated / total_s, 2) if total_s else 0.0,
            "decode_tokens_per_s": round(s.tokens_generated / s.decode_s, 2) if s.decode_s else 0.0,
            "prefill_tokens_per_s": round(s.tokens_prefilled / s.prefill_s, 2) if s.prefill_s else 0.0,
            "rebases": s.rebases,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
