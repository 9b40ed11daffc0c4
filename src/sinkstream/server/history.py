"""Conversations recognised by their messages: a digest chain over what the client sends.

Stock chat clients resend the whole history every turn and name no session. To serve such a request
at the cost of its new messages only, the server must recognise the conversation so far. Each
message gets a digest that covers it and everything before it (the tools offered and the cache's
configuration at the root), computed from the message *as the client holds it*: the answer as it was
returned (its text, its tool calls), not as the model's tokens spell it — a text may re-tokenize to
other ids, so matching is by messages, never by re-tokenized ids.

What is compared is the client's form of a message: its role (``developer`` is ``system``), its text
with surrounding whitespace stripped (clients trim), and its tool calls' names and arguments (as JSON
values, so a client that re-serialises them still matches). Tool call ids are left out: they are
opaque labels a client may mint again, and no template here renders them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

FORMAT = "sinkstream-history-1"


def _arguments(args) -> object:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args.strip()
    return args if args is not None else {}


def _text(content) -> str:
    if isinstance(content, list):  # text parts, as a raw request may hold them
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def client_form(message: dict) -> dict:
    """What is compared of a message (``Message.as_dict()``'s shape; raw request messages work too)."""
    role = message.get("role")
    form = {"role": "system" if role == "developer" else role, "content": _text(message.get("content")).strip()}
    calls = message.get("tool_calls") or []
    if calls:
        fns = [c.get("function") or {} for c in calls if isinstance(c, dict)]
        form["tool_calls"] = [[f.get("name"), _arguments(f.get("arguments"))] for f in fns]
    return form


def _digest(prev: str, value) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256((prev + "\n" + text).encode("utf-8")).hexdigest()[:40]


def root(tools: Sequence[dict] | None, scope: str) -> str:
    """The chain's start: the tools offered (they are rendered before the messages) and the scope (the
    model and cache configuration: a snapshot resumes only into the cache it was taken from)."""
    return _digest(FORMAT, {"scope": scope, "tools": list(tools) if tools else None})


def extend(prev: str, messages: Sequence[dict]) -> list[str]:
    """The digests of ``messages`` following the digest ``prev``: one per message, each through it."""
    out = []
    for m in messages:
        prev = _digest(prev, client_form(m))
        out.append(prev)
    return out


def chain(tools: Sequence[dict] | None, scope: str, messages: Sequence[dict]) -> list[str]:
    return extend(root(tools, scope), messages)


def returned_answer(content: str | None, calls: Sequence) -> dict:
    """The assistant message a client holds after an answer (``calls``: ``tools.ToolCall``s)."""
    message = {"role": "assistant", "content": content or ""}
    if calls:
        message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
    return message


AFFINITY_CHARS = 12


def affinity(messages: Sequence[dict]) -> str:
    """A key of a conversation's beginning (its messages up to the first user message), the same for every
    turn of it: what a scaled-out server routes a request that names no session by, so that the
    conversation's kept turns are in the memory of the replica it lands on."""
    head = []
    for m in messages:
        head.append(m)
        if m.get("role") == "user":
            break
    return chain(None, "affinity", head)[-1][:AFFINITY_CHARS] if head else "0" * AFFINITY_CHARS


def response_id(key: str, random_hex: str) -> str:
    """A response id that carries its conversation's affinity key, so a request continuing it
    (``previous_response_id``) is routed where the conversation is."""
    return f"resp_{key}{random_hex}"


def affinity_of_response(rid: str) -> str | None:
    key = rid[len("resp_") : len("resp_") + AFFINITY_CHARS] if rid.startswith("resp_") else ""
    return key if len(key) == AFFINITY_CHARS and all(c in "0123456789abcdef" for c in key) else None
