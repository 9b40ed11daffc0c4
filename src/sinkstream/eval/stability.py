"""Stability over millions of tokens: the books streamed back to back through one cache, each book's
perplexity inside that long stream against the same book streamed alone from a fresh cache.

Both runs score the same targets (a book's tokens 1..n-1 given what precedes them); inside the long
stream the cache also holds the previous book's tail and the first book's sinks. If streaming
degraded with length, the later books would score worse in the long stream than alone.
"""

from __future__ import annotations

import numpy as np
import torch

from .ppl import perplexity, streaming_nll


def book_ids(tok, books: list[tuple[str, str]], max_tokens: int) -> list[tuple[str, list[int]]]:
    """Each ``(name, text)`` tokenized alone, in order, until ``max_tokens`` (the last one cut)."""
    out, total = [], 0
    for name, text in books:
        ids = tok(text, add_special_tokens=False).input_ids[: max_tokens - total]
        if len(ids) >= 2:
            out.append((name, ids))
            total += len(ids)
        if total >= max_tokens:
            break
    return out


def run_stability(
    model, books: list[tuple[str, list[int]]], n_sink: int, window: int, *, chunk: int = 256, progress: bool = True
) -> dict:
    """Per-book PPL in one stream of all ``books`` vs alone; the arrays are in ``result['nll']``."""
    joined = torch.tensor([t for _, ids in books for t in ids])
    long_nll = streaming_nll(model, joined, n_sink, window, chunk=chunk, progress=progress)
    rows, start, alone_all = [], 0, []
    for name, ids in books:
        n = len(ids)
        in_stream = long_nll[start : start + n - 1]  # targets 1..n-1 of this book
        alone = streaming_nll(model, torch.tensor(ids), n_sink, window, chunk=chunk, progress=progress)
        alone_all.append(alone)
        p_stream, p_alone = perplexity(in_stream), perplexity(alone)
        rows.append(
            {
                "book": name,
                "first_token": start,
                "tokens": n,
                "ppl_in_stream": round(p_stream, 4),
                "ppl_alone": round(p_alone, 4),
                "relative_difference": round(p_stream / p_alone - 1, 5),
            }
        )
        start += n
    worst = max(abs(r["relative_difference"]) for r in rows)
    return {
        "tokens": int(joined.shape[0]),
        "books": rows,
        "max_abs_relative_difference": round(worst, 5),
        "ppl_whole_stream": round(perplexity(long_nll), 4),
        "segments": _segments(long_nll),
        "nll": {"stream": long_nll, "alone": alone_all},
    }


def _segments(nll: np.ndarray, parts: int = 10) -> list[dict]:
    """PPL of consecutive tenths of the stream (flat if nothing degrades; books differ, though)."""
    edges = np.linspace(0, len(nll), parts + 1).astype(int)
    return [
        {"from": int(a), "to": int(b), "ppl": round(perplexity(nll[a:b]), 4)} for a, b in zip(edges[:-1], edges[1:])
    ]


def markdown(result: dict, tolerance: float) -> str:
    lines = [
        "| book | first token in stream | tokens | PPL in the long stream | PPL alone | difference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["books"]:
        flag = "" if abs(r["relative_difference"]) <= tolerance else " ✗"
        lines.append(
            f"| {r['book']} | {r['first_token']:,} | {r['tokens']:,} | {r['ppl_in_stream']:.2f} | "
            f"{r['ppl_alone']:.2f} | {100 * r['relative_difference']:+.2f}%{flag} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path, title: str) -> None:
    """Left: PPL against tokens seen (log x) with book starts marked. Right: in-stream vs alone per book."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nll = result["nll"]["stream"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    edges = np.unique(np.geomspace(64, len(nll), num=60).astype(int))
    xs = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    ys = [perplexity(nll[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    ax.plot(xs, ys, marker=".", label="long stream")
    for r in result["books"][1:]:
        ax.axvline(r["first_token"], color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("tokens seen (dotted: a new book starts)")
    ax.set_ylabel("perplexity (per bin)")
    ax.set_title(title)
    names = [r["book"].split("-", 1)[-1][:18] for r in result["books"]]
    at = np.arange(len(names))
    bx.bar(at - 0.2, [r["ppl_in_stream"] for r in result["books"]], 0.4, label="in the long stream")
    bx.bar(at + 0.2, [r["ppl_alone"] for r in result["books"]], 0.4, label="alone, fresh cache")
    bx.set_xticks(at, names, rotation=70, fontsize=7)
    bx.set_ylabel("perplexity of the book")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
