"""Constrained decoding (grammar.py): a constraint's mask allows exactly the tokens its grammar allows
next and only end-of-sequence once the JSON is complete; grammar-held answers from the engine for several
model families, batched rows with their own grammars, and a stream far past its window; schemas the
compiler refuses."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from helpers import tiny_model, tiny_tokenizer
from sinkstream.engine import Engine, SamplingParams
from sinkstream.grammar import GrammarError, Grammars

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
          "maximum": 999}, "tag": {"enum": ["x", "y"]}}, "required": ["ok", "n", "tag"], "additionalProperties": False}  # fmt: skip


def test_the_mask_allows_what_the_grammar_allows_then_only_eos():
    tok = tiny_tokenizer()
    eos = tok.eos_token_id
    constraint = Grammars(tok, 100, {eos}).json_schema({"type": "object", "properties": {"a": {"enum": ["x"]}},
                                                         "required": ["a"], "additionalProperties": False})  # fmt: skip
    for ch in '{"a": "x"}':  # compact JSON: a space after the colon only
        allowed = torch.isfinite(constraint.mask(torch.zeros(1, 100)))[0]
        want = tok.convert_tokens_to_ids(ch)
        assert allowed[want] and not allowed[eos], ch  # the next character of the only valid answer, never EOS yet
        constraint.accept(want)
    allowed = torch.isfinite(constraint.mask(torch.zeros(1, 100)))[0]
    assert allowed.nonzero().flatten().tolist() == [eos]  # complete: only the end of the answer


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox", "falcon"])
def test_engine_answers_follow_the_schema(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    engine = Engine(model, tok, n_sink=4, window=28)  # the prompt alone overflows the cache
    grammars = Grammars(tok, model.config.get_text_config().vocab_size, engine.eos_ids)
    prompt = tok("a long prompt that streams through a small cache " * 2).input_ids
    for seed in range(3):
        engine.reset()
        params = SamplingParams(max_new_tokens=80, temperature=1.0, seed=seed)
        answer = engine.generate(prompt, params, grammars.json_schema(SCHEMA))
        text = "".join(t.text for t in answer)
        assert answer.row.finish_reason == "stop" and engine.tokens_seen > 4 + 28
        jsonschema.validate(json.loads(text), SCHEMA)


def test_batched_rows_keep_their_own_grammar():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    engine = Engine(model, tok, n_sink=4, window=60)
    grammars = Grammars(tok, model.config.get_text_config().vocab_size, engine.eos_ids)
    prompts = [tok("first").input_ids, tok("second one").input_ids]
    params = SamplingParams(max_new_tokens=60, temperature=1.0, seed=1)
    alone = []
    for ids in prompts:
        engine.reset()
        alone.append("".join(t.text for t in engine.generate(ids, params, grammars.json_schema(SCHEMA))))
    together = ["", ""]
    for row, t in engine.generate_batch(prompts, params, [grammars.json_schema(SCHEMA), None]):
        together[row] += t.text
    assert together[0] == alone[0]
    with pytest.raises(ValueError):
        json.loads(together[1])  # the unconstrained row is free text


def test_a_schema_the_compiler_refuses():
    grammars = Grammars(tiny_tokenizer(), 100, {2})
    with pytest.raises(GrammarError, match="Unsupported type"):
        grammars.json_schema({"type": "nope"})
