"""``sinkstream generate``: a completion of one prompt, or a batch of prompts decoded together."""

from __future__ import annotations

import json
import sys

from .options import (
    UsageError,
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
    g = sub.add_parser("generate", help="stream a completion of a prompt to stdout")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument(
        "--batch-file", help="file with one prompt a line: all decoded together as one batch; outputs printed in order"
    )
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_common(g)
    add_pin(g, "the start of the prompt (with --chat: the system prompt; without: N tokens of the prompt)")


def validate(args) -> None:
    check_cache_options(args)
    check_pin(args)
    args.params = sampling_params(args)
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.batch_file is not None:
        args.prompts = read_prompts(args.batch_file)
    read_json_schema(args)  # readable JSON before the model loads


def _prompt_ids(engine, text: str, chat: bool) -> list[int]:
    if not chat:
        return engine.tokenizer(text).input_ids
    from ..chat import ChatSession

    return engine.tokenizer(ChatSession(engine).new_turn_text(text), add_special_tokens=False).input_ids


def _prompt_pin(engine, ids: list[int], args) -> int:
    """The sinks of a prompt's stream: with --chat what its template puts before the message, as in a chat;
    without, --pin N pins the prompt's first N tokens (auto: the plain sinks, a prompt has no system part)."""
    from ..chat import Conversation
    from ..pinning import choose, prefix_tokens
    from .chat import warn

    if args.chat:
        conversation = Conversation(messages=[{"role": "user", "content": "?"}])
        prefix, what = prefix_tokens(engine.tokenizer, conversation, ids), "the chat template's preamble"
    else:
        prefix, what = (len(ids) if isinstance(args.pin, int) else 0), "the prompt"
    pinned = choose(prefix, engine.n_sink, engine.window, args.pin, what)
    if pinned.warning:
        warn(pinned.warning)
    return pinned.tokens


def _run_batch(args) -> int:
    engine, params = engine_for(args)
    ids = [_prompt_ids(engine, p, args.chat) for p in args.prompts]
    make = constraints_for(engine, args)
    texts, tokens = [""] * len(ids), [0] * len(ids)
    pins = [_prompt_pin(engine, row, args) for row in ids]
    for row, tok in engine.generate_batch(ids, params, [make() for _ in ids] if make else None, pins):
        texts[row] += tok.text
        tokens[row] += tok.id >= 0
    for i, (prompt, text) in enumerate(zip(args.prompts, texts), 1):
        if args.json:
            print(json.dumps({"index": i, "prompt": prompt, "text": text, "tokens": tokens[i - 1]}), flush=True)
        else:
            print(f"### {i}: {prompt}\n{text}\n", flush=True)
    print_stats(engine, args, {"batch_size": len(ids)})
    return 0


def run(args) -> int:
    if args.batch_file is not None:
        return _run_batch(args)
    engine, params = engine_for(args)
    make = constraints_for(engine, args)
    constraint = make() if make else None
    if args.chat:
        from ..chat import ChatSession
        from .chat import warn

        pieces = ChatSession(engine, pin=args.pin, on_warning=warn).send(args.prompt, params, constraint)
    else:
        ids = engine.tokenizer(args.prompt).input_ids
        engine.reset(_prompt_pin(engine, ids, args))
        pieces = (t.text for t in engine.generate(ids, params, constraint))
    wrote = False
    for piece in pieces:
        wrote = wrote or bool(piece.strip())
        sys.stdout.write(piece)
        sys.stdout.flush()
    print(flush=True)
    if not wrote and not args.chat and engine.stats.finish_reason == "stop" and engine.tokenizer.chat_template:
        print(
            "sinkstream: the model ended its answer at once. It has a chat template, so it is likely an "
            "instruct model: add --chat to send the prompt as a user message.",
            file=sys.stderr,
        )
    print_stats(engine, args, {"finish_reason": engine.stats.finish_reason})
    return 0
