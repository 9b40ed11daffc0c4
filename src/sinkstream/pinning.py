"""A pinned prefix: the system prompt and tools stay in the cache for the whole conversation.

StreamingLLM keeps the first few tokens (the sinks) and a window of recent ones. In a chat what a model
must keep seeing is what the front end puts first: the system prompt (a persona, instructions, a
character card) and the tool definitions. Pinning makes them the stream's sinks: the first ``pin``
tokens stay, in front of a window of what is left of the cache (``SinkCache(..., pin=)``), at positions
inside the cache as before. The first tokens, where the sinks form, are always part of a pinned prefix.

Policies (``--pin``): ``auto`` pins the prefix when it fits in a quarter of the cache and keeps the
plain sinks otherwise, saying so; ``N`` pins at most N tokens of it, whatever their share; ``none`` keeps
the plain sinks.
"""

from __future__ import annotations

from dataclasses import dataclass

PIN_MODES = ("auto", "none")


def parse_pin(value) -> str | int:
    """``auto``, ``none`` or a number of tokens (>= 0); ValueError otherwise."""
    if value in PIN_MODES:
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--pin must be auto, none or a number of tokens, got {value!r}") from None
    if n < 0 or isinstance(value, bool):
        raise ValueError(f"--pin must be auto, none or a number of tokens >= 0, got {value!r}")
    return n


def check_pin(pin, total: int) -> None:
    """A number of pinned tokens must leave a window in a cache of ``total`` slots; ValueError otherwise."""
    if isinstance(pin, int) and not isinstance(pin, bool) and pin >= total:
        raise ValueError(f"pin {pin} leaves no window in a {total}-token cache")


@dataclass(frozen=True)
class Pin:
    tokens: int  # the stream's sinks: its first ``tokens`` tokens
    warning: str | None = None  # what was not pinned, and what to set


def choose(prefix: int, n_sink: int, window: int, mode: str | int, what: str = "the system prompt and tools") -> Pin:
    """The sinks of a stream whose conversation renders ``prefix`` tokens before its first user message
    (``what`` they are), in a cache of ``n_sink + window`` slots."""
    total = n_sink + window
    if mode == "none" or prefix <= n_sink:
        return Pin(n_sink)
    if mode == "auto":
        if prefix <= total // 4:
            return Pin(prefix)
        fix = f"--window {4 * prefix - n_sink}" + (f" or --pin {prefix}" if prefix < total // 2 else "")
        return Pin(n_sink, f"{what}: {prefix} tokens, more than a quarter of the {total}-token cache: not "
                           f"pinned, only the {n_sink} first tokens stay (the sinks); to pin them set {fix}")  # fmt: skip
    tokens = max(n_sink, min(prefix, int(mode)))
    check_pin(tokens, total)
    return Pin(tokens)


def prefix_name(tools) -> str:
    """What a chat's prefix is, for the warning."""
    return "the system prompt and tools" if tools else "the system prompt"


def prefix_tokens(tokenizer, conversation, ids: list[int]) -> int:
    """How many of a conversation's first ``ids`` (its whole rendering, as fed from the start) are what
    the template renders before the first user message's text: its system prompt, its tools, the template's
    own preamble and the first user turn's header."""
    messages = conversation.messages
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first is None:
        return 0
    head = messages[:first]
    a = conversation.render(tokenizer, head + [{"role": "user", "content": "\x00a"}], False)
    b = conversation.render(tokenizer, head + [{"role": "user", "content": "\x00b"}], False)
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    pre = tokenizer(a[:common], add_special_tokens=False).input_ids
    n = 0
    while n < min(len(pre), len(ids)) and pre[n] == ids[n]:
        n += 1
    return n
