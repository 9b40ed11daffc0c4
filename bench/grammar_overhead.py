"""What constrained decoding costs per token: decode tokens/s with and without a grammar, in turns.

The same chat prompt asks for JSON; each round decodes it once free and once under ``json_object``
and once under a JSON schema (xgrammar's mask, filled and applied every step), from a fresh cache,
alternating so that machine drift hits every variant alike. Prints one JSON line; writes
``grammar.json`` into ``--out``.

    python bench/grammar_overhead.py --out out/bench-grammar
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from sinkstream.chat import Conversation
from sinkstream.engine import Engine
from sinkstream.grammar import Grammars
from sinkstream.models import load_model
from sinkstream.sampling import SamplingParams

PROMPT = "Describe a week-long hiking trip as a JSON object with many fields: places, gear, meals, days."
SCHEMA = {
    "type": "object",
    "properties": {
        "trip": {"type": "string"},
        "days": {"type": "array", "items": {"type": "object", "properties": {
            "day": {"type": "integer"}, "place": {"type": "string"}, "plan": {"type": "string"}},
            "required": ["day", "place", "plan"]}},
    },
    "required": ["trip", "days"],
}  # fmt: skip


def decode_rate(engine: Engine, ids: list[int], max_new: int, constraint) -> tuple[float, int]:
    """(decode tokens/s, tokens) of one answer from a fresh cache."""
    engine.reset()
    engine.stats.tokens_generated, engine.stats.decode_s = 0, 0.0
    answer = engine.generate(ids, SamplingParams(max_new_tokens=max_new, temperature=0.0), constraint)
    n = sum(1 for t in answer if t.id >= 0)
    return n / engine.stats.decode_s, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/bench-grammar")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(None)
    engine = Engine(model, tok, n_sink=4, window=1020)
    grammars = Grammars(tok, model.config.get_text_config().vocab_size, engine.eos_ids)
    ids = Conversation().begin(tok, PROMPT)
    variants = {
        "free": lambda: None,
        "json_object": grammars.json_object,
        "json_schema": lambda: grammars.json_schema(SCHEMA),
    }
    rates = {name: [] for name in variants}
    tokens = {name: [] for name in variants}
    decode_rate(engine, ids, 16, None)  # warm-up
    for _ in range(args.rounds):
        for name, make in variants.items():
            rate, n = decode_rate(engine, ids, args.max_new_tokens, make())
            rates[name].append(rate)
            tokens[name].append(n)
    med = {name: statistics.median(r) for name, r in rates.items()}
    result = {
        "decode_tokens_per_s_median": {k: round(v, 2) for k, v in med.items()},
        "tokens_per_answer": tokens,
        "ratio_to_free": {k: round(v / med["free"], 3) for k, v in med.items()},
        "rounds": args.rounds,
        "threads": args.threads,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grammar.json").write_text(json.dumps({**result, "rates": rates}, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
