"""RSS of a chat-like stream: many prefills of different lengths, each followed by a few decode steps.

    python bench/prefill_memory.py --out out/bench [--turns 60] [--onednn]

``--onednn`` runs the prefills under ``fast_cpu_matmul`` (what the engine did for a while): oneDNN
caches one primitive per matmul shape, so prompts of ever-different lengths grow the process. The
last line is one JSON object with RSS after the first and the last turn.
"""

import argparse
import json
import random
from contextlib import nullcontext
from pathlib import Path

import torch

from sinkstream import Engine, load_model
from sinkstream.cpu_matmul import fast_cpu_matmul
from sinkstream.eval.data import gutenberg_text
from sinkstream.memory import rss_mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=60)
    ap.add_argument("--onednn", action="store_true")
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model()
    ids = tok(gutenberg_text(max_chars=200_000), add_special_tokens=False).input_ids
    engine = Engine(model, tok, n_sink=4, window=1020)
    rng, pos, rss = random.Random(0), 0, []
    with torch.no_grad():
        for _ in range(args.turns):
            n = rng.randint(20, 160)  # a new message of a new length every turn
            with fast_cpu_matmul() if args.onednn else nullcontext():
                engine.prefill(ids[pos : pos + n])
            pos += n
            for t in ids[pos : pos + 8]:
                engine.step(t)
            pos += 8
            rss.append(round(rss_mb(), 1))
    result = {
        "onednn_prefill": args.onednn,
        "turns": args.turns,
        "tokens_seen": engine.tokens_seen,
        "rss_mb_first_turn": rss[0],
        "rss_mb_last_turn": rss[-1],
        "growth_mb": round(rss[-1] - rss[0], 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"prefill_memory{'_onednn' if args.onednn else ''}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
