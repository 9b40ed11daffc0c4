"""Endless chat: all MT-Bench turns as one conversation through one cache, against a dense cache.

Every answer, its decode speed, the tokens seen and cached and the process memory are recorded per
turn. The streaming session never resets; the dense baseline runs the same conversation until it
breaks: the next turn would take positions past the model's maximum, or memory passes a cap.
"""

from __future__ import annotations

import time

from ..chat import ChatSession
from ..engine import Engine, SamplingParams
from ..memory import rss_mb


def run_chat(
    engine: Engine,
    questions: list[dict],
    params: SamplingParams,
    *,
    max_positions: int | None = None,
    max_rss_mb: float | None = None,
    progress: bool = True,
    pin: str | int = "none",
) -> tuple[list[dict], str]:
    """(one record per turn, why it ended). ``max_positions``/``max_rss_mb`` stop the run before a turn
    that would break them (the dense baseline); streaming passes neither."""
    from tqdm import tqdm

    chat = ChatSession(engine, pin=pin)
    turns = [(q["question_id"], i, text) for q in questions for i, text in enumerate(q["turns"])]
    records, ended = [], "all turns answered"
    for qid, i, text in tqdm(turns, disable=not progress, desc="dense" if engine.dense else "streaming"):
        new = len(engine.tokenizer(chat.new_turn_text(text), add_special_tokens=False).input_ids)
        if max_positions and engine.tokens_seen + new + params.max_new_tokens > max_positions:
            ended = f"the next turn would pass the model's {max_positions} positions"
            break
        if max_rss_mb and rss_mb() > max_rss_mb:
            ended = f"memory passed the {max_rss_mb:.0f} MB cap"
            break
        before, t0 = engine.stats.tokens_generated, time.perf_counter()
        d0 = engine.stats.decode_s
        answer = "".join(chat.send(text, params))
        generated = engine.stats.tokens_generated - before
        decode_s = engine.stats.decode_s - d0
        records.append(
            {
                "question_id": qid,
                "turn": i + 1,
                "prompt_tokens": new,
                "tokens_generated": generated,
                "seconds": round(time.perf_counter() - t0, 2),
                "decode_tokens_per_s": round(generated / decode_s, 2) if decode_s else None,
                "tokens_seen": engine.tokens_seen,
                "tokens_cached": engine.tokens_cached,
                "rss_mb": round(rss_mb(), 1),
                "question": text,
                "answer": answer,
            }
        )
    return records, ended
