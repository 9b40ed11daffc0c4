"""The Responses and Conversations APIs against the clients that speak them: the openai SDK (strict response
validation, typed stream events), the OpenAI Agents SDK running an agent with a function tool, and LangChain's
ChatOpenAI with a message history. Real server processes, a tiny random model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel

from helpers import tiny_model, tiny_tokenizer
from serverproc import Server
from sinkstream.models import export_model

openai = pytest.importorskip("openai")

INSTRUCTIONS = "Be brief."
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Paris"]}},
                          "required": ["city"], "additionalProperties": False}}  # fmt: skip


class Verdict(BaseModel):  # short JSON: a random model's answer under this schema ends, so the response completes
    ok: bool
    n: Literal[1, 2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return export_model(tiny_model("llama", layers=2), tiny_tokenizer(), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("state") / "s").start()
    yield srv
    srv.stop()


def client(srv: Server):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120,
                         _strict_response_validation=True)  # fmt: skip


def respond(srv: Server, text, **kw):
    return client(srv).responses.create(model="tiny", input=text, instructions=INSTRUCTIONS, temperature=0,
                                        **{"max_output_tokens": 12, **kw})  # fmt: skip


def cached(r) -> int:
    return r.usage.input_tokens_details.cached_tokens


def test_chain_branch_and_stored_responses(server):
    c = client(server)
    first = respond(server, "Hello there")
    assert first.status == "incomplete" and first.incomplete_details.reason == "max_output_tokens"
    assert first.output[0].type == "message" and len(first.output_text) > 0 and cached(first) == 0
    second = respond(server, "And then?", previous_response_id=first.id)
    assert cached(second) > 0 and second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    branch = respond(server, "Something else", previous_response_id=first.id)  # a second child of the same one
    assert cached(branch) == cached(second)
    # a chat session fed the same messages one at a time reaches the same answers (greedy)
    twin = c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": INSTRUCTIONS},
                                     {"role": "user", "content": "Hello there"}], max_tokens=12, temperature=0,
                                     extra_body={"session_id": "twin"})  # fmt: skip
    assert twin.choices[0].message.content == first.output_text
    twin = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "And then?"}], max_tokens=12,
                                     temperature=0, extra_body={"session_id": "twin"})  # fmt: skip
    assert twin.choices[0].message.content == second.output_text
    # stored: retrieve, replay as a stream, input items, delete
    assert c.responses.retrieve(second.id).output_text == second.output_text
    replayed = [e.type for e in c.responses.retrieve(second.id, stream=True)]
    assert replayed[0] == "response.created" and replayed[-1] == "response.incomplete"
    items = c.responses.input_items.list(second.id)
    assert [i.content[0].text for i in items.data] == ["And then?"]
    c.responses.delete(branch.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(branch.id)
    with pytest.raises(openai.NotFoundError):
        respond(server, "x", previous_response_id="resp_nope")


def test_stream_typed_events_and_structured_output(server):
    c = client(server)
    first = respond(server, "Give me JSON")
    with c.responses.stream(
        model="tiny",
        input="Now as JSON",
        instructions=INSTRUCTIONS,
        temperature=0,
        previous_response_id=first.id,
        max_output_tokens=60,
        text_format=Verdict,
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()  # raises unless the stream ended with response.completed
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert "response.output_text.delta" in kinds and kinds[-1] == "response.completed"
    assert isinstance(final.output_parsed, Verdict) and cached(final) > 0
    parsed = c.responses.parse(model="tiny", input="Again", instructions=INSTRUCTIONS, previous_response_id=final.id, text_format=Verdict,
                               max_output_tokens=60, temperature=0)  # fmt: skip
    assert isinstance(parsed.output_parsed, Verdict) and cached(parsed) > cached(final)


def test_function_call_round_trip(server):
    c = client(server)
    call = respond(server, "Weather in Oslo?", tools=[WEATHER], tool_choice="required", max_output_tokens=100)
    fc = call.output[0]
    assert (
        fc.type == "function_call"
        and fc.name == "get_weather"
        and fc.arguments in ('{"city": "Oslo"}', '{"city": "Paris"}')
    )
    with c.responses.stream(model="tiny", instructions=INSTRUCTIONS, previous_response_id=call.id, tools=[WEATHER],
                            input=[{"type": "function_call_output", "call_id": fc.call_id, "output": '{"temp": 4}'}],
                            text_format=Verdict, max_output_tokens=60, temperature=0) as stream:  # fmt: skip
        final = stream.get_final_response()
    assert cached(final) > 0 and isinstance(final.output_parsed, Verdict)
    # the same exchange sent whole, as a client without previous_response_id does: resumes the same turn
    whole = [{"role": "user", "content": "Weather in Oslo?"},
             {"type": "function_call", "call_id": fc.call_id, "name": fc.name, "arguments": fc.arguments},
             {"type": "function_call_output", "call_id": fc.call_id, "output": '{"temp": 4}'}]  # fmt: skip
    again = c.responses.parse(model="tiny", instructions=INSTRUCTIONS, tools=[WEATHER], input=whole, text_format=Verdict,
                              max_output_tokens=60, temperature=0)  # fmt: skip
    assert again.output_text == final.output_text and cached(again) == cached(final)
    # a streamed forced call arrives as typed events
    with c.responses.stream(model="tiny", instructions=INSTRUCTIONS, input="Weather in Paris?", tools=[WEATHER],
                            tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=100) as stream:  # fmt: skip
        kinds = [e.type for e in stream]
        streamed = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and streamed.output[0].type == "function_call"


def test_conversations(server):
    c = client(server)
    conv = c.conversations.create(items=[{"role": "user", "content": "Remember: the sky is green."}],
                                  metadata={"topic": "sky"})  # fmt: skip
    assert conv.metadata == {"topic": "sky"} and c.conversations.retrieve(conv.id).id == conv.id
    r1 = respond(server, "What colour?", conversation=conv.id)
    r2 = respond(server, "Sure?", conversation=conv.id)
    assert r2.conversation.id == conv.id and cached(r2) > 0
    listed = list(c.conversations.items.list(conv.id, order="asc", limit=2))  # pages of 2, all of them
    assert [i.role for i in listed] == ["user", "user", "assistant", "user", "assistant"]
    assert listed[2].content[0].text == r1.output_text
    info = server.request("GET", f"/v1/sessions/{conv.id}")[1]
    assert info["turns"] == 2  # the conversation is a session: two turns, never one twice
    # an item added here is fed with the next response; one deleted makes the session go back
    c.conversations.items.create(conv.id, items=[{"role": "user", "content": "One more thing."}])
    r3 = respond(server, "Go on", conversation=conv.id)
    assert cached(r3) >= r2.usage.input_tokens
    c.conversations.items.delete(listed[-1].id, conversation_id=conv.id)  # r2's answer
    r4 = respond(server, "After the edit", conversation=conv.id)
    assert cached(r4) > 0 and cached(r4) < r3.usage.input_tokens  # resumed from r1's turn, not r3's
    c.conversations.update(conv.id, metadata={"topic": "edited"})
    assert c.conversations.retrieve(conv.id).metadata == {"topic": "edited"}
    assert c.conversations.delete(conv.id).deleted
    with pytest.raises(openai.NotFoundError):
        respond(server, "gone?", conversation=conv.id)
    assert server.request("GET", f"/v1/sessions/{conv.id}")[0] == 404


def test_responses_survive_a_restart(model_dir, tmp_path):
    srv = Server(model_dir, tmp_path / "s").start()
    try:
        first = respond(srv, "Before the restart")
        conv = client(srv).conversations.create()
        in_conv = respond(srv, "In a conversation", conversation=conv.id)
        expected = respond(srv, "Continue", previous_response_id=first.id)
        client(srv).responses.delete(expected.id)
    finally:
        srv.stop()
    srv.start()
    try:
        got = respond(srv, "Continue", previous_response_id=first.id)
        assert got.output_text == expected.output_text and cached(got) == cached(expected) > 0
        more = respond(srv, "More", conversation=conv.id)
        assert cached(more) > in_conv.usage.input_tokens // 2
    finally:
        srv.stop()


def test_agents_sdk_runs_an_agent_with_a_tool(server):
    agents = pytest.importorskip("agents")
    calls = []

    @agents.function_tool
    def get_weather(city: Literal["Oslo", "Paris"]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    async def run() -> list:
        agents.set_tracing_disabled(True)
        agents.set_default_openai_client(
            openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        )
        agent = agents.Agent(name="weather", instructions="Answer about the weather.", model="tiny", tools=[get_weather],
                             output_type=Verdict, model_settings=agents.ModelSettings(tool_choice="required", max_tokens=120,
                                                                                     temperature=0))  # fmt: skip
        history, usage = [], []
        for question in ("Weather in Oslo?", "And in Paris?", "Thanks!"):
            result = await agents.Runner.run(agent, history + [{"role": "user", "content": question}], max_turns=4)
            assert isinstance(result.final_output, Verdict)
            history = result.to_input_list()
            usage += [(r.usage.input_tokens, r.usage.input_tokens_details.cached_tokens) for r in result.raw_responses]
        return usage

    usage = asyncio.run(run())
    assert len(calls) == 3  # one tool call per turn, each answered
    assert all(cached_tokens > 0.8 * total for total, cached_tokens in usage[1:])  # the resent history is resumed


def test_langchain_chat_history(server):
    lc = pytest.importorskip("langchain_openai")
    messages = pytest.importorskip("langchain_core.messages")
    llm = lc.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="tiny", temperature=0, max_tokens=12,
                        max_retries=0)  # fmt: skip
    history = [messages.SystemMessage("You are terse.")]
    for turn in range(4):
        history.append(messages.HumanMessage(f"question {turn}"))
        answer = llm.invoke(history)
        read = answer.usage_metadata["input_token_details"].get("cache_read", 0)
        assert (read > 0) == (turn > 0)
        history.append(answer)
