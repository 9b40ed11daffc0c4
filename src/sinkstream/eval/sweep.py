"""The sink ablation (the paper's Table 2): sinks × cache sizes with the cache total fixed, plus
dense and recompute, on one text."""

from __future__ import annotations

import numpy as np

from .ppl import perplexity, run_method


def run_sweep(
    model,
    ids,
    sinks=(0, 1, 2, 4, 8),
    caches=(256, 1024),
    *,
    chunk: int = 256,
    stride: int = 50,
    dense_limit: int | None = None,
    progress: bool = True,
    save=None,
) -> dict:
    """PPL for every (sinks, cache) with window = cache - sinks; dense once; recompute per cache size on
    every ``stride``-th target, with each streaming run's PPL on the same targets beside it."""
    rows, curves = [], {}
    nll_dense, info = run_method(model, ids, "dense", 0, 1, chunk=chunk, dense_limit=dense_limit, progress=progress)
    curves["dense"] = nll_dense
    dense = info
    for cache in caches:
        nll_rec, rec = run_method(model, ids, "recompute", 0, cache, stride=stride, progress=progress)
        curves[f"recompute {cache}"] = nll_rec
        sample = ~np.isnan(nll_rec)
        for s in sinks:
            if s >= cache:
                continue
            nll, info = run_method(model, ids, "streaming", s, cache - s, chunk=chunk, progress=progress)
            curves[f"{s}+{cache - s}"] = nll
            rows.append(
                {
                    "cache": cache,
                    "sinks": s,
                    "window": cache - s,
                    "ppl": info["ppl"],
                    "ppl_on_recompute_targets": round(perplexity(np.where(sample, nll, np.nan)), 4),
                    "seconds": info["seconds"],
                }
            )
        rows.append(
            {
                "cache": cache,
                "sinks": None,
                "window": cache,
                "method": "recompute",
                "ppl_on_recompute_targets": rec["ppl"],
                "targets": rec["targets"],
                "seconds": rec["seconds"],
                "dense_on_recompute_targets": round(perplexity(np.where(sample, nll_dense, np.nan)), 4),
            }
        )
    if save is not None:
        for label, nll in curves.items():
            save(label, nll)
    return {"rows": rows, "dense": dense, "tokens": int(len(ids) - 1), "stride": stride}


def markdown(result: dict, sinks, caches) -> str:
    """Table: a row per cache size, a column per sink count, then recompute and dense."""
    head = "| cache | " + " | ".join(f"{s} sinks" for s in sinks) + " | recompute (sample) | dense |"
    lines = [head, "|" + "---|" * (len(sinks) + 3)]
    for cache in caches:
        stream = {r["sinks"]: r for r in result["rows"] if r["cache"] == cache and r["sinks"] is not None}
        rec = next(r for r in result["rows"] if r["cache"] == cache and r["sinks"] is None)
        cells = [f"{stream[s]['ppl']:.2f} ({s}+{cache - s})" if s in stream else "—" for s in sinks]
        lines.append(
            f"| {cache} | "
            + " | ".join(cells)
            + f" | {rec['ppl_on_recompute_targets']:.2f} (n={rec['targets']}) | {result['dense']['ppl']:.2f} |"
        )
    d = result["dense"]
    note = f"\nDense: {d['ppl']:.2f} over {d['stopped_at']} tokens (max positions {d['max_positions']}" + (
        f"; {d['ppl_within_max_positions']:.2f} within them, {d['ppl_past_max_positions']:.2f} past them)"
        if "ppl_past_max_positions" in d
        else ")"
    )
    return "\n".join(lines) + "\n" + note + "\n"
