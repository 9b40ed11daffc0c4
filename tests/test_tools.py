"""Tool calls and grammars in the library: how tools are rendered (natively, or in the fallback form),
how calls are read back (whole, streamed), and grammar-held answers from the engine for several model
families, batched rows and a stream far past its window."""

from __future__ import annotations

import json

import jsonschema
import pytest

from helpers import tiny_model, tiny_tokenizer
from sinkstream.chat import Conversation
from sinkstream.engine import Engine, SamplingParams
from sinkstream.grammar import GrammarError, Grammars
from sinkstream.tools import CallStream, call_schema, parse_calls, template_supports_tools

ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["a", "b"], "additionalProperties": False}}}  # fmt: skip
NAMES = {"add", "get_weather"}


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ('{"name": "add", "arguments": {"a": 1, "b": 2}}', None, [("add", {"a": 1, "b": 2})]),
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>', None, [("add", {"a": 1})]),
        ('Let me add.<tool_call>{"name":"add","arguments":{}}</tool_call><tool_call>{"name":"get_weather",'
         '"arguments":{"city":"Oslo"}}</tool_call>', "Let me add.", [("add", {}), ("get_weather", {"city": "Oslo"})]),
        ('{"name": "add", "parameters": {"a": 3}}', None, [("add", {"a": 3})]),  # Llama 3.1's spelling
        ('<tool_call>{"name": "add", "arguments": {"a": 4', None, []),  # cut off: no call, kept as text
        ('{"name": "unknown", "arguments": {}}', '{"name": "unknown", "arguments": {}}', []),
        ("Just text.", "Just text.", []),
    ],
)  # fmt: skip
def test_parse_calls(text, content, calls):
    got_content, got = parse_calls(text, NAMES)
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    if calls:
        assert got_content == content and all(c.id.startswith("call_") for c in got)
    else:
        assert got_content == text


def test_call_stream_holds_back_only_what_could_be_a_call():
    s = CallStream(NAMES)
    assert [s.add(p) for p in ("Hel", "lo ", "there")] == ["Hel", "lo ", "there"]
    assert s.finish() == ("", [])
    s = CallStream(NAMES)
    assert [s.add(p) for p in (" ", '{"name": "add", ', '"arguments": {"a": 1}}')] == ["", "", ""]
    rest, calls = s.finish()
    assert rest == "" and calls[0].name == "add"
    s = CallStream(NAMES)
    assert s.add("<tool") == "" and s.add("kit>") == "<toolkit>"  # not the tag after all
    s = CallStream(NAMES)
    assert s.add("{not json") == "" and s.finish() == ("{not json", [])


def test_fallback_rendering_offers_the_tools_and_shows_results():
    tok = tiny_tokenizer()
    assert not template_supports_tools(tok)
    conv = Conversation(tools=[ADD])
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    msgs = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3"}]  # fmt: skip
    text = conv.render(tok, msgs, True)
    assert text.startswith("<s>system: You can call these functions:\n" + json.dumps(ADD["function"]))
    assert '<s>assistant: {"name": "add", "arguments": {"a": 1, "b": 2}}</s>' in text
    assert "<s>user: <tool_response>\n3\n</tool_response></s>" in text and text.endswith("<s>assistant: ")


def test_native_rendering_passes_tools_to_the_template():
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% if tools %}<s>tools: {{ tools | map(attribute='function') | map(attribute='name') | join(',') }}</s>{% endif %}"
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}"
        "{% for c in m.get('tool_calls', []) %}[{{ c['function']['name'] }}({{ c['function']['arguments']['a'] }})]{% endfor %}"
        "</s>{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )  # fmt: skip
    assert template_supports_tools(tok)
    call = {"id": "c", "type": "function", "function": {"name": "add", "arguments": '{"a": 7}'}}
    text = Conversation(tools=[ADD]).render(tok, [{"role": "assistant", "content": None, "tool_calls": [call]},
                                                  {"role": "tool", "content": "7"}], False)  # fmt: skip
    assert text == "<s>tools: add</s><s>assistant: [add(7)]</s><s>tool: 7</s>"  # arguments as an object


def test_call_schema():
    two = [ADD, {"type": "function", "function": {"name": "ping"}}]
    jsonschema.validate({"name": "ping", "arguments": {}}, call_schema(two))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "ping", "arguments": {}}, call_schema(two, "add"))
    jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, call_schema(two, "add"))


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
          "maximum": 999}, "tag": {"enum": ["x", "y"]}}, "required": ["ok", "n", "tag"], "additionalProperties": False}  # fmt: skip


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
