"""Exact chunked streaming evaluation vs token-by-token streaming, same model, text and cache, one run.

    python bench/chunked_speed.py --out out/bench [--tokens 6000] [--steps 300] [--chunk 256]

Token by token: the engine's decode step over ``--steps`` tokens once the cache is full (the cost a
token-by-token evaluation pays per token). Chunked: ``streaming_nll`` over ``--tokens`` tokens.
Both print their rate; the last line is one JSON object with the ratio.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from sinkstream import Engine, load_model
from sinkstream.eval.data import gutenberg_text
from sinkstream.eval.ppl import streaming_nll


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=6000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    ids = tok(gutenberg_text(max_chars=args.tokens * 8), add_special_tokens=False).input_ids[: args.tokens + 1]

    class NoTok:
        eos_token_id = None

    engine = Engine(model, NoTok(), n_sink=args.sink, window=args.window)
    warm = args.sink + args.window + 64
    engine.prefill(ids[:warm])
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in ids[warm : warm + args.steps]:
            engine.step(t)
    step_rate = args.steps / (time.perf_counter() - t0)
    print(f"token by token: {step_rate:.1f} tokens/s", flush=True)
    t0 = time.perf_counter()
    streaming_nll(model, torch.tensor(ids), args.sink, args.window, chunk=args.chunk, progress=False)
    chunk_rate = (len(ids) - 1) / (time.perf_counter() - t0)
    print(f"exact chunks of {args.chunk}: {chunk_rate:.1f} tokens/s", flush=True)
    result = {
        "token_by_token_tokens_per_s": round(step_rate, 2),
        "chunked_tokens_per_s": round(chunk_rate, 2),
        "speedup": round(chunk_rate / step_rate, 2),
        "chunk": args.chunk,
        "tokens": len(ids) - 1,
        "cache": f"{args.sink}+{args.window}",
        "minutes_per_million_tokens": round(1e6 / chunk_rate / 60, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chunked_speed.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
