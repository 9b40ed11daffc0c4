"""How much the demo chat repeats itself under different sampling presets.

Runs the demo's rounds (``demo/prompts.txt``, cache 4 + 508 as ``make demo``) once per preset, in one
process, and scores every answer: distinct-2 (distinct word bigrams / bigrams, Li et al. 2016), the
share of repeated word 4-grams, and the most times one sentence recurs in one answer. Prints one
JSON line; writes ``repetition.json`` (every answer) into ``--out``.

    python bench/chat_repetition.py --out out/bench-repetition
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

import torch

from sinkstream.chat import ChatSession
from sinkstream.cli.options import read_prompts
from sinkstream.engine import Engine
from sinkstream.models import load_model
from sinkstream.sampling import SamplingParams

PRESETS = {
    "greedy (the old default)": dict(temperature=0.0),
    "greedy + repetition 1.1": dict(temperature=0.0, repetition_penalty=1.1),
    "greedy + repetition 1.2": dict(temperature=0.0, repetition_penalty=1.2),
    "sampled (T 0.7, top-p 0.9, min-p 0.05) + repetition 1.1": dict(
        temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.1
    ),
}


def scores(text: str) -> dict:
    words = re.findall(r"\w+(?:'\w+)?", text.lower())
    bigrams = list(zip(words, words[1:]))
    grams4 = Counter(zip(words, words[1:], words[2:], words[3:]))
    sentences = Counter(s.strip().lower() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if len(s.strip()) > 10)
    n4 = sum(grams4.values())
    return {
        "words": len(words),
        "distinct_2": round(len(set(bigrams)) / len(bigrams), 4) if bigrams else 1.0,
        "repeated_4gram_share": round(sum(c - 1 for c in grams4.values()) / n4, 4) if n4 else 0.0,
        "max_sentence_repeats": max(sentences.values(), default=0),
    }


def run_preset(engine: Engine, prompts: list[str], preset: dict, max_new: int) -> list[dict]:
    session = ChatSession(engine)
    answers = []
    for message in prompts:
        params = SamplingParams(max_new_tokens=max_new, seed=0, **preset)
        text = "".join(session.send(message, params))
        answers.append({"prompt": message, "answer": text, **scores(text)})
    return answers


def summary(answers: list[dict]) -> dict:
    n = len(answers)
    return {
        "mean_distinct_2": round(sum(a["distinct_2"] for a in answers) / n, 4),
        "mean_repeated_4gram_share": round(sum(a["repeated_4gram_share"] for a in answers) / n, 4),
        "answers_with_a_sentence_3x_or_more": sum(a["max_sentence_repeats"] >= 3 for a in answers),
        "worst_sentence_repeats": max(a["max_sentence_repeats"] for a in answers),
        "mean_words": round(sum(a["words"] for a in answers) / n, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/bench-repetition")
    ap.add_argument("--prompts", default="demo/prompts.txt")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(None)
    engine = Engine(model, tok, n_sink=4, window=508)
    prompts = read_prompts(args.prompts)
    results = {}
    for name, preset in PRESETS.items():
        t0 = time.perf_counter()
        answers = run_preset(engine, prompts, preset, args.max_new_tokens)
        results[name] = {"preset": preset, **summary(answers), "seconds": round(time.perf_counter() - t0, 1),
                         "answers": answers}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "repetition.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print(json.dumps({k: {f: v for f, v in r.items() if f != "answers"} for k, r in results.items()}))


if __name__ == "__main__":
    main()
