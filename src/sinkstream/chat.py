"""Chat sessions on the engine: the cache is kept across turns, each turn prefills only the new
message (rendered with the model's chat template), never the history."""

from __future__ import annotations

from collections.abc import Iterator

from .engine import Engine, SamplingParams


class ChatSession:
    def __init__(self, engine: Engine, system: str | None = None):
        self.engine, self.system = engine, system
        self.reset()

    def reset(self) -> None:
        """Start a new conversation (empty cache)."""
        self.engine.reset()
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.fed_text = ""  # exactly the text whose tokens are in the stream so far
        self.turns = 0

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        tok = self.engine.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        # no template: a plain transcript
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return text + ("Assistant:" if add_generation_prompt else "")

    def new_turn_text(self, message: str) -> str:
        """The text to feed for ``message``: what the rendered conversation adds to what was fed."""
        user = {"role": "user", "content": message}
        full = self._render(self.messages + [user], True)
        if full.startswith(self.fed_text):
            return full[len(self.fed_text) :]
        # The template renders the history differently from what was fed (an answer cut at a stop
        # string, a template that trims): close the last answer turn, then add the new turn.
        hist = self._render(self.messages, False)
        delta = full[len(hist) :] if full.startswith(hist) else self._render([user], True)
        if self.messages and self.messages[-1]["role"] == "assistant":
            before = self._render(self.messages[:-1], True)
            turn, answer = hist[len(before) :], self.messages[-1]["content"]
            if hist.startswith(before) and turn.startswith(answer):
                delta = turn[len(answer) :] + delta
        return delta

    def send(self, message: str, params: SamplingParams | None = None) -> Iterator[str]:
        """Stream the answer to ``message`` as text pieces. Interrupting the iteration keeps the
        partial answer in the conversation (its tokens are in the cache)."""
        if not message.strip():
            raise ValueError("empty message")
        delta = self.new_turn_text(message)
        ids = self.engine.tokenizer(delta, add_special_tokens=False).input_ids
        self.messages.append({"role": "user", "content": message})
        self.fed_text += delta
        generated: list[int] = []
        try:
            for tok in self.engine.generate(ids, params):
                if tok.id >= 0:
                    generated.append(tok.id)
                if tok.text:
                    yield tok.text
        finally:
            # the answer as the model wrote it (special tokens too), so that re-rendering the
            # conversation reproduces what was fed; the last sampled token may not be fed yet
            answer = self.engine.tokenizer.decode(generated, skip_special_tokens=False)
            if self.engine.stop_hit:
                answer = self.engine.last_text  # cut before the stop string
            self.messages.append({"role": "assistant", "content": answer})
            fed = generated[:-1] if generated and self.engine.unfed is not None else generated
            self.fed_text += self.engine.tokenizer.decode(fed, skip_special_tokens=False)
            self.turns += 1
