"""``/v1/responses``: OpenAI's Responses API on the chat machinery.

A request becomes the chat messages of its conversation — its ``instructions``, the history it
continues (a stored response's, named by ``previous_response_id``, or a conversation's items), and its
``input`` — and is served as a chat turn: the kept turn that history reached is resumed, so only the
new input is fed (``resume``). A conversation is a session of the same id, so its turns are committed
like a session's and follow it when items are added or deleted. A stored response (``store``, the
default) is kept in the records with the history it reached; two responses may continue the same one
(a branch); all of it survives a restart.

Streaming sends OpenAI's typed events (``response.created`` … ``response.completed``), each with its
``sequence_number``, in the order the openai SDK's ``responses.stream()`` checks.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from pydantic import ValidationError

from ..tools import CallStream, parse_calls
from . import history as hist
from . import items as I
from . import protocol as P
from .errors import ApiError
from .objects import Objects, StoredResponse
from .responses_protocol import FormatJsonObject, FormatJsonSchema, NamedFunctionChoice, ResponseRequest
from .serving import ChatServing
from .threads import off_loop
from .turns import Turn, TurnStream, raise_failed


@dataclass
class Call:
    """One request in flight: what it continues, what it adds, and the answer's items as they are made."""

    req: ResponseRequest
    rid: str
    created: float
    history: list[dict]  # the chat messages it continues (instructions left out)
    new_items: list[dict]  # its input, as stored items
    turn: Turn | None = None
    output: list[dict] = field(default_factory=list)


