"""How the next token is picked: penalties, temperature, top-k, top-p, min-p, greedy.

The order is that of vLLM and llama.cpp: the penalties change the raw logits (a repetition penalty
over the recent tokens, as transformers' ``RepetitionPenaltyLogitsProcessor``; OpenAI's presence and
frequency penalties over the answer so far), then temperature scales them, then top-k, top-p and
min-p (transformers' ``MinPLogitsWarper``) cut the distribution. Greedy decoding takes the argmax of
the penalized logits, so a repetition penalty works without sampling.

Sampling is defined for every value the options admit and every row of finite logits, so that one
request's parameters can never make another request's step fail:

- ``temperature`` below ``GREEDY_BELOW`` (1e-5, as vLLM) is greedy: dividing by it would overflow
  float32 (a temperature of 1e-300 is 0 there) and the distribution is a point mass anyway.
- ``top_p`` always keeps the likeliest token, so a ``top_p`` that is 0 in float32 keeps exactly one.
- ``top_k`` at or above the vocabulary keeps everything; ties at the k-th value are all kept.
- logits are shifted by their maximum before scaling, so huge ranges underflow to probability 0
  instead of overflowing; ``+inf`` logits share the whole mass equally; ``-inf`` ones get none.
- a row with a NaN logit, or with every logit ``-inf``, cannot be sampled: ``SamplingError`` names it.
  (The model produced it; the caller fails that row's request alone.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

GREEDY_BELOW = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
# A penalty far below 1 would underflow to 0 in float32 and divide logits by it (0 / 0 is NaN).
REPETITION_PENALTY = (0.01, 10.0)


class SamplingError(ValueError):
    """A row of logits that no token can be drawn from (NaN, or every token at -inf)."""


@dataclass
class SamplingParams:
    """How to pick tokens. ``temperature`` below ``GREEDY_BELOW`` (0 included) is greedy.

    ``repetition_penalty`` (in [0.01, 10]; 1 is off) divides positive logits and multiplies negative ones of
    every token among the last ``penalty_last_n`` tokens of the turn (its prompt and its answer; 0:
    all of them). ``presence_penalty`` is subtracted once from every token the answer already holds,
    ``frequency_penalty`` once per occurrence (both in [-2, 2], OpenAI's meaning). ``min_p`` drops
    tokens less likely than ``min_p`` times the likeliest one."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN fails too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not REPETITION_PENALTY[0] <= self.repetition_penalty <= REPETITION_PENALTY[1]:  # NaN fails too
            raise ValueError(f"repetition_penalty must be in [0.01, 10], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.penalty_last_n < 0:
            raise ValueError(f"penalty_last_n must be >= 0, got {self.penalty_last_n}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def penalize(
    logits: torch.Tensor, params: SamplingParams, recent: Sequence[int], answer: Sequence[int]
) -> torch.Tensor:
    """``logits`` [1, V] with the penalties applied: the repetition penalty over ``recent`` (the
    turn's tokens, the last ``penalty_last_n`` of which count), presence and frequency over ``answer``."""
    if params.repetition_penalty != 1.0 and recent:
        window = recent[-params.penalty_last_n :] if params.penalty_last_n else recent
        ids = torch.tensor([list(window)], device=logits.device)
        logits = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, logits.float())
    if (params.presence_penalty or params.frequency_penalty) and answer:
        ids = torch.tensor(list(answer), device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]].to(torch.float32)
        logits = logits.float() - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    return logits


def _checked(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits [B, V] with every row drawable: ``+inf`` entries become 0 and the rest ``-inf``."""
    x = logits.float()
    if torch.isnan(x).any():
        rows = torch.isnan(x).any(-1).nonzero().flatten().tolist()
        raise SamplingError(f"the model's logits are NaN (batch rows {rows})")
    pos = x == math.inf
    if pos.any():
        hot = pos.any(-1, keepdim=True)
        x = torch.where(hot, torch.where(pos, 0.0, -math.inf), x)
    if (x == -math.inf).all(-1).any():
        raise SamplingError("every token has logit -inf: nothing can be sampled")
    return x


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution ``sample`` draws from: float32 [B, V], finite, each row summing to 1."""
    x = _checked(logits)
    if params.greedy:  # a point mass on the first maximum
        return torch.zeros_like(x).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
    x = (x - x.max(-1, keepdim=True).values) / params.temperature  # the max is 0: no overflow, no 0/0
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True, stable=True, dim=-1)
        p = sorted_x.softmax(-1)
        drop = p.cumsum(-1) - p >= params.top_p  # keep the smallest set reaching top_p ...
        drop[..., 0] = False  # ... and never less than the likeliest token
        x = torch.full_like(x, -math.inf).scatter(-1, order, sorted_x.masked_fill(drop, -math.inf))
    if params.min_p > 0:
        x = MinPLogitsWarper(params.min_p)(None, x)
    return x.softmax(-1)


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | list[torch.Generator] | None = None
) -> torch.Tensor:
    """Pick next tokens from ``logits`` [B, V] -> [B]. A list of generators gives each row its own."""
    if params.greedy:
        return _checked(logits).argmax(dim=-1)
    probs = probabilities(logits, params)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
