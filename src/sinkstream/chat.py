"""Chat sessions on the engine: the cache is kept across turns, each turn prefills only the new
message (rendered with the model's chat template), never the history.

``Conversation`` is the text bookkeeping alone (what was fed, what a new turn adds, how a finished
answer is recorded); ``ChatSession`` drives an engine with it. The server keeps a ``Conversation``
per session and decodes many of them in one batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .engine import Engine, SamplingParams
from .pinning import Pin, choose, parse_pin, prefix_name, prefix_tokens
from .tools import for_template, template_supports_tools


def _as_messages(new: str | list[dict]) -> list[dict]:
    """A user's text as its message; messages as they are."""
    return [{"role": "user", "content": new}] if isinstance(new, str) else list(new)


@dataclass
class Conversation:
    """The messages of one conversation and exactly the text whose tokens were fed to its stream."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    fed_text: str = ""
    turns: int = 0
    tools: list[dict] | None = None  # offered to the model in the rendered conversation (``tools``)

    def __post_init__(self):
        if self.system and not self.messages:
            self.messages = [{"role": "system", "content": self.system}]

    def render(self, tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
        native = template_supports_tools(tokenizer)
        # an answer's ``shown`` text (what a client got back, see ``finish``) is not the model's to see
        messages = for_template([{k: v for k, v in m.items() if k != "shown"} for m in messages], self.tools, native)
        if getattr(tokenizer, "chat_template", None):
            extra = {"tools": self.tools} if self.tools and native else {}
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
            )
        # no template: a plain transcript
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return text + ("Assistant:" if add_generation_prompt else "")

    def new_turn_text(self, tokenizer, new: str | list[dict]) -> str:
        """The text to feed for the ``new`` messages (a user's text, or messages such as tool
        results): what the rendered conversation adds to what was fed."""
        new = _as_messages(new)
        full = self.render(tokenizer, self.messages + new, True)
        if full.startswith(self.fed_text):
            return full[len(self.fed_text) :]
        # The template renders the history differently from what was fed (an answer cut at a stop
        # string, a template that trims): close the last answer turn, then add the new turn.
        hist = self.render(tokenizer, self.messages, False)
        delta = full[len(hist) :] if full.startswith(hist) else self.render(tokenizer, new, True)
        if self.messages and self.messages[-1]["role"] == "assistant":
            before = self.render(tokenizer, self.messages[:-1], True)
            turn, answer = hist[len(before) :], self.messages[-1]["content"]
            if hist.startswith(before) and turn.startswith(answer):
                delta = turn[len(answer) :] + delta
        return delta

    def begin(self, tokenizer, new: str | list[dict]) -> list[int]:
        """Record the user's message (or the ``new`` messages); return the token ids to feed for it."""
        if isinstance(new, str) and not new.strip():
            raise ValueError("empty message")
        new = _as_messages(new)
        delta = self.new_turn_text(tokenizer, new)
        self.messages += new
        self.fed_text += delta
        return tokenizer(delta, add_special_tokens=False).input_ids

    def finish(self, tokenizer, generated: Sequence[int], *, last_unfed: bool, cut_text: str | None = None) -> str:
        """Record the answer (token ids as sampled; ``last_unfed``: the last one was not fed to the
        model; ``cut_text``: the answer cut before a stop string). Returns the answer text. Its message's
        ``content`` is the text as the model wrote it, special tokens included, so that rendering the
        conversation again reproduces what was fed; a server may add ``shown``, the text a client got back
        where it differs."""
        # the answer as the model wrote it (special tokens too), so that re-rendering the
        # conversation reproduces what was fed
        answer = cut_text if cut_text is not None else tokenizer.decode(list(generated), skip_special_tokens=False)
        self.messages.append({"role": "assistant", "content": answer})
        fed = list(generated[:-1]) if generated and last_unfed else list(generated)
        self.fed_text += tokenizer.decode(fed, skip_special_tokens=False)
        self.turns += 1
        return answer

    def to_dict(self) -> dict:
        return {"system": self.system, "messages": self.messages, "fed_text": self.fed_text, "turns": self.turns,
                "tools": self.tools}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> Conversation:
        return cls(system=d.get("system"), messages=list(d["messages"]), fed_text=d["fed_text"], turns=d["turns"],
                   tools=d.get("tools"))  # fmt: skip


class ChatSession:
    """A conversation with an engine. ``pin`` (``auto``, ``none`` or a number of tokens, see ``pinning``)
    decides at the first turn how much of what comes before the first user message (system prompt, tools)
    stays in the cache for the whole conversation; ``pinned`` says what was chosen, and ``on_warning``
    (a function of one line) hears why not more."""

    def __init__(self, engine: Engine, system: str | None = None, pin: str | int = "auto", on_warning=None):
        self.engine, self.system = engine, system
        self.pin_mode = parse_pin(pin)
        # what ``auto`` could not pin is said once per conversation (default: a logging warning)
        self.on_warning = on_warning or logging.getLogger(__name__).warning
        self.reset()

    def reset(self) -> None:
        """Start a new conversation (empty cache)."""
        self.engine.reset(pin=self.engine.n_sink)
        self.conversation = Conversation(system=self.system)
        self.pinned: Pin | None = None

    def pin_first_turn(self, message: str | list[dict]) -> Pin:
        """Choose the sinks of a conversation that starts with ``message`` (its pinned prefix) and start its
        stream with them; ``send`` does it at the first turn, a caller may do it before (to show the
        warning first). Once a conversation has started, its pin stays."""
        if self.pinned is not None:
            return self.pinned
        e, c = self.engine, self.conversation
        ids = e.tokenizer(c.new_turn_text(e.tokenizer, message), add_special_tokens=False).input_ids
        probe = Conversation(messages=c.messages + _as_messages(message), tools=c.tools)
        prefix = prefix_tokens(e.tokenizer, probe, ids)
        self.pinned = choose(prefix, e.n_sink, e.window, self.pin_mode, prefix_name(c.tools))
        if self.pinned.warning:
            self.on_warning(self.pinned.warning)
        e.reset(pin=self.pinned.tokens)
        return self.pinned

    @property
    def messages(self) -> list[dict]:
        return self.conversation.messages

    @property
    def fed_text(self) -> str:
        return self.conversation.fed_text

    @property
    def turns(self) -> int:
        return self.conversation.turns

    def new_turn_text(self, message: str) -> str:
        """The text to feed for ``message``: what the rendered conversation adds to what was fed."""
        return self.conversation.new_turn_text(self.engine.tokenizer, message)

    def send(self, message: str, params: SamplingParams | None = None, constraint=None) -> Iterator[str]:
        """Stream the answer to ``message`` as text pieces (held to ``constraint``'s grammar, if any).
        Interrupting the iteration keeps the partial answer in the conversation (its tokens are in
        the cache)."""
        tok = self.engine.tokenizer
        self.pin_first_turn(message)
        ids = self.conversation.begin(tok, message)
        answer = self.engine.generate(ids, params, constraint)
        try:
            for t in answer:
                if t.text:
                    yield t.text
        finally:
            answer.close()  # an interrupted answer stops here, its tokens so far in the cache
            row = answer.row
            cut = row.text if row.stop_hit else None
            self.conversation.finish(tok, row.generated, last_unfed=row.last_unfed, cut_text=cut)
