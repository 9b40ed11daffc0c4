"""Long-text perplexity: per-token negative log-likelihood of a text under one of three methods.

``streaming``  the text streams through ``n_sink`` sinks + a ``window`` (``n_sink=0``: plain window
               attention). Computed exactly in chunks (``eval.exact``) where the family's attention
               goes through transformers' interface, token by token through ``SinkCache`` otherwise.
``dense``      a plain growing cache; past the model's maximum positions it is out of its training
               range (reported), and it stops at ``dense_limit`` tokens (memory grows without bound).
``recompute``  every target predicted by a from-scratch forward over the ``window`` preceding tokens
               at positions 0..window-1 (the paper's quality and speed baseline); ``stride`` keeps it
               affordable by evaluating every ``stride``-th target only.

NLL arrays have one entry per target (token ``t + 1`` given tokens ``<= t``), NaN where not evaluated.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from ..cache import SinkCache
from ..cpu_matmul import fast_cpu_matmul
from .exact import exact_stream_logits, supports_exact

METHODS = ("streaming", "dense", "recompute")


def _nll_rows(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    lp = torch.log_softmax(logits.float(), dim=-1)
    return (-lp.gather(1, targets[:, None])[:, 0]).double().cpu().numpy()


@torch.no_grad()
def streaming_nll(
    model,
    ids: torch.Tensor,
    n_sink: int,
    window: int,
    chunk: int = 256,
    positions: str = "cache",
    progress: bool = True,
) -> np.ndarray:
    """NLL of ``ids[1:]`` streamed through sinks + window, as token-by-token streaming gives it."""
    ids = ids.reshape(-1)
    n = ids.shape[0]
    out = np.full(n - 1, np.nan)
    bar = tqdm(total=n, unit="tok", disable=not progress, desc=f"streaming {n_sink}+{window}")
    if supports_exact(model):
        with fast_cpu_matmul():
            for s, logits in exact_stream_logits(
                model, ids, n_sink, window, chunk=min(chunk, window) or 1, positions=positions
            ):
                c = logits.shape[0]
                m = min(c, n - 1 - s)
                if m > 0:
                    out[s : s + m] = _nll_rows(logits[:m], ids[s + 1 : s + 1 + m].to(logits.device))
                bar.update(c)
    else:
        if positions != "cache":
            raise ValueError(f"--positions text needs exact chunked evaluation, which {model.config.model_type} lacks")
        device = next(model.parameters()).device
        cache = SinkCache(n_sink, window, config=model.config)
        for t in range(n - 1):
            cache.rebase_if_due(1)
            logits = model(ids[t : t + 1].to(device)[None], past_key_values=cache, use_cache=True).logits[0]
            out[t] = _nll_rows(logits, ids[t + 1 : t + 2].to(device))[0]
            bar.update(1)
    bar.close()
    return out


@torch.no_grad()
def dense_nll(
    model, ids: torch.Tensor, chunk: int = 256, limit: int | None = None, progress: bool = True
) -> np.ndarray:
    """NLL with a plain growing cache, up to ``limit`` tokens (NaN after)."""
    from transformers import DynamicCache

    ids = ids.reshape(-1)
    n = ids.shape[0] if limit is None else min(ids.shape[0], limit)
    device = next(model.parameters()).device
    out = np.full(ids.shape[0] - 1, np.nan)
    cache = DynamicCache(config=model.config)
    with fast_cpu_matmul():
        for s in tqdm(range(0, n, chunk), disable=not progress, desc="dense", unit="chunk"):
            x = ids[s : min(s + chunk, n)].to(device)[None]
            logits = model(x, past_key_values=cache, use_cache=True).logits[0]
            m = min(x.shape[1], ids.shape[0] - 1 - s)
            if m > 0:
                out[s : s + m] = _nll_rows(logits[:m], ids[s + 1 : s + 1 + m].to(device))
    return out


@torch.no_grad()
def recompute_nll(
    model, ids: torch.Tensor, window: int, stride: int = 1, first: int = 0, progress: bool = True, keep_first: int = 0
) -> np.ndarray:
    """NLL of every ``stride``-th target, each from a fresh forward over the ``window`` preceding tokens
    (``keep_first``: the stream's first tokens, e.g. a trained sink token, start every window)."""
    ids = ids.reshape(-1)
    device = next(model.parameters()).device
    out = np.full(ids.shape[0] - 1, np.nan)
    with fast_cpu_matmul():
        for t in tqdm(range(first, ids.shape[0] - 1, stride), disable=not progress, desc=f"recompute {window}"):
            lo = max(keep_first, t - (window - keep_first) + 1)
            x = torch.cat([ids[:keep_first], ids[lo : t + 1]]).to(device)[None]
            logits = model(x, use_cache=False, logits_to_keep=1).logits[0]
            out[t] = _nll_rows(logits, ids[t + 1 : t + 2].to(device))[0]
    return out


def perplexity(nll: np.ndarray) -> float:
    vals = nll[~np.isnan(nll)]
    return float(np.exp(vals.mean())) if vals.size else float("nan")


def run_method(
    model,
    ids: torch.Tensor,
    method: str,
    n_sink: int,
    window: int,
    *,
    chunk: int = 256,
    positions: str = "cache",
    stride: int = 1,
    first: int = 0,
    dense_limit: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, dict]:
    """(nll, info) for one method; ``first`` targets before it (a sink prefix) are not evaluated."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
    t0 = time.perf_counter()
    if method == "streaming":
        nll = streaming_nll(model, ids, n_sink, window, chunk=chunk, positions=positions, progress=progress)
    elif method == "dense":
        nll = dense_nll(model, ids, chunk=chunk, limit=dense_limit, progress=progress)
    else:
        nll = recompute_nll(model, ids, window, stride=stride, first=first, progress=progress)
    secs = time.perf_counter() - t0
    nll[:first] = np.nan
    evaluated = int((~np.isnan(nll)).sum())
    info = {
        "method": method,
        "ppl": round(perplexity(nll), 4),
        "targets": evaluated,
        "seconds": round(secs, 1),
        "ms_per_target": round(1000 * secs / max(1, evaluated), 3),
    }
    if method == "streaming":
        info |= {"n_sink": n_sink, "window": window, "positions": positions, "exact_chunks": supports_exact(model)}
    if method == "recompute":
        info |= {"window": window, "stride": stride}
    if method == "dense":
        max_pos = getattr(model.config, "max_position_embeddings", None)
        done = int(np.flatnonzero(~np.isnan(nll)).max()) + 1 if evaluated else 0
        info |= {"max_positions": max_pos, "stopped_at": done}
        if max_pos and done > max_pos:
            info["ppl_within_max_positions"] = round(perplexity(nll[:max_pos]), 4)
            info["ppl_past_max_positions"] = round(perplexity(nll[max_pos:]), 4)
    return nll, info
