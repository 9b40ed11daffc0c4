"""One decode step, every way sinkstream can run it, timed in turns on the same stream positions.

    python bench/fused_step.py --out out/bench-fused [--rounds 6] [--steps 32] [--threads 2]

Variants: the transformers forward over float32 weights (the step before the fused decoder), the
fused step over float32, bfloat16 and int8 weights, and the fused step's PyTorch backend (int8).
Each variant's stream is prefilled with the same text and snapshotted at two points: while the cache
fills (~1k tokens seen) and at steady state (the 4+1020 cache full for a whole window, ~2k tokens).
A round restores every variant's snapshot in turn and times ``--steps`` teacher-forced steps from it,
so the machine's drift moves every variant alike. Reported: median ms per step over all rounds,
tokens/s, and each variant's speed relative to the transformers float32 step. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sinkstream import SinkCache, load_model
from sinkstream.engine import forward_stream
from sinkstream.eval.data import gutenberg_text
from sinkstream.fused import FusedDecoder

POINTS = {"1k": 960, "steady": 2048}


def variants():
    """(name, model, fused decoder or None); models loaded once per weight format."""
    fp32, tok = load_model(weights="float32")
    transformers_fp32, _ = load_model(weights="float32")
    bf16, _ = load_model(weights="bfloat16")
    int8, _ = load_model(weights="int8")
    int8_torch, _ = load_model(weights="int8")
    return tok, [
        ("transformers float32", transformers_fp32, None),
        ("fused float32", fp32, FusedDecoder.for_model(fp32)),
        ("fused bfloat16", bf16, FusedDecoder.for_model(bf16)),
        ("fused int8 (default)", int8, FusedDecoder.for_model(int8)),
        ("fused int8, torch backend", int8_torch, FusedDecoder.for_model(int8_torch, "torch")),
    ]


def prefill(model, ids: list[int], n: int) -> SinkCache:
    cache = SinkCache(4, 1020, config=model.config)
    for s in range(0, n, 510):
        forward_stream(model, cache, torch.tensor([ids[s : min(n, s + 510)]]))
    return cache


def timed(model, fused, state, ids, start: int, steps: int) -> list[float]:
    cache = SinkCache.from_state({k: v.clone() for k, v in state[0].items()}, state[1], config=model.config)
    out = []
    for t in range(start, start + steps):
        t0 = time.perf_counter()
        forward_stream(model, cache, torch.tensor([[ids[t]]]), fused=fused)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/bench-fused")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok, runs = variants()
    ids = tok(gutenberg_text(book="austen-emma"), add_special_tokens=False).input_ids[: max(POINTS.values()) + 200]
    result = {
        "command": "bench/fused_step.py",
        "threads": args.threads,
        "rounds": args.rounds,
        "steps": args.steps,
        "cache": "4+1020",
        "points": POINTS,
        "ms": {},
        "tokens_per_s": {},
        "vs_transformers_float32": {},
    }
    with torch.no_grad():
        states = {}
        for name, model, _ in runs:
            for point, n in POINTS.items():
                tensors, meta = prefill(model, ids, n).state()
                states[name, point] = ({k: v.clone() for k, v in tensors.items()}, meta)
        times = {(name, point): [] for name, _, _ in runs for point in POINTS}
        for r in range(args.rounds):
            for point, n in POINTS.items():
                for name, model, fused in runs:
                    times[name, point] += timed(model, fused, states[name, point], ids, n, args.steps)[2:]
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    for point in POINTS:
        base = statistics.median(times["transformers float32", point])
        for name, _, _ in runs:
            ms = statistics.median(times[name, point])
            result["ms"].setdefault(point, {})[name] = round(ms, 2)
            result["tokens_per_s"].setdefault(point, {})[name] = round(1000 / ms, 2)
            result["vs_transformers_float32"].setdefault(point, {})[name] = round(base / ms, 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fused_step.json").write_text(json.dumps(result, indent=2))
    for point in POINTS:
        for name in result["ms"][point]:
            print(
                f"{point:>6} {name:28s} {result['ms'][point][name]:7.2f} ms  {result['tokens_per_s'][point][name]:7.2f} "
                f"tokens/s  {result['vs_transformers_float32'][point][name]:5.2f}x",
                file=sys.stderr,
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
