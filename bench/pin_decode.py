"""What a pinned prefix costs per decoded token: the same total cache with 4 sinks or P pinned tokens.

    python bench/pin_decode.py --out out/bench-pin [--model qwen2.5-0.5b] [--pins 4,69,300] [--rounds 6]

A pinned prefix of P tokens is the cache's sinks: the window shrinks by P - n_sink so the cache holds
the same number of tokens. Each pin gets its own stream over one shared model, prefilled with the same
text past the point where the cache is full (steady state: evictions every step). A round times
``--steps`` teacher-forced decode steps of every stream, in turns (the order alternates between rounds),
so the machine's drift moves every variant alike. Reported: median ms per step over all rounds,
tokens/s, and each pin's speed relative to the plain sinks. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sinkstream import load_model
from sinkstream.engine import Engine
from sinkstream.eval.data import gutenberg_text


def timed_steps(engine: Engine, ids: list[int]) -> list[float]:
    out = []
    for token in ids:
        t0 = time.perf_counter()
        engine.step(token)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/bench-pin")
    ap.add_argument("--model", default=None, help="a registry name (default: the embedded model)")
    ap.add_argument("--pins", default="4,69,300", help="pinned tokens per stream; the first is the baseline")
    ap.add_argument("--cache", type=int, default=1024, help="total cache tokens, the same for every pin")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    pins = [int(p) for p in args.pins.split(",")]
    if any(p < 1 or p >= args.cache // 2 for p in pins):
        sys.exit(f"pins must be between 1 and {args.cache // 2 - 1} for a cache of {args.cache}")
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    prefill_n = 2 * args.cache
    ids = tok(gutenberg_text(book="austen-emma"), add_special_tokens=False).input_ids
    ids = ids[: prefill_n + args.rounds * args.steps]
    engines = {}
    for p in pins:
        engine = Engine(model, tok, n_sink=4, window=args.cache - 4, pin=p)
        engine.prefill(ids[:prefill_n])
        engines[p] = engine
    times = {p: [] for p in pins}
    for r in range(args.rounds):
        chunk = ids[prefill_n + r * args.steps : prefill_n + (r + 1) * args.steps]
        for p in pins if r % 2 == 0 else reversed(pins):
            times[p] += timed_steps(engines[p], chunk)
    base = statistics.median(times[pins[0]])
    rows = {}
    for p in pins:
        ms = statistics.median(times[p])
        rows[str(p)] = {"tokens_pinned": engines[p].cache.pins[0], "window": args.cache - engines[p].cache.pins[0],
                        "ms_per_token": round(ms, 3), "tokens_per_s": round(1000 / ms, 2),
                        "speed_vs_sinks": round(base / ms, 3)}  # fmt: skip
    result = {"command": "bench/pin_decode.py", "model": args.model or "smollm2-135m", "cache": args.cache,
              "threads": args.threads, "rounds": args.rounds, "steps": args.steps, "pins": rows}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pin_decode.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
