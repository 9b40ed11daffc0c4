"""Decode-step options side by side, interleaved in one process (the machine's speed drifts, so
each option runs 16-step blocks in turn): attention implementation, the weights' memory layout,
inference mode, oneDNN matmuls for one-row steps, and torch.compile of the MLPs and LM head.

    python bench/decode_options.py --out out/bench [--rounds 12]

Every option streams the same text through its own engine (4 + 1020, 1,500 tokens prefilled).
"sdpa" is the foundation's step: standard [out, in] weights, SDPA. The layout options use a copy
of the model with ``decode_layout`` (load_model's default on CPU); the compiled option a third. The last line is one JSON object: per option
the median and quartiles of its step times and its speed relative to "sdpa" (the foundation's).
"""

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from sinkstream import Engine, load_model
from sinkstream.attention import register
from sinkstream.eval.data import gutenberg_text
from sinkstream.kernels import fast_cpu_matmul


def compile_for_decode(model) -> list[str]:
    """``torch.compile`` every decoder layer's MLP and the LM head (most of the weights, no cache),
    with inductor's frozen, prepacked weights. Attention stays eager (the cache is Python code).
    Tried for the performance issue and not adopted: no gain measured (see the README)."""
    import torch._dynamo.config as dynamo_config

    names = [name for name, mod in model.named_modules()
             if name.rsplit(".", 1)[-1] in ("mlp", "ffn") and not hasattr(mod, "experts") and not hasattr(mod, "router")]
    head = model.get_output_embeddings()
    targets = [model.get_submodule(n) for n in names] + ([head] if head is not None else [])
    # one compiled graph per module instance (and per shape): lift dynamo's default limit of 8
    need = 4 * len(targets) + 8
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, need)
    dynamo_config.accumulated_cache_size_limit = max(dynamo_config.accumulated_cache_size_limit, 4 * need)
    for mod in targets:
        if getattr(mod, "_compiled_call_impl", None) is None:  # not twice
            mod.compile(options={"freezing": True, "cpp.weight_prepack": True})
    return names + (["lm_head"] if head is not None else [])


@contextmanager
def mkl_steps():
    """PyTorch's default kernels for the engine's one-token steps too (they run oneDNN by default)."""
    before = os.environ.get("SINKSTREAM_CPU_MATMUL")
    os.environ["SINKSTREAM_CPU_MATMUL"] = "default"
    try:
        yield
    finally:
        if before is None:
            del os.environ["SINKSTREAM_CPU_MATMUL"]
        else:
            os.environ["SINKSTREAM_CPU_MATMUL"] = before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(decode_layout=False)
    laid, _ = load_model(decode_layout=True)
    compiled, _ = load_model(decode_layout=False)
    register()
    compile_for_decode(compiled)
    ids = tok(gutenberg_text(max_chars=200_000), add_special_tokens=False).input_ids
    # name: (model, attention, grad mode, matmul kernels)
    options = {
        "sdpa": (model, "sdpa", torch.no_grad, mkl_steps),
        "eager": (model, "eager", torch.no_grad, mkl_steps),
        "sinkstream attention": (model, "sinkstream", torch.no_grad, mkl_steps),
        "sinkstream + decode layout": (laid, "sinkstream", torch.no_grad, mkl_steps),
        "decode layout + inference_mode": (laid, "sinkstream", torch.inference_mode, mkl_steps),
        "decode layout + oneDNN one-row matmuls (default)": (laid, "sinkstream", torch.no_grad, fast_cpu_matmul),
        "sinkstream + oneDNN one-row matmuls": (model, "sinkstream", torch.no_grad, fast_cpu_matmul),
        "sinkstream + compiled MLP/LM head": (compiled, "sinkstream", torch.no_grad, mkl_steps),
    }
    engines, pos, times = {}, {}, {k: [] for k in options}
    for name, (m, attn, grad, kernels) in options.items():
        m.set_attn_implementation(attn)
        engines[name] = Engine(m, tok, n_sink=4, window=1020)
        with grad(), kernels():
            engines[name].prefill(ids[:1500])
            for t in ids[1500:1516]:  # warm-up (compiles the decode shape)
                engines[name].step(t)
        pos[name] = 1516
    for _ in range(args.rounds):
        for name, (m, attn, grad, kernels) in options.items():
            m.set_attn_implementation(attn)
            with grad(), kernels():
                for t in ids[pos[name] : pos[name] + 16]:
                    t0 = time.perf_counter()
                    engines[name].step(t)
                    times[name].append((time.perf_counter() - t0) * 1000)
            pos[name] += 16
    base = statistics.median(times["sdpa"])
    result = {"threads": args.threads, "steps_each": len(times["sdpa"]), "options": {}}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        result["options"][name] = {"median_ms": round(statistics.median(ts), 2), "p25_ms": round(q[0], 2),
                                   "p75_ms": round(q[2], 2), "speedup_vs_sdpa": round(base / statistics.median(ts), 3)}
        print(f"{name:40s} {statistics.median(ts):7.2f} ms  (p25 {q[0]:.2f}, p75 {q[2]:.2f})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_options.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
