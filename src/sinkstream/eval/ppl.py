"""Streaming perplexity: per-token negative log-likelihood of a text streamed through a SinkCache.

The text is fed in chunks with every position's logits kept; a chunk of ``c`` tokens attends to the
sinks, the ``window - c`` tokens before it and itself causally (the engine's prefill rule), so a
small chunk is close to token-by-token decoding. Positions are rebased as the engine does.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from ..cache import SinkCache


@torch.no_grad()
def streaming_nll(model, ids: torch.Tensor, n_sink: int, window: int, chunk: int = 64,
                  progress: bool = True) -> np.ndarray:
    """NLL (nats, float64) of ``ids[1:]`` [N-1] given everything before, through sinks + window."""
    if ids.dim() == 1:
        ids = ids[None]
    if not 0 < chunk <= window:
        raise ValueError(f"chunk must be in [1, window], got {chunk}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    n = ids.shape[1]
    cache = SinkCache(n_sink, window, config=model.config)
    out = np.empty(n - 1, dtype=np.float64)
    prev = None  # logits of the last token of the previous chunk
    bar = tqdm(total=n, unit="tok", disable=not progress, desc=f"stream {n_sink}+{window}")
    for s in range(0, n, chunk):
        x = ids[:, s : s + chunk]
        if cache.get_seq_length() + x.shape[1] > n_sink + 2 * window:
            cache.rebase()
        logits = model(x, past_key_values=cache, use_cache=True).logits[0].float()
        if prev is not None:
            logits = torch.cat([prev, logits])
            first = s - 1
        else:
            first = 0
        targets = ids[0, first + 1 : s + x.shape[1] + 1]
        lp = torch.log_softmax(logits[: targets.shape[0]], dim=-1)
        out[first : first + targets.shape[0]] = (-lp.gather(1, targets[:, None])[:, 0]).double().cpu().numpy()
        prev = logits[-1:]
        bar.update(x.shape[1])
    bar.close()
    return out


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(nll.mean()))
