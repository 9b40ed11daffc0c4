"""Tool calls in the library: how tools are rendered (natively, or in the fallback form) and how calls are
read back (whole, streamed)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from helpers import tiny_tokenizer
from sinkstream.chat import Conversation
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
