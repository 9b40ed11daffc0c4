"""Facts in the system prompt, asked about again and again over a long chat: what a pinned prefix keeps.

A system prompt states a few facts about the user; the chat then runs for hundreds of turns, MT-Bench
questions (long answers that move the window on) with a question about one of the facts every few turns.
The same script runs through two chats side by side, one with the system prompt pinned (``pin``) and one
with the attention sinks alone, turn by turn in alternating order (so the machine's noise falls on both).
Once the conversation has outgrown the cache, the unpinned chat has lost the facts with the system
prompt: what it answers then is a guess. Each answer is scored by whether it contains the fact's word.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..chat import ChatSession
from ..engine import Engine, SamplingParams


@dataclass(frozen=True)
class Fact:
    statement: str  # in the system prompt
    question: str  # asked during the chat
    answer: str  # what a correct answer contains (case-insensitive)


FACTS = (
    Fact("The user's name is Ada.", "What is my name? Answer in a few words.", "ada"),
    Fact("The user's dog is called Biscuit.", "What is my dog called? Answer in a few words.", "biscuit"),
    Fact("The user lives in Porto.", "Which city do I live in? Answer in a few words.", "porto"),
    Fact("The user's favourite colour is teal.", "What is my favourite colour? Answer in a few words.", "teal"),
    Fact("The user works as a baker.", "What is my job? Answer in a few words.", "baker"),
    Fact("The user drives a red Volvo.", "What car do I drive? Answer in a few words.", "volvo"),
)


def system_prompt(facts=FACTS) -> str:
    return "You are a helpful assistant. What you know about the user: " + " ".join(f.statement for f in facts)


def script(fillers: list[str], turns: int, every: int, facts=FACTS) -> list[tuple[str, Fact | None]]:
    """``turns`` user messages: a question about the next fact every ``every`` turns, fillers between."""
    out, asked, filled = [], 0, 0
    for t in range(turns):
        if (t + 1) % every == 0:
            out.append((facts[asked % len(facts)].question, facts[asked % len(facts)]))
            asked += 1
        else:
            out.append((fillers[filled % len(fillers)], None))
            filled += 1
    return out


def run_facts(
    engines: dict[str, Engine],
    pins: dict[str, str | int],
    messages: list[tuple[str, Fact | None]],
    *,
    filler_tokens: int = 128,
    answer_tokens: int = 32,
    progress: bool = True,
) -> list[dict]:
    """Every message through every chat (``engines[label]`` pinned as ``pins[label]``), turn by turn in
    alternating order; one record per chat and fact question."""
    from tqdm import tqdm

    system = system_prompt()
    chats = {label: ChatSession(engine, system=system, pin=pins[label]) for label, engine in engines.items()}
    records = []
    for t, (text, fact) in enumerate(tqdm(messages, disable=not progress, desc="facts", unit="turn")):
        params = SamplingParams(max_new_tokens=answer_tokens if fact else filler_tokens)
        labels = list(chats) if t % 2 == 0 else list(reversed(chats))
        for label in labels:
            chat, engine = chats[label], engines[label]
            t0 = time.perf_counter()
            answer = "".join(chat.send(text, params))
            if fact is None:
                continue
            records.append({
                "chat": label, "turn": t + 1, "question": text, "expected": fact.answer, "answer": answer.strip(),
                "correct": fact.answer in answer.lower(), "tokens_seen": engine.tokens_seen,
                "tokens_pinned": engine.cache.pins[0], "seconds": round(time.perf_counter() - t0, 2),
            })  # fmt: skip
    return records


def summarize(records: list[dict], engines: dict[str, Engine], capacity: int) -> dict:
    """Accuracy of each chat while the whole conversation still fits in the cache, and after (when the
    unpinned chat has lost its system prompt), and each chat's decode speed."""

    def acc(rs):
        return {"questions": len(rs), "accuracy": round(sum(r["correct"] for r in rs) / len(rs), 4) if rs else None}

    out = {}
    for label, engine in engines.items():
        mine = [r for r in records if r["chat"] == label]
        s = engine.stats
        out[label] = {
            "tokens_pinned": engine.cache.pins[0],
            "all": acc(mine),
            "within_cache": acc([r for r in mine if r["tokens_seen"] <= capacity]),
            "past_cache": acc([r for r in mine if r["tokens_seen"] > capacity]),
            "tokens_seen": engine.tokens_seen,
            "decode_tokens_per_s": round(s.tokens_generated / s.decode_s, 2) if s.decode_s else None,
        }
    return out


def markdown(summary: dict) -> str:
    rows = ["| chat | tokens pinned | accuracy, all | while it fits the cache | past the cache | decode tokens/s |",
            "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label, s in summary.items():
        cells = [f"{s[k]['accuracy']:.1%} ({s[k]['questions']})" if s[k]["accuracy"] is not None else "–"
                 for k in ("all", "within_cache", "past_cache")]  # fmt: skip
        rows.append(f"| {label} | {s['tokens_pinned']} | {' | '.join(cells)} | {s['decode_tokens_per_s']} |")
    return "\n".join(rows) + "\n"
