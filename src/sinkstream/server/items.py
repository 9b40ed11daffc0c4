"""Responses API items and chat messages, one into the other.

The Responses and Conversations APIs speak in items (messages with typed content parts, function calls,
function call outputs); the model's chat template speaks in chat messages. Both directions are here,
so that a conversation held as items becomes exactly the chat messages a Chat Completions client would
have sent for it — and so resumes the same kept turns (``history``).

An assistant's text and the function calls that follow it are one assistant message with
``tool_calls``; a function call output is a ``tool`` message; ``developer`` is ``system``.
"""

from __future__ import annotations

import uuid

from .errors import ApiError

TEXT_PARTS = ("input_text", "output_text", "text")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    out = []
    for part in content or ():
        kind = part.get("type")
        if kind not in TEXT_PARTS:
            raise ApiError(400, f"{where}: content parts of type '{kind}' are not supported: this model reads text",
                           code="unsupported_content", param="input")  # fmt: skip
        out.append(part.get("text") or "")
    return "".join(out)


def to_messages(items: list[dict]) -> list[dict]:
    """Chat messages (``Message.as_dict()``'s shape) for Responses items."""
    messages: list[dict] = []
    for i, item in enumerate(items):
        kind = item.get("type") or "message"
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            text = _text(item.get("content"), f"input[{i}]")
            if (
                role == "assistant"
                and messages
                and messages[-1]["role"] == "assistant"
                and not messages[-1].get("tool_calls")
            ):
                messages[-1]["content"] += text  # one answer's text in several output messages
            else:
                messages.append({"role": role, "content": text})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id"), "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments") or ""}}  # fmt: skip
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out = item.get("output")
            text = out if isinstance(out, str) else _text(out, f"input[{i}].output")
            message = {"role": "tool", "content": text}
            if item.get("call_id"):
                message["tool_call_id"] = item["call_id"]
            messages.append(message)
        else:
            raise ApiError(400, f"input[{i}]: items of type '{kind}' are not supported here",
                           code="unsupported_item", param="input")  # fmt: skip
    return messages


def stored(item: dict) -> dict:
    """An input item as it is stored and listed: with an id and a status, content as parts."""
    item = dict(item)
    kind = item.setdefault("type", "message")
    if kind == "message":
        item.setdefault("id", new_id("msg"))
        content = item.get("content")
        part = "output_text" if item["role"] == "assistant" else "input_text"
        if isinstance(content, str):
            item["content"] = [{"type": part, "text": content}]
        for p in item["content"]:
            if p.get("type") == "output_text":
                p.setdefault("annotations", [])
    elif kind == "function_call":
        item.setdefault("id", new_id("fc"))
    elif kind == "function_call_output":
        item.setdefault("id", new_id("fco"))
    item.setdefault("status", "completed")
    return item


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    return {"id": item_id or new_id("msg"), "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}  # fmt: skip


def call_item(call, status: str = "completed", item_id: str | None = None) -> dict:
    """A ``tools.ToolCall`` as a function_call output item (its ``call_id`` is the call's id)."""
    return {"id": item_id or new_id("fc"), "type": "function_call", "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status}  # fmt: skip


def output_items(content: str | None, calls) -> list[dict]:
    """A finished answer's output: its text as a message (when there is text, or nothing else), then its calls."""
    out = [message_item(content or "")] if content or not calls else []
    return out + [call_item(c) for c in calls]
