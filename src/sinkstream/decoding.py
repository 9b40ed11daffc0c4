"""Decoding, the same wherever tokens are sampled: the engine, its batches and the server's worker.

A ``RowState`` holds what one stream needs between steps (its sampling parameters and generator,
its logit bias, its detokenizer, what it generated) and decides, token by token, whether the
answer goes on: an end-of-sequence token ends it unseen, a stop string ends it with the text cut
before the string, ``max_new_tokens`` ends it at length. The last sampled token is never fed to
the model by the loop: whoever continues the stream decides what to feed next (a chat feeds the
end-of-turn marker).

A ``DecodeBatch`` is the decode loop's one step, for any number of rows: sample every row with its
own parameters, let it take its token, drop the rows that finished, and say which tokens to feed.
The caller runs the forward over its cache (and drops the finished rows from it); the engine and the
server's worker differ only in what they do with each row's outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .sampling import SamplingParams, penalize, sample

if TYPE_CHECKING:
    from .grammar import Constraint


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


@dataclass
class RowState:
    """One stream being decoded. ``finish_reason`` is None while it goes on, then ``stop`` or
    ``length``; ``text`` is the answer so far (cut before a stop string)."""

    params: SamplingParams
    detok: Detokenizer
    eos_ids: set[int]
    generator: torch.Generator | None = None
    bias: torch.Tensor | None = None  # [V], added to the logits before sampling
    recent: list[int] = field(default_factory=list)  # the turn's tokens so far: its prompt, then its answer
    constraint: Constraint | None = None  # a grammar the answer must follow (``grammar``)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_hit: bool = False
    last_unfed: bool = False  # the last generated token has not been fed to the model

    @classmethod
    def start(
        cls, tokenizer, params: SamplingParams, eos: set[int], device, logit_bias=None, vocab=None, prompt_ids=(),
        constraint: Constraint | None = None,
    ):  # fmt: skip
        """A fresh row: its own generator (seeded alike for every row with the same seed) and bias;
        ``prompt_ids`` (the turn's prompt) are the first tokens the repetition penalty sees."""
        gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        bias = None
        if logit_bias:
            bias = torch.zeros(vocab, device=device)
            bias[list(logit_bias)] = torch.tensor(list(logit_bias.values()), device=device)
        recent = list(prompt_ids[-params.penalty_last_n :] if params.penalty_last_n else prompt_ids)
        return cls(params, Detokenizer(tokenizer, params.stop), eos, gen, bias, recent, constraint)

    @property
    def text(self) -> str:
        return self.detok.text

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits [1, V], with its parameters, bias and generator."""
        if self.bias is not None:
            logits = logits + self.bias[: logits.shape[-1]]
        logits = penalize(logits, self.params, self.recent, self.generated)
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        return int(sample(logits, self.params, self.generator)[0])

    def accept(self, tid: int) -> str | None:
        """Take the sampled ``tid``: None if it ends the answer unseen (EOS), else the newly final text
        (may be empty). Sets ``finish_reason`` when the answer is over."""
        if self.constraint is not None:
            self.constraint.accept(tid)
        if tid in self.eos_ids:
            self.finish_reason = "stop"
            return None
        self.generated.append(tid)
        self.recent.append(tid)
        if self.params.penalty_last_n and len(self.recent) > 2 * self.params.penalty_last_n:
            del self.recent[: -self.params.penalty_last_n]  # bounded, however long the answer
        self.last_unfed = True
        text, hit = self.detok.add(tid)
        if hit:
            self.stop_hit, self.finish_reason = True, "stop"
        elif len(self.generated) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        return text

    def fed(self) -> None:
        """The last generated token went into the model."""
        self.last_unfed = False

    def flush(self) -> str:
        """The text held back until the end (a partial stop string that never completed)."""
        return self.detok.flush()

    def step(self, logits: torch.Tensor) -> RowStep:
        """Sample from ``logits`` [1, V] and take the token; the text the answer gained, and its last
        text when it ended."""
        if self.params.max_new_tokens <= 0:
            self.finish_reason = "length"
            return RowStep(None, None, self.flush())
        tid = self.sample(logits)
        text = self.accept(tid)
        return RowStep(tid, text, self.flush() if self.done else "")


@dataclass
class RowStep:
    """What one row did in a step: the token sampled (None: none was, ``max_new_tokens`` was 0), the text
    it made final (None: it ended the answer unseen, as an end-of-sequence token does; may be empty), the
    held-back text released when the answer ended; for a batch step that isolates its rows, the error
    that ended this row alone, or that its owner cancelled it."""

    token: int | None
    text: str | None
    tail: str = ""
    error: Exception | None = None
    cancelled: bool = False


@dataclass
class BatchStep:
    """One step of a ``DecodeBatch``: every row's outcome (in the batch's order before the step), the
    rows that go on (their indices) and the tokens to feed them."""

    rows: list[RowStep]
    keep: list[int]
    next_ids: list[int]

    @property
    def dropped(self) -> bool:
        return len(self.keep) < len(self.rows)


class DecodeBatch:
    """Rows decoding together, each with its next-token logits and an owner (the caller's handle for it)."""

    def __init__(self):
        self.rows: list[RowState] = []
        self.owners: list = []
        self.logits: list[torch.Tensor] = []  # [1, V] each

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: RowState, logits: torch.Tensor, owner=None) -> None:
        self.rows.append(row)
        self.logits.append(logits)
        self.owners.append(owner)

    def step(self, isolate: bool = False, cancelled=None) -> BatchStep:
        """Sample and take every row's token; rows that finished leave the batch. With ``isolate``, a row
        whose sampling fails leaves alone with its error (else the error propagates); ``cancelled(owner)``
        says which rows leave without sampling."""
        outcomes, keep, next_ids = [], [], []
        for b, (row, logits, owner) in enumerate(zip(self.rows, self.logits, self.owners)):
            if cancelled is not None and cancelled(owner):
                outcomes.append(RowStep(None, None, cancelled=True))
                continue
            try:
                outcome = row.step(logits)
            except Exception as e:
                if not isolate:
                    raise
                outcomes.append(RowStep(None, None, error=e))
                continue
            outcomes.append(outcome)
            if not row.done:
                keep.append(b)
                next_ids.append(outcome.token)
        self.rows, self.owners = [self.rows[b] for b in keep], [self.owners[b] for b in keep]
        self.logits = []
        return BatchStep(outcomes, keep, next_ids)

    def fed(self, logits: torch.Tensor) -> None:
        """The kept rows' tokens went into the model, which gave ``logits`` [B, V] for their next ones."""
        self.logits = [logits[b : b + 1] for b in range(len(self.rows))]
        for row in self.rows:
            row.fed()
