"""Tool calls: how a request's tools reach the model's prompt, and how calls are read back out of an answer.

Where the model's chat template knows tools (it mentions ``tools``, as those of Qwen2.5, Llama 3.1,
Mistral and Hermes models do), the tools, the assistant's earlier calls and the tool results go to
``apply_chat_template`` as transformers documents them. Where it does not (SmolLM2, Gemma 3), the
fallback is plain text any template renders: a system message that lists the tools as JSON and asks
for a call as one JSON object ``{"name": ..., "arguments": {...}}``, earlier calls written back in
that form, and tool results as user messages wrapped in ``<tool_response>``.

An answer is read as calls when it holds ``<tool_call>`` blocks (Hermes and Qwen) or is, as a whole,
a JSON object naming a known tool (Llama 3.1 writes ``parameters`` for ``arguments``). With
``tool_choice`` ``required`` or a named function the answer is decoded under ``call_schema``, so it
is always such an object.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)", re.S)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"


def template_supports_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in template


def fallback_prompt(tools: Sequence[dict]) -> str:
    """The system text that offers ``tools`` to a model whose template does not."""
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return (
        "You can call these functions:\n" + listed + "\n"
        'To call one, answer with only a JSON object: {"name": <function name>, "arguments": <its arguments>}.'
    )


def _call_text(call: dict) -> str:
    fn = call["function"]
    return json.dumps({"name": fn["name"], "arguments": _arguments(fn.get("arguments"))}, ensure_ascii=False)


def _arguments(args) -> object:
    """Arguments as the object they encode (OpenAI sends them as JSON text)."""
    if isinstance(args, str):
        try:
            return json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return args
    return args if args is not None else {}


def for_template(messages: Sequence[dict], tools: Sequence[dict] | None, native: bool) -> list[dict]:
    """``messages`` (OpenAI's shape) as the chat template takes them: natively, or in the fallback form."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if native:
            m = dict(m)
            if calls:
                m["tool_calls"] = [
                    {"type": "function", "function": {**c["function"], "arguments": _arguments(c["function"].get("arguments"))}}
                    for c in calls
                ]  # fmt: skip
            m["content"] = m.get("content") or ""
            out.append(m)
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            text = "\n".join([m.get("content") or ""] + [_call_text(c) for c in calls]).strip("\n")
            out.append({"role": m["role"], "content": text})
    if tools and not native:
        offer = fallback_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{offer}"}
        else:
            out.insert(0, {"role": "system", "content": offer})
    return out


def call_schema(tools: Sequence[dict], name: str | None = None) -> dict:
    """The JSON schema of one call: to the function ``name``, or to any of ``tools``."""

    def one(fn: dict) -> dict:
        params = fn.get("parameters") or {"type": "object"}
        return {
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    fns = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    return one(fns[0]) if len(fns) == 1 else {"anyOf": [one(f) for f in fns]}


def _as_call(obj, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        return ToolCall(obj["name"], args)
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def parse_calls(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """The calls in an answer and what remains as content (None when nothing does)."""
    blocks = list(_BLOCK.finditer(text))
    calls = [c for c in (_as_call(_json(b.group(1).strip()), names) for b in blocks) if c]
    if calls:
        rest = _BLOCK.sub("", text).strip()
        return rest or None, calls
    whole = _as_call(_json(text.strip()), names)
    if whole:
        return None, [whole]
    return text, []


class CallStream:
    """Streams an answer's text while it cannot be a call, and holds it back while it could be
    (it starts with ``{`` or ``<tool_call>``); ``finish`` reads the calls out of the whole answer."""

    def __init__(self, names: set[str], stream_text: bool = True):
        self.names, self.stream_text = names, stream_text
        self.text, self.sent = "", 0

    def _could_be_call(self) -> bool:
        head = self.text.lstrip()
        return not head or head.startswith("{") or CALL_OPEN.startswith(head[: len(CALL_OPEN)])

    def add(self, piece: str) -> str:
        """The new ``piece`` of the answer; returns the text to send as content now."""
        self.text += piece
        if not self.stream_text or (self.sent == 0 and self._could_be_call()):
            return ""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content not sent yet, and the calls."""
        content, calls = parse_calls(self.text, self.names)
        if self.sent:  # text went out as content: what is left is content too, unless it holds calls
            return ("" if calls else self.text[self.sent :]), calls
        return content or "", calls