class ResponsesServing:
    def __init__(self, chat: ChatServing, objects: Objects, model_name: str):
        self.chat, self.objects, self.model_name = chat, objects, model_name

    # -- create -------------------------------------------------------------------------------------
    async def create(self, req: ResponseRequest, request: Request):
        self.chat.checks.model(req.model)
        call = await off_loop(self._call, req)
        chat_req = self._chat_request(call)
        call.turn = await self.chat._start(chat_req, self.chat.checks.sampling(chat_req))
        if req.stream:
            return TurnStream(self._stream(call, chat_req, request), lambda: self.chat.turns.end(call.turn),
                              media_type="text/event-stream", headers={"Cache-Control": "no-cache"})  # fmt: skip
        async for _ in self.chat.turns.events(call.turn, request):
            pass
        raise_failed(call.turn)
        content, calls = self._answer(call, chat_req)
        call.output = I.output_items(content, calls)
        body = self._body(call, self._status(call), self._usage(call))
        await off_loop(self._store, call, body, content, calls)
        return body

    def _call(self, req: ResponseRequest) -> Call:
        """The history the request continues and its input as items (404 for an unknown id)."""
        history, owners = [], []
        if req.previous_response_id:
            prev = self.objects.response(req.previous_response_id)
            if prev is None:
                raise ApiError(404, f"no stored response '{req.previous_response_id}'", code="response_not_found",
                               param="previous_response_id")  # fmt: skip
            history, owners = prev.history, [prev.id]
        elif req.conversation_id:
            cid = req.conversation_id
            if self.objects.conversation(cid) is None:
                raise ApiError(404, f"no conversation '{cid}'", code="conversation_not_found", param="conversation")
            history, owners = I.to_messages(self.objects.items(cid)), [cid]
        if isinstance(req.input, str):
            raw = [{"role": "user", "content": req.input}] if req.input else []
        else:
            raw = [it.model_dump(exclude_none=True, by_alias=True) for it in req.input]
        new = [I.stored(self._resolve(it, owners)) for it in raw]
        return Call(req, self._new_id(req, history, new), time.time(), history, new)

    @staticmethod
    def _new_id(req: ResponseRequest, history: list[dict], new: list[dict]) -> str:
        """An id that carries the conversation's affinity key (what a scaled-out router routes by)."""
        key = hist.affinity_of_response(req.previous_response_id) if req.previous_response_id else None
        if key is None:
            head = [{"role": "system", "content": req.instructions}] if req.instructions else []
            key = hist.affinity(head + history + I.to_messages(new))
        return hist.response_id(key, uuid.uuid4().hex[:20])

    def _resolve(self, item: dict, owners: list[str]) -> dict:
        if item.get("type") != "item_reference" and set(item) != {"id"}:
            return item
        found = self.objects.item(item["id"], owners)
        if found is None:
            raise ApiError(404, f"no item '{item['id']}' in the conversation this request continues",
                           code="item_not_found", param="input")  # fmt: skip
        return found

    def _chat_request(self, call: Call) -> P.ChatCompletionRequest:
        """The chat request this response is: its conversation's messages, its tools and sampling."""
        req = call.req
        messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + call.history
        messages += I.to_messages(call.new_items)
        if not messages:
            raise ApiError(400, "the request has no input and continues nothing", code="empty_input", param="input")
        fields = {"messages": messages, "max_tokens": req.max_output_tokens, "session_id": req.conversation_id,
                  "logprobs": req.top_logprobs is not None, "top_logprobs": req.top_logprobs}  # fmt: skip
        for name in ("temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "parallel_tool_calls", "logit_bias", "pin"):  # fmt: skip
            if getattr(req, name) is not None:
                fields[name] = getattr(req, name)
        if req.tools:
            fields["tools"] = [t.as_chat_tool() for t in req.tools]
        choice = req.tool_choice
        if isinstance(choice, NamedFunctionChoice):
            choice = {"type": "function", "function": {"name": choice.name}}
        if choice is not None and req.tools:
            fields["tool_choice"] = choice
        fmt = req.text.format if req.text else None
        if isinstance(fmt, FormatJsonSchema):
            spec = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict, "description": fmt.description}
            fields["response_format"] = {
                "type": "json_schema",
                "json_schema": {k: v for k, v in spec.items() if v is not None},
            }
        elif isinstance(fmt, FormatJsonObject):
            fields["response_format"] = {"type": "json_object"}
        try:
            return P.ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ()))
            raise ApiError(400, f"{where}: {err.get('msg')}", code="invalid_request", param="input") from None

    # -- the answer ---------------------------------------------------------------------------------
    def _answer(self, call: Call, chat_req: P.ChatCompletionRequest):
        text = call.turn.job.row.text
        if chat_req.tool_mode == "none":
            return text, []
        return parse_calls(text, {t.function.name for t in chat_req.tools})

    @staticmethod
    def _status(call: Call) -> str:
        return "incomplete" if call.turn.finish_reason == "length" else "completed"

    @staticmethod
    def _usage(call: Call) -> dict:
        turn = call.turn
        prompt = len(turn.job.ids) + turn.cached_tokens
        out = len(turn.job.row.generated)
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": turn.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + out}  # fmt: skip

    def _body(self, call: Call, status: str, usage: dict | None, error: dict | None = None) -> dict:
        req = call.req
        choice = req.tool_choice
        fmt = (
            req.text.format.model_dump(by_alias=True, exclude_none=True)
            if req.text and req.text.format
            else {"type": "text"}
        )
        return {
            "id": call.rid, "object": "response", "created_at": int(call.created), "status": status,
            "model": self.model_name, "output": call.output, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "metadata": req.metadata or {},
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "tool_choice": choice.model_dump() if isinstance(choice, NamedFunctionChoice) else (choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or ()],
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "top_p": req.top_p if req.top_p is not None else 1.0, "max_output_tokens": req.max_output_tokens,
            "previous_response_id": req.previous_response_id,
            "conversation": {"id": req.conversation_id} if req.conversation_id else None,
            "store": req.store is not False, "text": {"format": fmt}, "truncation": "disabled", "reasoning": None,
            "user": None, "usage": usage,
        }  # fmt: skip

    def _store(self, call: Call, body: dict, content: str | None, calls) -> None:
        """Keep the response (unless ``store`` is false) and add its input and output to its conversation."""
        answer = {"role": "assistant", "content": content or ""}
        if calls:
            answer["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                    for c in calls]  # fmt: skip
        history = call.history + I.to_messages(call.new_items) + [answer]
        state = call.turn.state
        key = state.digests[-1] if state is not None and state.digests else None
        conv = call.req.conversation_id
        if call.req.store is not False:
            self.objects.add_response(StoredResponse(call.rid, body, history, key), call.created, call.new_items,
                                      call.new_items + call.output if conv else [])  # fmt: skip
        elif conv:
            self.objects.add_items(conv, call.new_items + call.output)

    # -- streaming ----------------------------------------------------------------------------------
    async def _stream(self, call: Call, chat_req: P.ChatCompletionRequest, request: Request):
        events = Events()
        yield events.emit("response.created", response=self._body(call, "in_progress", None))
        yield events.emit("response.in_progress", response=self._body(call, "in_progress", None))
        names = {t.function.name for t in chat_req.tools or ()}
        calls = CallStream(names, stream_text=chat_req.tool_mode == "auto") if chat_req.tool_mode != "none" else None
        message = None  # the message item, once text is sent
        async for event in self.chat.turns.events(call.turn, request):
            text = calls.add(event.text) if calls else event.text
            if text:
                if message is None:
                    message = I.message_item("", status="in_progress")
                    for line in self._open_message(events, len(call.output), message):
                        yield line
                yield events.emit("response.output_text.delta", item_id=message["id"], output_index=len(call.output),
                                  content_index=0, delta=text, logprobs=[])  # fmt: skip
                message["content"][0]["text"] += text
        turn = call.turn
        if not turn.committed:
            if turn.error != "cancelled":
                error = {"code": "server_error", "message": f"generation failed: {turn.error}"}
                yield events.emit("response.failed", response=self._body(call, "failed", None, error))
            return
        rest, found = calls.finish() if calls else ("", [])
        if message is None and (rest or not found):
            message = I.message_item("", status="in_progress")
            for line in self._open_message(events, len(call.output), message):
                yield line
        if message is not None:
            if rest:
                yield events.emit("response.output_text.delta", item_id=message["id"], output_index=len(call.output),
                                  content_index=0, delta=rest, logprobs=[])  # fmt: skip
                message["content"][0]["text"] += rest
            for line in self._close_message(events, len(call.output), message):
                yield line
            call.output.append(message)
        for c in found:
            item = I.call_item(c)
            for line in self._call_events(events, len(call.output), item):
                yield line
            call.output.append(item)
        status = self._status(call)
        body = self._body(call, status, self._usage(call))
        content = message["content"][0]["text"] if message else None
        await off_loop(self._store, call, body, content, found)
        yield events.emit("response.completed" if status == "completed" else "response.incomplete", response=body)

    @staticmethod
    def _open_message(events: Events, index: int, message: dict):
        yield events.emit("response.output_item.added", output_index=index, item={**message, "content": []})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield events.emit("response.content_part.added", item_id=message["id"], output_index=index, content_index=0,
                          part=part)  # fmt: skip

    @staticmethod
    def _close_message(events: Events, index: int, message: dict):
        text = message["content"][0]["text"]
        yield events.emit("response.output_text.done", item_id=message["id"], output_index=index, content_index=0,
                          text=text, logprobs=[])  # fmt: skip
        yield events.emit("response.content_part.done", item_id=message["id"], output_index=index, content_index=0,
                          part=message["content"][0])  # fmt: skip
        message["status"] = "completed"
        yield events.emit("response.output_item.done", output_index=index, item=message)

    @staticmethod
    def _call_events(events: Events, index: int, item: dict):
        """A function_call item's events: added with no arguments, the arguments, done."""
        yield events.emit("response.output_item.added", output_index=index,
                          item={**item, "arguments": "", "status": "in_progress"})  # fmt: skip
        yield events.emit("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                          delta=item["arguments"])  # fmt: skip
        yield events.emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                          arguments=item["arguments"])  # fmt: skip
        yield events.emit("response.output_item.done", output_index=index, item=item)

    # -- stored responses ---------------------------------------------------------------------------
    def retrieve(self, rid: str) -> dict:
        return self._known(rid).body

    def replay(self, rid: str):
        """A stored response's events, as its stream sent them (the text in one delta)."""
        body = self._known(rid).body
        events = Events()
        head = {**body, "status": "in_progress", "output": [], "usage": None}
        yield events.emit("response.created", response=head)
        yield events.emit("response.in_progress", response=head)
        for index, item in enumerate(body["output"]):
            if item["type"] == "message":
                opened = {**item, "content": [{**item["content"][0], "text": ""}], "status": "in_progress"}
                yield from self._open_message(events, index, opened)
                yield events.emit("response.output_text.delta", item_id=item["id"], output_index=index, content_index=0,
                                  delta=item["content"][0]["text"], logprobs=[])  # fmt: skip
                opened["content"][0]["text"] = item["content"][0]["text"]
                yield from self._close_message(events, index, opened)
            else:
                yield from self._call_events(events, index, item)
        final = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        yield events.emit(final, response=body)

    def delete(self, rid: str, store) -> dict:
        key = self.objects.delete_response(rid)
        if key is None:
            raise self._missing(rid)
        if key:
            store.drop_turn(key)
        return {"id": rid, "object": "response", "deleted": True}

    def input_items(self, rid: str, after: str | None, limit: int, order: str) -> dict:
        self._known(rid)
        return page(self.objects.items(rid), after, limit, order)

    def _known(self, rid: str) -> StoredResponse:
        stored = self.objects.response(rid)
        if stored is None:
            raise self._missing(rid)
        return stored

    @staticmethod
    def _missing(rid: str) -> ApiError:
        return ApiError(404, f"no stored response '{rid}'", code="response_not_found", param="response_id")


class Events:
    """Server-sent events numbered in order (``sequence_number``), each named by its type."""

    def __init__(self):
        self.seq = 0

    def emit(self, kind: str, **fields) -> str:
        data = json.dumps({"type": kind, "sequence_number": self.seq, **fields}, ensure_ascii=False)
        self.seq += 1
        return f"event: {kind}\ndata: {data}\n\n"


def page(items: list[dict], after: str | None, limit: int, order: str) -> dict:
    """A cursor page of ``items`` (oldest first as given) in OpenAI's list shape."""
    ordered = items if order == "asc" else items[::-1]
    if after:
        ids = [it["id"] for it in ordered]
        if after not in ids:
            raise ApiError(400, f"no item '{after}' to list after", code="invalid_value", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    data = ordered[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else "",
            "last_id": data[-1]["id"] if data else "", "has_more": len(ordered) > limit}  # fmt: skip
