"""The paper's Table 3 on models trained here: vanilla / zero sink / learnable sink, each streamed with
0, 1, 2 and 4 sinks in a cache of C = the training length, far past C, on held-out text.

Per model: streaming PPL for every sink count (window = C - sinks), the reference "dense inside the
training length" (every ``stride``-th target recomputed with the C - 1 tokens before it, with the
learnable sink first for that model), and the attention mass each layer puts on the first token
(over the first C tokens). A learnable model's stream starts with its sink token, as in training.
"""

from __future__ import annotations

import numpy as np
import torch

from ..attention_maps import attention_maps, first_token_mass, sink_head_mass
from .ppl import perplexity, recompute_nll, run_method

MODES = ("vanilla", "zero", "learnable")


def stream_ids(tok, model, text_ids: list[int]) -> torch.Tensor:
    """The evaluated stream: the learnable model's sink token first (not a target), else the text."""
    from ..attention import sink_mode

    if sink_mode(model.config) == "learnable":
        return torch.tensor([tok.bos_token_id] + text_ids[:-1])
    return torch.tensor(text_ids)


def evaluate(model, ids: torch.Tensor, cache: int, sinks, *, stride: int, chunk: int, progress: bool) -> dict:
    from ..attention import sink_mode

    first = 1 if sink_mode(model.config) == "learnable" else 0  # the sink token is never a target
    row = {}
    rec = recompute_nll(model, ids, cache, stride=stride, first=first, progress=progress, keep_first=first)
    sample = ~np.isnan(rec)
    row["dense_in_training_length"] = round(perplexity(rec), 3)
    for s in sinks:
        nll, info = run_method(model, ids, "streaming", s, cache - s, chunk=chunk, first=first, progress=progress)
        row[f"{s}+{cache - s}"] = info["ppl"]
        row[f"{s}+{cache - s} (sample)"] = round(perplexity(np.where(sample, nll, np.nan)), 3)
    maps = attention_maps(model, ids[:cache], per_head=True)
    row["first_token_mass"] = [round(float(m), 4) for m in first_token_mass(maps.mean(axis=1))]
    row["sink_head_mass"] = [round(float(m), 4) for m in sink_head_mass(maps)]
    return row


def markdown(rows: dict[str, dict], cache: int, sinks, tokens: int, stride: int) -> str:
    cols = [f"{s}+{cache - s}" for s in sinks]
    lines = [
        "| pre-training | " + " | ".join(cols) + f" | dense in {cache} (every {stride}th) |",
        "|---|" + "---:|" * (len(cols) + 1),
    ]
    for mode, r in rows.items():
        lines.append(
            f"| {mode} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + f" | {r['dense_in_training_length']:.2f} |"
        )
    lines += [
        "",
        f"Streaming PPL over {tokens:,} held-out tokens (cache {cache} = training length); "
        "the last column recomputes every sampled target with the previous tokens that fit the training length.",
        "",
        f"Attention on the first token, per layer (mean over heads and queries, first {cache} tokens):",
        "",
        "| pre-training | "
        + " | ".join(f"L{i}" for i in range(len(next(iter(rows.values()))["first_token_mass"])))
        + " |",
        "|---|" + "---:|" * len(next(iter(rows.values()))["first_token_mass"]),
    ]
    for mode, r in rows.items():
        lines.append(f"| {mode} | " + " | ".join(f"{m:.2f}" for m in r["first_token_mass"]) + " |")
    n = len(next(iter(rows.values()))["sink_head_mass"])
    uniform = np.mean(1 / np.arange(cache // 2 + 1, cache + 1))
    lines += [
        "",
        f"The strongest head's attention on the first token from the last {cache - cache // 2} queries "
        f"(uniform attention: {uniform:.4f}; a sink head: tenths):",
        "",
        "| pre-training | " + " | ".join(f"L{i}" for i in range(n)) + " |",
        "|---|" + "---:|" * n,
    ]
    for mode, r in rows.items():
        lines.append(f"| {mode} | " + " | ".join(f"{m:.4f}" for m in r["sink_head_mass"]) + " |")
    return "\n".join(lines) + "\n"


def training_curves(runs, modes) -> dict[str, list[dict]]:
    """Per mode, from its ``train_log.jsonl``: tokens trained and the sink measures at every evaluation."""
    import json
    from pathlib import Path

    curves = {}
    for mode in modes:
        folder = Path(runs) / mode
        log, cfg = folder / "train_log.jsonl", folder / "train_config.json"
        if not (log.is_file() and cfg.is_file()):
            continue
        c = json.loads(cfg.read_text())
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        curves[mode] = [
            {
                "tokens": r["step"] * c["batch"] * c["seq"],
                "sink_head_mass": r["sink_head_mass"],
                "first_token_mass": r["first_token_mass"],
            }
            for r in rows
            if "sink_head_mass" in r
        ]
    return {m: c for m, c in curves.items() if c}


# -- CLI ---------------------------------------------------------------------------------------------
