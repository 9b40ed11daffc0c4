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


def ppl_curve(nll: np.ndarray, bins: int = 60) -> tuple[list[float], list[float]]:
    """Perplexity against tokens seen, in log-spaced bins: (bin centres, perplexities)."""
    edges = np.unique(np.geomspace(64, len(nll), num=bins).astype(int))
    xs = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    return xs, [perplexity(nll[a:b]) for a, b in zip(edges[:-1], edges[1:])]


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
