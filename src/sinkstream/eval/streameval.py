"""StreamEval (the paper's sec. 4.3, generated here): streaming question answering.

The chat model reads LongEval-style lines ``line <id>: REGISTER_CONTENT is <number>``, ten per turn,
and every turn ends with a question about one earlier line; it answers as the stream goes on, through
one ChatSession (one cache, never reset). Accuracy is reported against the distance, in tokens, from
the asked line to the question: within the cache the line can be read; beyond it the line has left
the cache and the answer can only be a guess (streaming does not extend the context).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..chat import ChatSession
from ..engine import Engine, SamplingParams

WORDS = (
    "amber",
    "birch",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "grove",
    "harbor",
    "iris",
    "jade",
    "kelp",
    "lotus",
    "maple",
    "nectar",
    "onyx",
    "pearl",
    "quartz",
    "raven",
    "sage",
    "tundra",
    "umber",
    "violet",
    "willow",
    "yarrow",
)
INSTRUCTION = (
    "Below is a record of lines I want you to remember. Each line has an id and a REGISTER_CONTENT "
    "number. After each block I will ask for the REGISTER_CONTENT of one line; answer with the number only."
)


@dataclass
class Line:
    index: int
    name: str
    value: int

    def text(self) -> str:
        return f"line {self.name}: REGISTER_CONTENT is <{self.value}>"


def make_lines(n: int, seed: int = 0) -> list[Line]:
    rng = random.Random(seed)
    names = set()
    lines = []
    while len(lines) < n:
        name = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{rng.randint(10, 99)}"
        if name not in names:
            names.add(name)
            lines.append(Line(len(lines), name, rng.randint(10000, 99999)))
    return lines


def run_streameval(
    engine: Engine,
    n_lines: int = 400,
    per_turn: int = 10,
    back: tuple[int, int] = (5, 40),
    seed: int = 0,
    max_new_tokens: int = 32,
    progress: bool = True,
    pin: str | int = "none",
    instruction: str = "user",
) -> list[dict]:
    """Stream ``n_lines`` lines, ``per_turn`` per turn; after each turn ask about a line ``back`` lines ago
    (uniform in the range, when it exists). Returns one record per question. The instruction opens the
    first user message (``user``, the paper's setting) or is the system prompt (``system``), which
    ``pin`` may keep in the cache (``ChatSession``)."""
    from tqdm import tqdm

    rng = random.Random(seed + 1)
    lines = make_lines(n_lines, seed)
    chat = ChatSession(engine, system=INSTRUCTION if instruction == "system" else None, pin=pin)
    tok = engine.tokenizer
    start_token: dict[int, int] = {}  # line index -> tokens seen when the line starts (approximately)
    records = []
    params = SamplingParams(max_new_tokens=max_new_tokens, stop=("\n",))
    for t in tqdm(range(0, n_lines, per_turn), disable=not progress, desc="streameval", unit="turn"):
        block = lines[t : t + per_turn]
        ask = block[-1].index - rng.randint(*back)
        if ask < 0:
            ask = rng.randint(0, block[-1].index)
        target = lines[ask]
        head = (INSTRUCTION + "\n\n") if t == 0 and instruction == "user" else ""
        body = "\n".join(x.text() for x in block)
        question = f"\n\nQuestion: what is the REGISTER_CONTENT of line {target.name}? Answer with the number only."
        message = head + body + question
        delta = chat.new_turn_text(message)
        base = engine.tokens_seen + len(tok(delta[: delta.find(head + body)], add_special_tokens=False).input_ids)
        for x in block:  # token offset of each line inside the turn
            before = head + "\n".join(y.text() for y in block[: x.index - block[0].index])
            start_token[x.index] = base + len(tok(before, add_special_tokens=False).input_ids)
        answer = "".join(chat.send(message, params))
        distance = engine.tokens_seen - start_token[target.index]
        records.append(
            {
                "turn": t // per_turn,
                "asked_line": target.index,
                "lines_back": block[-1].index - target.index,
                "distance_tokens": distance,
                "expected": target.value,
                "answer": answer.strip(),
                "correct": str(target.value) in answer,
                "tokens_seen": engine.tokens_seen,
                "in_cache": distance < engine.n_sink + engine.window,
            }
        )
    return records


def summarize(records: list[dict], n_sink: int, window: int) -> dict:
    def acc(rs):
        return round(sum(r["correct"] for r in rs) / len(rs), 4) if rs else None

    inside = [r for r in records if r["in_cache"]]
    beyond = [r for r in records if not r["in_cache"]]
    return {
        "questions": len(records),
        "accuracy": acc(records),
        "cache": n_sink + window,
        "within_cache": {"questions": len(inside), "accuracy": acc(inside)},
        "beyond_cache": {"questions": len(beyond), "accuracy": acc(beyond)},
    }
