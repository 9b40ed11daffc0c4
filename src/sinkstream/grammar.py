"""Constrained decoding: answers that are always JSON, or JSON that matches a schema.

A ``Grammars`` object belongs to one tokenizer and compiles (and caches) grammars with xgrammar.
Each answer gets its own ``Constraint``: before a token is sampled it masks the logits of every token
the grammar does not allow next; after, it advances by the sampled token. Once the JSON is complete
only the end-of-sequence tokens stay allowed, so the answer ends there.

The state is the answer's alone and knows nothing of the KV cache: it advances with the sampled
tokens whatever the cache keeps or evicts, and so works the same in a session far past its window.

JSON is generated compactly (no free whitespace between tokens): a small model given the freedom
to emit whitespace can spend its whole budget on newlines.
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from collections.abc import Iterable

import torch

from .extras import need

with warnings.catch_warnings():  # xgrammar warns at import about optional GPU kernels it does not need here
    warnings.simplefilter("ignore")
    xgr = need("xgrammar", "grammar")


class GrammarError(ValueError):
    """A schema the grammar compiler cannot take (invalid, or a feature it does not support)."""


class Constraint:
    """One answer's grammar state."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [1, V] with every token the grammar does not allow next at ``-inf``."""
        logits = logits.float().clone()
        self.matcher.fill_next_token_bitmask(self.bitmask)
        xgr.apply_token_bitmask_inplace(logits, self.bitmask, vocab_size=self.vocab_size)
        return logits

    def accept(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise GrammarError(f"token {token_id} is not allowed by the grammar")

    @property
    def finished(self) -> bool:
        return self.matcher.is_terminated()


class Grammars:
    """The grammars of one tokenizer (compiled once per schema, then cached)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Iterable[int]):
        """``vocab_size``: the model's logits per token (it may exceed the tokenizer's length)."""
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_ids))
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.lock = threading.Lock()

    def json_schema(self, schema: dict | str) -> Constraint:
        """A constraint to JSON that validates against ``schema``."""
        text = schema if isinstance(schema, str) else json.dumps(schema)
        try:
            with self.lock:
                compiled = self.compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
        except (RuntimeError, ValueError, TypeError) as e:
            reason = re.sub(r"^\[[^]]*\]\s*\S+:\d+:\s*", "", str(e).splitlines()[0])  # no C++ source location
            raise GrammarError(f"cannot use this JSON schema: {reason[:300]}") from None
        return Constraint(compiled, self.vocab_size)

    def json_object(self) -> Constraint:
        """A constraint to any JSON object (OpenAI's ``json_object`` mode)."""
        return self.json_schema({"type": "object"})
