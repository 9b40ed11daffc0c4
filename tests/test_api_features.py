"""The OpenAI features clients use, against a real `sinkstream serve` on the tiny random model: tools and
tool_choice, structured output (json_object, strict json_schema), penalties, extreme sampling values,
OpenAI's request shapes — through the `openai` client and LangChain's ChatOpenAI.

The model is random, so nothing here relies on it answering well: a forced tool call or a JSON schema
must hold whatever the logits are (the grammar guarantees it), and penalties are checked by their
direction on a model whose greedy answer repeats one character."""

from __future__ import annotations

import json

import jsonschema
import pytest

from helpers import tiny_model, tiny_tokenizer
from serverproc import Server, request, sse_events
from sinkstream.models import export_model

openai = pytest.importorskip("openai")

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}},
]  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = export_model(tiny_model("llama", layers=2), tiny_tokenizer(), tmp_path_factory.mktemp("m") / "tiny")
    srv = Server(model, tmp_path_factory.mktemp("api") / "s").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def c(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _valid_call(call) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


def test_named_tool_choice_is_a_valid_call(c):
    for seed in range(3):
        r = c.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, max_tokens=120, temperature=1.0, seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )  # fmt: skip
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        _valid_call(call)


def test_required_tool_choice_picks_one_of_the_tools(c):
    r = c.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name in SCHEMAS
    _valid_call(call)


def test_tool_call_streamed_equals_whole(c):
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=1.0, seed=7)
    whole = c.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls, finish = {}, None
    for chunk in c.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            assert not ch.delta.content  # a forced call sends no text
            for d in ch.delta.tool_calls or ():
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert calls == {0: {"name": whole.function.name, "arguments": whole.function.arguments}}


def test_tool_result_continues_the_conversation(c, server):
    first = c.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120,
        extra_body={"session_id": "tools-1"},
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    result = {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny", "high": 21})}
    # sessionless: the whole conversation, the assistant's call included (content null, as OpenAI sends it)
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True), result]
    again = c.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=16)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # in the session: only the new message; the session holds the rest
    cont = c.chat.completions.create(
        model="tiny", messages=[result], tools=TOOLS, max_tokens=16, extra_body={"session_id": "tools-1"}
    )
    assert cont.choices[0].finish_reason in ("stop", "length", "tool_calls")
    status, transcript = request(server.url, "GET", "/v1/sessions/tools-1/messages")
    roles = [m["role"] for m in transcript["data"]]
    assert status == 200 and roles == ["user", "assistant", "tool", "assistant"]
    assert json.loads(transcript["data"][1]["content"])["name"] == call.function.name


def test_json_schema_and_json_object(c):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    for seed in range(3):
        r = c.chat.completions.create(
            model="tiny", messages=ASK, response_format=fmt, max_tokens=120, temperature=1.0, seed=seed
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)
    r = c.chat.completions.create(
        model="tiny", messages=ASK, response_format={"type": "json_object"}, max_tokens=200, temperature=0.7, seed=1
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # streamed == whole, and /v1/completions takes it too
    kw = dict(model="tiny", messages=ASK, response_format=fmt, max_tokens=120, temperature=1.0, seed=11)
    whole = c.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kw, stream=True)
                       if ch.choices)  # fmt: skip
    assert streamed == whole
    comp = c.completions.create(model="tiny", prompt="Weather:", max_tokens=120, extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(comp.choices[0].text), WEATHER)


def test_schema_after_the_cache_has_evicted(c):
    """A session far past its window (cache 64): the grammar is the answer's, the cache's evictions
    do not touch it."""
    for i in range(8):
        r = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"turn {i}: " + "tell me more " * 3}],
            max_tokens=24, extra_body={"session_id": "evicted"},
        )  # fmt: skip
    assert r.model_extra["session"]["tokens_seen"] > 4 * r.model_extra["session"]["cache_capacity"]
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    for seed in range(2):
        r = c.chat.completions.create(
            model="tiny", messages=ASK, response_format=fmt, max_tokens=120, temperature=1.0, seed=seed,
            extra_body={"session_id": "evicted"},
        )  # fmt: skip
        jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)


def _distinct(text: str) -> int:
    return len(set(text))


