"""gpt-fast's recipe on this CPU: transformers' ``StaticCache`` (static shapes, no Python cache logic)
and ``torch.compile`` of the whole one-token forward, against the same forward eager and against
sinkstream's engine step. The three take turns in 16-step blocks (the machine's speed drifts).

    python bench/compile_static.py --out out/bench [--rounds 8]

All three use the embedded model as ``load_model`` gives it (decode layout) and oneDNN one-row
matmuls (``fast_cpu_matmul``, the engine's default), 1,024 tokens in the cache. The static cache
attends over its 1,100 preallocated slots (masked), as a compiled static step must. Tried for the
performance issue and not adopted; the README has the numbers. The last line is one JSON object.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sinkstream import Engine, load_model
from sinkstream.eval.data import gutenberg_text
from sinkstream.kernels import fast_cpu_matmul


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    from transformers import StaticCache

    torch.set_num_threads(args.threads)
    model, tok = load_model(attn_implementation="sdpa")  # StaticCache's masks need a stock attention
    engine_model, _ = load_model()
    ids = tok(gutenberg_text(max_chars=200_000), add_special_tokens=False).input_ids
    prefix, steps = 1024, args.rounds * args.block + 8
    cap = prefix + steps + 8
    caches = {name: StaticCache(config=model.config, max_cache_len=cap) for name in ("eager", "compiled")}

    def static_step(cache):
        def step(token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return model(token, past_key_values=cache, position_ids=pos, cache_position=pos[0], use_cache=True).logits
        return step

    engine = Engine(engine_model, tok, n_sink=4, window=1020)
    started = time.perf_counter()
    with torch.no_grad(), fast_cpu_matmul():
        for cache in caches.values():
            model(torch.tensor([ids[:prefix]]), past_key_values=cache, use_cache=True)
        engine.prefill(ids[:prefix])
        steps_fn = {"static cache, eager": static_step(caches["eager"]),
                    "static cache, torch.compile": torch.compile(static_step(caches["compiled"]), dynamic=False)}
        t0 = time.perf_counter()
        steps_fn["static cache, torch.compile"](torch.tensor([[ids[prefix]]]), torch.tensor([[prefix]]))
        compile_s = time.perf_counter() - t0
        steps_fn["static cache, eager"](torch.tensor([[ids[prefix]]]), torch.tensor([[prefix]]))
        engine.step(ids[prefix])
        times = {name: [] for name in [*steps_fn, "sinkstream engine step"]}
        pos = prefix + 1
        for _ in range(args.rounds):
            for name in times:
                for p in range(pos, pos + args.block):
                    t = time.perf_counter()
                    if name == "sinkstream engine step":
                        engine.step(ids[p])
                    else:
                        steps_fn[name](torch.tensor([[ids[p]]]), torch.tensor([[p]]))
                    times[name].append((time.perf_counter() - t) * 1000)
            pos += args.block
    base = statistics.median(times["static cache, eager"])
    result = {"command": "bench/compile_static.py", "threads": args.threads, "cached_tokens": prefix,
              "compile_s": round(compile_s, 1), "wall_s": round(time.perf_counter() - started, 1), "options": {}}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        med = statistics.median(ts)
        result["options"][name] = {"median_ms": round(med, 2), "p25_ms": round(q[0], 2), "p75_ms": round(q[2], 2),
                                   "vs_static_eager": round(base / med, 3)}
        print(f"{name:32s} {med:7.2f} ms  (p25-p75 {q[0]:.2f}-{q[2]:.2f})  {base / med:.3f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_static.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
