"""``sinkstream bench ...``: validation and running."""

from __future__ import annotations

import json
import sys
from pathlib import Path

COMPARE = ("recompute", "dense")


def validate(args, UsageError) -> None:
    from .eval.cli import _int_list, read_text

    if args.measure < 1:
        raise UsageError(f"--measure must be >= 1, got {args.measure}")
    if args.tokens < args.measure + 1:
        raise UsageError(f"--tokens must be > --measure ({args.measure}), got {args.tokens}")
    if args.reps < 1:
        raise UsageError(f"--reps must be >= 1, got {args.reps}")
    compare = [c.strip() for c in args.compare.split(",") if c.strip()]
    bad = [c for c in compare if c not in COMPARE]
    if bad:
        raise UsageError(f"unknown --compare '{','.join(bad)}'; choose from {', '.join(COMPARE)}")
    args.compare_list = list(dict.fromkeys(compare))
    args.caches = _int_list(args.recompute_caches, "--recompute-caches", UsageError, 2)
    if args.dense_tokens is not None and args.dense_tokens <= args.measure:
        raise UsageError(f"--dense-tokens must be > --measure ({args.measure}), got {args.dense_tokens}")
    if args.book is not None and args.corpus is None:
        raise UsageError("--book needs --corpus gutenberg")
    if args.text is not None:
        args.text_value = read_text(args.text, UsageError)


def run(args, UsageError) -> int:
    import torch

    from .benchmark import (
        CHECKPOINTS,
        DENSE_CHECKPOINTS,
        checkpoints_for,
        flat_in_turns,
        plot,
        run_checkpoints,
        run_recompute,
    )
    from .engine import Engine
    from .eval.cli import _finish, _model, _text_ids

    model, tok = _model(args, UsageError, args.attn)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if "recompute" in args.compare_list and max_pos and max(args.caches) > max_pos:
        raise UsageError(f"--recompute-caches: {max(args.caches)} is past the model's {max_pos} positions")
    dense_to = min(x for x in (args.dense_tokens, max_pos, args.tokens if not max_pos else None) if x)
    dense_points = checkpoints_for(dense_to, DENSE_CHECKPOINTS)
    need = max(
        [args.tokens]
        + ([dense_to] if "dense" in args.compare_list else [])
        + ([max(args.caches) + 65 + args.measure] if "recompute" in args.compare_list else [])
    )
    ids, source = _text_ids(args, tok, UsageError, need)
    if len(ids) < need:
        raise UsageError(f"the text has {len(ids)} tokens, fewer than the {need} this run needs")
    progress = not args.no_progress
    name = args.model or "smollm2-135m"
    result = {
        "command": "bench decode",
        "model": name,
        "text": source,
        "dtype": args.dtype,
        "device": args.device,
        "weights": getattr(model.config, "sinkstream_weights", "float32"),
        "decode": args.decode,
        "threads": torch.get_num_threads(),
        "cache": f"{args.sink}+{args.window}",
        "measured_steps": args.measure,
    }
    try:
        engine = Engine(
            model,
            tok,
            n_sink=args.sink,
            window=args.window,
            decode=args.decode,
            kv_dtype=None if args.kv_dtype == "auto" else getattr(torch, args.kv_dtype),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    points = checkpoints_for(args.tokens, CHECKPOINTS)
    kept = {2000 if 2000 in points else points[0], points[-1]}  # replayed in turns at the end
    stream = run_checkpoints(engine, ids, points, args.measure, progress, desc="streaming", keep=kept)
    result |= {
        "latency_ms": {k: p["median_ms"] for k, p in stream.items()},
        "rss_mb": {k: p["rss_mb"] for k, p in stream.items()},
        "tokens_per_s": {k: p["tokens_per_s"] for k, p in stream.items()},
        "streaming": stream,
    }
    base = "2000" if "2000" in stream else next(iter(stream))
    last = str(points[-1])
    result["flat"] = {
        "from": int(base),
        "to": int(last),
        "latency_ratio": round(stream[last]["median_ms"] / stream[base]["median_ms"], 3),
        "rss_ratio": round(stream[last]["rss_mb"] / stream[base]["rss_mb"], 3),
        "peak_rss_ratio": round(stream[last]["peak_rss_mb"] / stream[base]["peak_rss_mb"], 3),
    }
    if int(last) != int(base):
        result["flat_in_turns"] = flat_in_turns(engine, ids)
    if "recompute" in args.compare_list:
        rows = run_recompute(model, tok, ids, args.caches, args.sink, args.measure, args.reps, progress)
        result["recompute"] = rows
        result["recompute_ratio"] = {k: r["ratio"] for k, r in rows.items()}
    if "dense" in args.compare_list:
        dense = Engine(model, tok, dense=True)
        result["dense"] = run_checkpoints(dense, ids, dense_points, args.measure, progress, desc="dense")
        result["dense_max_positions"] = max_pos
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "decode.png", f"{name} · {args.dtype} · {result['threads']} threads")
    (out / "decode.json").write_text(json.dumps(result, indent=2))
    if not args.json:
        for k, p in stream.items():
            print(
                f"streaming {args.sink}+{args.window} at {int(k):>9,} tokens: {p['median_ms']:8.2f} ms/token "
                f"{p['tokens_per_s']:7.2f} tokens/s  RSS {p['rss_mb']:.0f} MB",
                file=sys.stderr,
            )
        for k, r in result.get("recompute", {}).items():
            print(
                f"cache {int(k):5d}: recompute {r['recompute_ms']:9.1f} ms, streaming {r['streaming_ms']:7.2f} ms, "
                f"ratio {r['ratio']:.1f}x",
                file=sys.stderr,
            )
    return _finish(result, out, args)