def test_penalties_change_the_text_as_they_should(c):
    """The crafted case: a logit bias makes greedy decoding repeat one character; penalties against
    repetition make the answer more varied, a negative presence penalty keeps it on what it said."""
    h = str(tiny_tokenizer().convert_tokens_to_ids("h"))

    def say(extra_body=None, bias=1.5, **kw):
        extra = {"logit_bias": {h: bias} if bias else {}, **(extra_body or {})}
        kw = {"temperature": 0, **kw}
        r = c.completions.create(model="tiny", prompt="hi", max_tokens=24, extra_body=extra, **kw)
        return r.choices[0].text

    plain = say()
    assert _distinct(plain) <= 3, plain  # the crafted case: it repeats
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 10.0}):
        assert _distinct(say(extra_body=extra) if "repetition_penalty" in extra else say(**extra)) > _distinct(plain)
    assert _distinct(say(bias=None, presence_penalty=-2.0)) < _distinct(say(bias=None))  # 17 -> 1 on this model
    # min_p = 1 keeps only the likeliest token: sampling at any temperature is then greedy
    assert say(temperature=2.0, seed=3, extra_body={"min_p": 1.0}) == plain
    assert say(temperature=2.0, seed=3, extra_body={"top_k": 1}) == plain


EXTREMES = [
    {"temperature": 1e-300}, {"temperature": 2.0}, {"temperature": 0}, {"top_p": 1e-300}, {"top_p": 5e-324},
    {"min_p": 1.0}, {"min_p": 1e-300}, {"top_k": 10**12}, {"top_k": -1}, {"repetition_penalty": 0.01},
    {"repetition_penalty": 10.0}, {"repetition_penalty": 1e-320}, {"presence_penalty": -2}, {"frequency_penalty": 2},
    {"frequency_penalty": 1e308}, {"seed": 2**64 - 1}, {"seed": -(2**63)}, {"seed": 2**64}, {"temperature": 1e308},
    {"logit_bias": {"5": 100, "6": -100}}, {"top_logprobs": 20}, {"n": 2},
]  # fmt: skip


@pytest.mark.parametrize("extreme", EXTREMES, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_extreme_sampling_values_answer_200_or_400(server, extreme):
    body = {"messages": ASK, "max_tokens": 8, "temperature": 1.0, "seed": 1, **extreme}
    status, resp = request(server.url, "POST", "/v1/chat/completions", body)
    assert status in (200, 400), resp
    if status == 400:
        assert resp["error"]["type"] == "invalid_request_error" and resp["error"]["param"]


def test_openai_request_shapes(server):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}],
            "max_tokens": 6, "temperature": 0, "user": "u-42", "some_future_field": {"x": 1}, "parallel_tool_calls": True}  # fmt: skip
    status, parts = request(server.url, "POST", "/v1/chat/completions", body)
    plain = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0}
    assert status == 200 and parts["choices"][0]["message"] == request(server.url, "POST", "/v1/chat/completions", plain)[1]["choices"][0]["message"]  # fmt: skip
    status, err = request(server.url, "POST", "/v1/chat/completions", {**plain, "n": 3})
    assert status == 400 and err["error"]["param"] == "n" and "send n requests" in err["error"]["message"]
    # stream_options are for streams; include_usage gives a last chunk with usage only
    status, raw = request(server.url, "POST", "/v1/chat/completions",
                          {**plain, "stream": True, "stream_options": {"include_usage": True}})  # fmt: skip
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] >= 1


def test_langchain_tools_and_structured_output(server):
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    llm = lc.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="tiny", max_tokens=120,
                        temperature=0, max_retries=0)  # fmt: skip

    class Weather(BaseModel):
        """Ask for the weather forecast."""

        city: str = Field(max_length=12)
        days: int = Field(ge=1, le=14)

    msg = llm.bind_tools([Weather], tool_choice="Weather").invoke("Weather in Paris for 3 days?")
    (call,) = msg.tool_calls
    assert call["name"] == "Weather"
    Weather(**call["args"])
    msg = llm.bind_tools([Weather], tool_choice="any").invoke("Weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "Weather"
    out = llm.with_structured_output(Weather).invoke("Weather in Paris for 3 days?")
    assert isinstance(out, Weather) and 1 <= out.days <= 14
