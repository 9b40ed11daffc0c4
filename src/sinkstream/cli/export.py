"""``sinkstream export``: a model (a GGUF one, say) as a plain Hugging Face folder."""

from __future__ import annotations

import json

from .options import DEFAULT_MODEL, UsageError, check_model_options


def add_parser(sub) -> None:
    e = sub.add_parser("export", help="write a model (e.g. a GGUF one) as a plain Hugging Face folder")
    e.add_argument("--model", default=None, help="known model name, .gguf file or HF folder (default: smollm2-135m)")
    e.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    e.add_argument("--out", required=True, help="output folder (replaced atomically)")


def validate(args) -> None:
    check_model_options(args)


def run(args) -> int:
    from ..models import export_model, load_model

    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, weights="float32")
        folder = export_model(model, tokenizer, args.out)
    except OSError as e:
        raise UsageError(f"cannot write '{args.out}': {e}") from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(json.dumps({"exported": str(folder), "model": args.model or DEFAULT_MODEL, "dtype": args.dtype}))
    return 0
