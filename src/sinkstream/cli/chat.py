"""``sinkstream chat``: scripted rounds from a file, or an interactive chat that streams past its cache."""

from __future__ import annotations

import contextlib
import json
import os
import sys

from .options import (
    CHAT_SAMPLING,
    add_common,
    add_pin,
    check_cache_options,
    check_pin,
    constraints_for,
    engine_for,
    print_stats,
    read_json_schema,
    read_prompts,
    sampling_params,
)


def add_parser(sub) -> None:
    c = sub.add_parser("chat", help="multi-turn chat that streams far past its cache")
    c.add_argument("--prompts", default=None, help="file with one user message per line (scripted rounds)")
    c.add_argument("--system", default=None, help="system message")
    add_common(c, sampling=CHAT_SAMPLING)
    add_pin(c, "the system prompt")


def validate(args) -> None:
    check_cache_options(args)
    check_pin(args)
    args.params = sampling_params(args)
    read_json_schema(args)  # readable JSON before the model loads


def run(args) -> int:
    from ..chat import ChatSession

    prompts = read_prompts(args.prompts) if args.prompts else None
    engine, params = engine_for(args)
    args.constraints = constraints_for(engine, args)
    session = ChatSession(engine, system=args.system, pin=args.pin, on_warning=warn)
    if prompts:
        for i, message in enumerate(prompts, 1):
            print(f"\n### round {i} · user: {message}", flush=True)
            session.pin_first_turn(message)
            print("### assistant: ", end="", flush=True)
            _answer(session, message, params, args.constraints)
            print(f"[seen {engine.tokens_seen} · cached {engine.tokens_cached}]", flush=True)
        print_stats(engine, args, {"rounds": len(prompts)})
        return 0
    return _repl(session, params, args)


def warn(message: str) -> None:
    print(f"sinkstream: {message}", file=sys.stderr, flush=True)


def _answer(session, message, params, constraints=None) -> None:
    stream = session.send(message, params, constraints() if constraints else None)
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:  # stop the answer, not the session
        stream.close()
        session.engine.stats.finish_reason = "interrupted"
        sys.stdout.write(" [interrupted]")
    print(flush=True)


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
            session.pin_first_turn(message)
            print("bot> ", end="", flush=True)
            _answer(session, message, params, args.constraints)
    finally:
        if readline is not None:
            with contextlib.suppress(OSError):
                readline.write_history_file(hist)
    print_stats(session.engine, args, {"turns": session.turns})
    return 0
