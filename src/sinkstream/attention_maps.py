"""Attention sinks, seen: average attention maps per layer and the attention mass on the first token.

The paper's Figure 2: over a short text, most layers past the first two put a large share of every
query's attention on the first token, whatever it is. ``attention_maps`` runs one eager forward with
``output_attentions`` and averages over heads; ``plot_maps`` and ``plot_first_token`` draw them.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def attention_maps(model, ids: torch.Tensor, per_head: bool = False) -> np.ndarray:
    """[layers, q, k] attention averaged over heads (and the batch) for ``ids`` [n]; with ``per_head``,
    [layers, heads, q, k]."""
    from .attention import ZERO_EAGER, register_zero, sink_mode

    before = model.config._attn_implementation
    eager = "eager"  # the implementation that returns weights
    if sink_mode(model.config) == "zero":  # softmax-off-by-one: weights over the keys sum to < 1
        eager = ZERO_EAGER
        register_zero()
    if before != eager:
        model.set_attn_implementation(eager)
    try:
        device = next(model.parameters()).device
        out = model(ids.reshape(1, -1).to(device), output_attentions=True, use_cache=False)
    finally:
        if before != eager:
            model.set_attn_implementation(before)
    if not out.attentions or out.attentions[0] is None:
        raise ValueError(f"{model.config.model_type} does not return attention weights")
    dims = 0 if per_head else (0, 1)
    return np.stack([a.float().mean(dim=dims).cpu().numpy() for a in out.attentions])


def first_token_mass(maps: np.ndarray) -> np.ndarray:
    """Per layer: mean attention that queries 1..n-1 put on token 0 (query 0 can only see itself)."""
    return maps[:, 1:, 0].mean(axis=1)


def sink_head_mass(head_maps: np.ndarray) -> np.ndarray:
    """Per layer: the strongest head's mean attention on token 0 from the second half of the queries.

    ``head_maps`` is [layers, heads, q, k]. Averaging over heads and over early queries (which see few
    tokens) hides a sink that only some heads form; late queries of a sink head still put a large share
    on token 0, while uniform attention gives about ln(2) / (n / 2) there.
    """
    n = head_maps.shape[-1]
    return head_maps[:, :, n // 2 :, 0].mean(axis=2).max(axis=1)
