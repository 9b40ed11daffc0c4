"""RoPE precision at large positions: bounded engine positions vs generate()-style absolute ones.

    python bench/position_precision.py --out out/bench

``model.generate`` (and a plain forward without position ids) puts each token at its absolute
position in the stream: transformers computes ``position * inv_freq`` in float32, whose error
grows with the position. The engine rebases so positions stay below ``n_sink + 2 * window``.
For each offset O, 4 sinks are fed at 0..3, then the stream jumps to text index O (as if O tokens
had passed) and a window of real text is streamed at absolute positions; we report the max
|Δlogit| and the perplexity of the next tokens against the bounded-position run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from sinkstream import SinkCache, load_model
from sinkstream.eval.data import gutenberg_text


@torch.no_grad()
def stream_logits(model, ids, offset, n_sink, window, eval_n):
    cache = SinkCache(n_sink, window, config=model.config)
    model(torch.tensor([ids[:n_sink]]), past_key_values=cache)
    for layer in cache.layers:
        layer.seen += offset  # `offset` tokens passed through and left the window
    body = ids[n_sink : len(ids) - eval_n]
    for s in range(0, len(body), window // 2):
        model(torch.tensor([body[s : s + window // 2]]), past_key_values=cache)
    if offset == 0:
        cache.rebase()  # the engine's bounded frame
    out = []
    for t in ids[len(ids) - eval_n :]:
        out.append(model(torch.tensor([[t]]), past_key_values=cache).logits[0, -1])
    return torch.stack(out), cache.get_seq_length()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--eval", type=int, default=128)
    ap.add_argument("--offsets", default="10000,100000,1000000,4000000,16000000")
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model(args.model)
    n = 4 + args.window + args.eval
    ids = tok(gutenberg_text(max_chars=n * 8)).input_ids[:n]
    ref, ref_pos = stream_logits(model, ids, 0, 4, args.window, args.eval)
    targets = torch.tensor(ids[len(ids) - args.eval + 1 :])

    def ppl(logits):
        return math.exp(torch.nn.functional.cross_entropy(logits[:-1], targets).item())

    rows = {"bounded": {"max_position": ref_pos, "max_abs_dlogit": 0.0, "ppl": round(ppl(ref), 4)}}
    for off in [int(x) for x in args.offsets.split(",")]:
        logits, pos = stream_logits(model, ids, off, 4, args.window, args.eval)
        rows[str(off)] = {
            "max_position": pos,
            "max_abs_dlogit": round((logits - ref).abs().max().item(), 5),
            "ppl": round(ppl(logits), 4),
        }
        print(off, rows[str(off)], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model or "smollm2-135m", "window": args.window, "eval_tokens": args.eval, "rows": rows}
    (out / "position_precision.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
