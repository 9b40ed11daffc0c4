"""Every figure sinkstream draws, in one place: the evaluation and benchmark modules compute, the
commands call these to draw what was computed (PNG files, matplotlib's Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .extras import need


def _pyplot():
    need("matplotlib", "eval").use("Agg")
    return need("matplotlib.pyplot", "eval")


def _save(plt, fig, path, dpi: int = 120) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_decode(result: dict, path, title: str) -> None:
    """Latency and RSS against tokens seen (log x), and recompute vs streaming per cache size."""
    plt = _pyplot()

    panels = 3 if result.get("recompute") else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    for label, points in (("streaming " + result["cache"], result["streaming"]), ("dense", result.get("dense"))):
        if not points:
            continue
        xs = [int(k) for k in points]
        axes[0].plot(xs, [p["median_ms"] for p in points.values()], marker="o", label=label)
        axes[1].plot(xs, [p["rss_mb"] for p in points.values()], marker="o", label=label)
    for ax, name in zip(axes[:2], ("median ms per token", "RSS (MB)")):
        ax.set_xscale("log")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(name)
        ax.legend()
    axes[0].set_title(title, fontsize=9)
    if panels == 3:
        rec = result["recompute"]
        xs = [int(k) for k in rec]
        axes[2].plot(xs, [r["recompute_ms"] for r in rec.values()], marker="o", label="sliding window + recompute")
        axes[2].plot(xs, [r["streaming_ms"] for r in rec.values()], marker="o", label="streaming (sinks + window)")
        for x, r in zip(xs, rec.values()):
            axes[2].annotate(
                f"{r['ratio']:.0f}x",
                (x, r["recompute_ms"]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
        axes[2].set_xscale("log", base=2)
        axes[2].set_yscale("log")
        axes[2].set_xlabel("cache size (tokens)")
        axes[2].set_ylabel("ms per token")
        axes[2].legend(fontsize=8)
    _save(plt, fig, path)


def plot_losses(rows: list[dict], path: Path, title: str, seq: int | None = None) -> None:
    plt = _pyplot()

    if not rows:
        return
    sink = [(r["step"], r["sink_head_mass"]) for r in rows if "sink_head_mass" in r]
    fig, axes = plt.subplots(1, 2 if sink else 1, figsize=(12 if sink else 7, 4), squeeze=False)
    ax = axes[0, 0]
    steps = [r["step"] for r in rows]
    losses = np.array([r["loss"] for r in rows])
    k = max(1, len(losses) // 100)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1 :], smooth, label="training loss")
    held = [(r["step"], r["held_out_loss"]) for r in rows if "held_out_loss" in r]
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    if sink:
        b = axes[0, 1]
        at, mass = zip(*sink)
        for layer, ys in enumerate(zip(*mass)):
            b.plot(at, ys, "o-", ms=3, label=f"layer {layer}")
        if seq:
            uniform = np.mean([1 / (q + 1) for q in range(seq // 2, seq)])
            b.axhline(float(uniform), color="grey", ls="--", lw=1, label="uniform attention")
        b.set_xlabel("step")
        b.set_ylabel("strongest head's mass on token 0 (late queries)")
        b.set_yscale("log")
        b.set_title("a sink forming?")
        b.legend(fontsize=8)
    _save(plt, fig, path)


def plot_maps(maps: np.ndarray, path, title: str, max_layers: int = 16) -> list[int]:
    """Heatmaps (log colour scale) of up to ``max_layers`` layers, evenly spread; returns the layers drawn."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    n = maps.shape[0]
    layers = sorted(set(np.linspace(0, n - 1, min(n, max_layers)).round().astype(int).tolist()))
    cols = min(4, len(layers))
    rows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers):
        m = np.where(np.tril(np.ones_like(maps[layer])) > 0, np.maximum(maps[layer], 1e-4), np.nan)
        ax.imshow(m, cmap="viridis", norm=LogNorm(vmin=1e-4, vmax=1.0), interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    _save(plt, fig, path, dpi=110)
    return layers


def plot_first_token(mass: np.ndarray, path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * len(mass)), 3.5))
    ax.bar(np.arange(len(mass)), mass)
    ax.axhline(1 / 2, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention on the first token")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    _save(plt, fig, path, dpi=110)


def plot_chat(runs: dict[str, list[dict]], path, title: str) -> None:
    plt = _pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, recs in runs.items():
        xs = [r["tokens_seen"] for r in recs]
        a.plot(xs, [r["decode_tokens_per_s"] or 0 for r in recs], marker=".", label=label)
        b.plot(xs, [r["rss_mb"] for r in recs], marker=".", label=label)
    a.set_xlabel("tokens seen")
    a.set_ylabel("decode tokens/s (per turn)")
    b.set_xlabel("tokens seen")
    b.set_ylabel("RSS (MB)")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    _save(plt, fig, path)


def plot_ppl(curves: dict[str, np.ndarray], path, title: str, marks: dict[str, int] | None = None) -> None:
    """Perplexity against tokens seen (log-spaced bins, log x), one line per method."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, nll in curves.items():
        n = len(nll)
        edges = np.unique(np.geomspace(16, max(n, 17), num=40).astype(int))
        xs, ys = [], []
        for a, b in zip(edges[:-1], edges[1:]):
            seg = nll[a:b]
            seg = seg[~np.isnan(seg)]
            if seg.size:
                xs.append((a + b) / 2)
                ys.append(float(np.exp(seg.mean())))
        ax.plot(xs, ys, marker=".", label=label)
    for name, x in (marks or {}).items():
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.text(x, ax.get_ylim()[1], f" {name}", rotation=90, va="top", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("perplexity (per bin)")
    ax.set_title(title)
    ax.legend()
    _save(plt, fig, path)


def plot_sinkgrid(rows: dict[str, dict], cache: int, sinks, path, title: str) -> None:
    plt = _pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, r in rows.items():
        a.plot(sinks, [r[f"{s}+{cache - s}"] for s in sinks], "o-", label=mode)
        b.plot(range(len(r["first_token_mass"])), r["first_token_mass"], "o-", label=mode)
    a.set_xlabel("sinks kept (cache total fixed)")
    a.set_ylabel("streaming perplexity")
    a.set_yscale("log")
    a.set_xticks(list(sinks))
    b.set_xlabel("layer")
    b.set_ylabel("attention on the first token")
    b.set_ylim(0, 1)
    for ax in (a, b):
        ax.legend()
    fig.suptitle(title)
    _save(plt, fig, path)


def plot_sink_curves(curves: dict[str, list[dict]], cache: int, path, title: str) -> None:
    """The strongest head's late-query mass on token 0 (max over layers) against tokens trained."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, rows in curves.items():
        ax.plot([r["tokens"] for r in rows], [max(r["sink_head_mass"]) for r in rows], "o-", ms=3, label=mode)
    ax.axhline(
        float(np.mean(1 / np.arange(cache // 2 + 1, cache + 1))), color="grey", ls="--", lw=1, label="uniform attention"
    )
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("strongest head's mass on token 0 (late queries)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend()
    _save(plt, fig, path)


def plot_sweep(result: dict, sinks, caches, path, title: str) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for cache in caches:
        rows = [r for r in result["rows"] if r["cache"] == cache and r["sinks"] is not None]
        ax.plot([str(r["sinks"]) for r in rows], [r["ppl"] for r in rows], marker="o", label=f"cache {cache}")
        rec = next(r for r in result["rows"] if r["cache"] == cache and r["sinks"] is None)
        ax.axhline(rec["ppl_on_recompute_targets"], linestyle=":", linewidth=1, color=ax.lines[-1].get_color())
    ax.set_yscale("log")
    ax.set_xlabel("attention sinks (cache total fixed)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=10)
    ax.legend()
    _save(plt, fig, path)


def plot_stability(curve: tuple[list, list], result: dict, path, title: str) -> None:
    """Left: PPL against tokens seen (``curve``: bin centres and their perplexities, log x) with book starts
    marked. Right: in-stream vs alone per book."""
    plt = _pyplot()

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    ax.plot(*curve, marker=".", label="long stream")
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
    _save(plt, fig, path)


def plot_accuracy(records: list[dict], cache: int, path, title: str, bins: int = 8) -> None:
    plt = _pyplot()
    import numpy as np

    d = np.array([r["distance_tokens"] for r in records])
    c = np.array([r["correct"] for r in records], dtype=float)
    edges = np.linspace(d.min(), d.max() + 1, bins + 1)
    xs, ys, ns = [], [], []
    for a, b in zip(edges[:-1], edges[1:]):
        m = (d >= a) & (d < b)
        if m.any():
            xs.append((a + b) / 2)
            ys.append(c[m].mean())
            ns.append(int(m.sum()))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, ys, marker="o")
    for x, y, n in zip(xs, ys, ns):
        ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    ax.axvline(cache, color="grey", linestyle=":")
    ax.text(cache, 1.02, f" cache {cache}", fontsize=8, color="grey")
    ax.set_ylim(-0.05, 1.1)
    ax.set_xlabel("distance from the asked line to the question (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    _save(plt, fig, path)
