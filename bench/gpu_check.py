"""The GPU check: the fused step's correctness and speed on an accelerator, in one short run.

    python bench/gpu_check.py --device cuda --out out/gpu-check       # bench/gpu_check.sh runs this
    python bench/gpu_check.py --device cpu --quick --out out/gpu-dry  # a dry run of the same code

1. Correctness, for every family the fused step covers (tiny random models built here) in float32 and
   bfloat16: the fused step (PyTorch backend, fixed shapes) against the transformers path over 600
   one-token steps with evictions and rebases, and a batch of rows of different lengths against each
   row alone. Reported: the largest logit difference relative to the logits' range.
2. Speed, on a SmolLM2-135M-shaped and a 1B-Llama-shaped model with random weights (no weights can be
   fetched there; speed does not depend on their values), bf16 and fp16 on CUDA (float32 in a CPU
   dry run), cache 4 + 4092: per-token ms of the fused step (eager, and captured with
   ``torch.compile(mode="reduce-overhead")`` where that works), of the transformers forward over the
   same cache, and of recomputing the 4096-token window.

Writes ``gpu_check.json`` into ``--out``; the last line printed is the same JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from helpers import random_ids, tiny_model  # noqa: E402
from sinkstream import SinkCache  # noqa: E402
from sinkstream.attention import register  # noqa: E402
from sinkstream.engine import forward_stream  # noqa: E402
from sinkstream.fused import FusedDecoder  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
SHAPES = {  # LlamaConfig fields
    "smollm2-135m-shape": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-1b-shape": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_family(family: str, dtype, device, steps: int) -> dict:
    ref = tiny_model(family, layers=2, attn="sdpa").to(device=device, dtype=dtype)
    ref.set_attn_implementation(register())
    fused = FusedDecoder(tiny_model(family, layers=2, attn="sdpa").to(device=device, dtype=dtype), "torch")
    a = SinkCache(4, 28, config=ref.config)
    b = SinkCache(4, 28, config=ref.config)
    ids = random_ids(steps + 40, seed=1)[0].to(device)  # the last 40 feed the batch
    worst, spread = 0.0, 0.0
    with torch.no_grad():
        for t in range(steps):
            want, _ = forward_stream(ref, a, ids[t : t + 1][None])
            got, _ = forward_stream(fused.model, b, ids[t : t + 1][None], fused=fused)
            worst = max(worst, float((got.float() - want.float()).abs().max()))
            spread = max(spread, float(want.float().max() - want.float().min()))
        rows = [SinkCache(4, 28, config=ref.config) for _ in range(3)]
        for r, n in zip(rows, (3, 20, 70)):
            for t in range(n):
                forward_stream(fused.model, r, ids[t : t + 1][None], fused=fused)
        batch = SinkCache.stack(rows)
        batch_worst = 0.0
        for t in range(40):
            x = ids[steps + t : steps + t + 1]
            together = fused.step(batch, x.expand(3))
            for i, r in enumerate(rows):
                alone = fused.step(r, x)
                batch_worst = max(batch_worst, float((together[i].float() - alone[0].float()).abs().max()))
    return {"max_abs_diff": worst, "relative": worst / spread, "batch_vs_alone": batch_worst, "steps": steps}


def time_steps(fn, n: int, device) -> float:
    for _ in range(3):
        fn()
    sync(device)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3)


def bench_shape(name: str, dtype, device, cache: int, steps: int) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        **SHAPES[name], max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    model.set_attn_implementation(register())
    ids = torch.randint(0, cfg.vocab_size, (1, cache + 2 * steps + 32), device=device)
    n_sink, window = 4, cache - 4
    row = {}
    with torch.no_grad():
        c = SinkCache(n_sink, window, config=cfg)
        for s in range(0, cache + 16, window // 2):  # fill the cache, then a little more: steady state
            forward_stream(model, c, ids[:, s : min(cache + 16, s + window // 2)])
        tok = ids[:, cache + 16 : cache + 17]
        row["transformers_ms"] = time_steps(lambda: forward_stream(model, c, tok), steps, device)
        fused = FusedDecoder(model, "torch")
        row["fused_eager_ms"] = time_steps(lambda: forward_stream(model, c, tok, fused=fused), steps, device)
        try:
            fused.compile(mode="reduce-overhead" if device.type == "cuda" else "default")
            row["fused_compiled_ms"] = time_steps(lambda: forward_stream(model, c, tok, fused=fused), steps, device)
        except Exception as e:
            row["fused_compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        window_ids = ids[:, :cache]
        row["recompute_ms"] = time_steps(
            lambda: model(input_ids=window_ids, logits_to_keep=1), max(3, steps // 8), device
        )
    best = min(v for k, v in row.items() if k.startswith("fused") and k.endswith("_ms"))
    row["fused_vs_transformers"] = round(row["transformers_ms"] / best, 2)
    row["fused_vs_recompute"] = round(row["recompute_ms"] / best, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="out/gpu-check")
    ap.add_argument("--quick", action="store_true", help="fewer steps and only the small shape (a dry run)")
    args = ap.parse_args()
    device = torch.device(args.device)
    result = {"device": str(device), "torch": torch.__version__, "checks": {}, "bench": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    steps = 120 if args.quick else 600
    for dtype in (torch.float32, torch.bfloat16):
        for family in FAMILIES:
            key = f"{family} {str(dtype).removeprefix('torch.')}"
            try:
                result["checks"][key] = check_family(family, dtype, device, steps)
            except Exception as e:
                result["checks"][key] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-800:]}
            print(key, result["checks"][key], file=sys.stderr, flush=True)
    shapes = ["smollm2-135m-shape"] if args.quick else list(SHAPES)
    # half precision is what a GPU runs; on a CPU (a dry run) it is emulated and takes minutes a step
    bench_dtypes = (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32,)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in shapes:
        for dtype in bench_dtypes:
            key = f"{name} {str(dtype).removeprefix('torch.')}"
            try:
                result["bench"][key] = bench_shape(
                    name, dtype, device, 512 if args.quick else 4096, 10 if args.quick else 50
                )
            except Exception as e:
                result["bench"][key] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-800:]}
            print(key, result["bench"][key], file=sys.stderr, flush=True)
            (out / "gpu_check.json").write_text(json.dumps(result, indent=2))  # what a timeout leaves
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
