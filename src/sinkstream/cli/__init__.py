"""The ``sinkstream`` command: one module per command, each with its options (``add_parser``), their
checks (``validate``) and its run (``run``); ``options`` holds what they share.

Bad input is a ``UsageError``, and a command whose optional packages are missing a ``MissingExtra``:
one ``sinkstream: error: ...`` line (for the latter, the ``pip install 'sinkstream[…]'`` to run) and
exit code 2.
"""

from __future__ import annotations

import sys

from .. import __version__
from ..extras import MissingExtra
from . import attn, bench, chat, export, generate, serve, train
from . import eval as evaluate
from .options import Parser, UsageError

COMMANDS = {
    "generate": generate,
    "chat": chat,
    "eval": evaluate,
    "attn": attn,
    "bench": bench,
    "serve": serve,
    "train": train,
    "export": export,
}


def build_parser() -> Parser:
    p = Parser(prog="sinkstream", description="Streaming LLM inference with attention sinks (StreamingLLM).")
    p.add_argument("--version", action="version", version=f"sinkstream {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        command = COMMANDS[args.command]
        command.validate(args)
        return command.run(args)
    except (UsageError, MissingExtra) as e:
        print(f"sinkstream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
