"""``sinkstream bench decode``: per-token latency and memory against tokens seen, recompute and dense beside."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .options import (
    Parser,
    UsageError,
    add_eval_outputs,
    add_text_source,
    check_cache_options,
    finish,
    int_list,
    kv_dtype,
    load_model_for,
    model_name,
    read_text,
    text_ids,
)

COMPARE = ("recompute", "dense")


def add_parser(sub) -> None:
    bn = sub.add_parser("bench", help="benchmarks that print JSON (writes into --out)")
    bns = bn.add_subparsers(dest="bench_command", required=True, parser_class=Parser)
    bd = bns.add_parser(
        "decode", help="per-token decode latency and RSS against tokens seen; recompute and dense beside"
    )
    bd.add_argument(
        "--tokens", type=int, default=20_000, help="tokens streamed (default 20000; 1000000 for the 1M point)"
    )
    bd.add_argument("--measure", type=int, default=64, help="decode steps timed at each checkpoint (default 64)")
    bd.add_argument("--compare", default="", help="comma-separated: recompute, dense (default none)")
    bd.add_argument(
        "--recompute-caches",
        default="256,512,1024,2048,4096",
        help="cache sizes for --compare recompute (default 256,512,1024,2048,4096)",
    )
    bd.add_argument(
        "--reps",
        type=int,
        default=5,
        help="recompute forwards timed per cache size, in turns with the streaming steps (default 5)",
    )
    bd.add_argument(
        "--dense-tokens",
        type=int,
        default=None,
        help="--compare dense: stream this far (default: the model's maximum positions)",
    )
    add_text_source(bd, required=False)
    add_eval_outputs(bd, "out/bench-decode", weights="auto")


def validate(args) -> None:
    check_cache_options(args)

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
    args.caches = int_list(args.recompute_caches, "--recompute-caches", 2)
    if args.dense_tokens is not None and args.dense_tokens <= args.measure:
        raise UsageError(f"--dense-tokens must be > --measure ({args.measure}), got {args.dense_tokens}")
    if args.book is not None and args.corpus is None:
        raise UsageError("--book needs --corpus gutenberg")
    if args.text is not None:
        args.text_value = read_text(args.text)


def run(args) -> int:
    import torch

    from ..engine import Engine
    from ..plots import plot_decode as plot

    model, tok = load_model_for(args, args.attn)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if "recompute" in args.compare_list and max_pos and max(args.caches) > max_pos:
        raise UsageError(f"--recompute-caches: {max(args.caches)} is past the model's {max_pos} positions")
    dense_to = min(x for x in (args.dense_tokens, max_pos, args.tokens if not max_pos else None) if x)
    need = _tokens_needed(args, dense_to)
    ids, source = text_ids(args, tok, need)
    if len(ids) < need:
        raise UsageError(f"the text has {len(ids)} tokens, fewer than the {need} this run needs")
    name = model_name(args)
    result = {"command": "bench decode", "model": name, "text": source, "dtype": args.dtype, "device": args.device,
              "weights": getattr(model.config, "sinkstream_weights", "float32"), "decode": args.decode,
              "threads": torch.get_num_threads(), "cache": f"{args.sink}+{args.window}",
              "measured_steps": args.measure}  # fmt: skip
    try:
        engine = Engine(model, tok, n_sink=args.sink, window=args.window, decode=args.decode, kv_dtype=kv_dtype(args))
    except ValueError as e:
        raise UsageError(str(e)) from None
    result |= _streaming(engine, ids, args.tokens, args.measure, not args.no_progress)
    result |= _compared(args, model, tok, ids, dense_to, max_pos)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "decode.png", f"{name} · {args.dtype} · {result['threads']} threads")
    (out / "decode.json").write_text(json.dumps(result, indent=2))
    if not args.json:
        _report(result, f"{args.sink}+{args.window}")
    return finish(result, out, args)


def _compared(args, model, tok, ids: list[int], dense_to: int, max_pos: int | None) -> dict:
    """The baselines ``--compare`` asks for: recomputing the window, a dense cache."""
    from ..benchmark import DENSE_CHECKPOINTS, checkpoints_for, run_checkpoints, run_recompute
    from ..engine import Engine

    result, progress = {}, not args.no_progress
    if "recompute" in args.compare_list:
        rows = run_recompute(model, tok, ids, args.caches, args.sink, args.measure, args.reps, progress)
        result["recompute"] = rows
        result["recompute_ratio"] = {k: r["ratio"] for k, r in rows.items()}
    if "dense" in args.compare_list:
        dense = Engine(model, tok, dense=True)
        dense_points = checkpoints_for(dense_to, DENSE_CHECKPOINTS)
        result["dense"] = run_checkpoints(dense, ids, dense_points, args.measure, progress, desc="dense")
        result["dense_max_positions"] = max_pos
    return result


def _tokens_needed(args, dense_to: int) -> int:
    """Tokens of text the run streams: the streaming run's, the dense run's, the recompute windows'."""
    need = [args.tokens]
    if "dense" in args.compare_list:
        need.append(dense_to)
    if "recompute" in args.compare_list:
        need.append(max(args.caches) + 65 + args.measure)
    return max(need)


def _streaming(engine, ids, tokens: int, measure: int, progress: bool) -> dict:
    """The streaming checkpoints, the flatness of the last against 2k, and the two replayed in turns."""
    from ..benchmark import CHECKPOINTS, checkpoints_for, flat_in_turns, run_checkpoints

    points = checkpoints_for(tokens, CHECKPOINTS)
    kept = {2000 if 2000 in points else points[0], points[-1]}  # replayed in turns at the end
    stream = run_checkpoints(engine, ids, points, measure, progress, desc="streaming", keep=kept)
    base, last = ("2000" if "2000" in stream else next(iter(stream))), str(points[-1])
    ratio = {k: round(stream[last][k] / stream[base][k], 3) for k in ("median_ms", "rss_mb", "peak_rss_mb")}
    result = {
        "latency_ms": {k: p["median_ms"] for k, p in stream.items()},
        "rss_mb": {k: p["rss_mb"] for k, p in stream.items()},
        "tokens_per_s": {k: p["tokens_per_s"] for k, p in stream.items()},
        "streaming": stream,
        "flat": {"from": int(base), "to": int(last), "latency_ratio": ratio["median_ms"],
                 "rss_ratio": ratio["rss_mb"], "peak_rss_ratio": ratio["peak_rss_mb"]},
    }  # fmt: skip
    if last != base:
        result["flat_in_turns"] = flat_in_turns(engine, ids)
    return result


def _report(result: dict, cache: str) -> None:
    for k, p in result["streaming"].items():
        print(
            f"streaming {cache} at {int(k):>9,} tokens: {p['median_ms']:8.2f} ms/token "
            f"{p['tokens_per_s']:7.2f} tokens/s  RSS {p['rss_mb']:.0f} MB",
            file=sys.stderr,
        )
    for k, r in result.get("recompute", {}).items():
        print(
            f"cache {int(k):5d}: recompute {r['recompute_ms']:9.1f} ms, streaming {r['streaming_ms']:7.2f} ms, "
            f"ratio {r['ratio']:.1f}x",
            file=sys.stderr,
        )
