"""Shared by every peer runner (each runs in its own venv, so this imports only stdlib and torch).

The workload: the same token ids (written by ``prepare.py``) fed one token at a time, teacher-forced,
through a sink cache of ``sink`` + ``window`` tokens. Per token: the step time, and the NLL of the
next token from the step's logits (computed outside the timed part). Reported: tokens/s at 1k and
at 20k tokens seen (median step over the 64 tokens before each mark), at steady state (median step
over tokens 2,000-3,000, when a 1,024-token cache has been full for a window), peak RSS, perplexity.
"""

import argparse
import json
import math
import resource
import statistics
import sys
import time

import torch

STEADY = (2000, 3000)


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--ids", required=True, help="JSON list of token ids (from prepare.py)")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="JSON file for this peer's row")
    return ap


def load_ids(args) -> list:
    with open(args.ids) as f:
        ids = json.load(f)
    return ids[: args.tokens + 1]


def stream(step, ids, desc: str = "") -> tuple:
    """``step(token) -> logits [V]`` for every token but the last; returns (nll, ms) lists."""
    nll, ms = [], []
    t_start = time.perf_counter()
    for i, t in enumerate(ids[:-1]):
        t0 = time.perf_counter()
        logits = step(int(t))
        ms.append((time.perf_counter() - t0) * 1000)
        lp = torch.log_softmax(torch.as_tensor(logits).float().reshape(-1), dim=-1)
        nll.append(-float(lp[ids[i + 1]]))
        if (i + 1) % 1000 == 0:
            rate = (i + 1) / (time.perf_counter() - t_start)
            print(
                f"{desc} {i + 1}/{len(ids) - 1} tokens, {rate:.1f} tokens/s, "
                f"ppl so far {math.exp(sum(nll) / len(nll)):.3f}",
                file=sys.stderr,
                flush=True,
            )
    return nll, ms


def finish(args, peer: str, version: str, nll: list, ms: list, **extra) -> None:
    row = {
        "peer": peer,
        "version": version,
        "status": "ok",
        "tokens": len(nll),
        "cache": f"{args.sink}+{args.window}",
        "threads": args.threads,
    }
    for mark in (1000, 20000):
        if len(ms) >= mark:
            row[f"tokens_per_s_at_{mark // 1000}k"] = round(1000 / statistics.median(ms[mark - 64 : mark]), 2)
    if len(ms) >= STEADY[1]:  # the cache has been full for a whole window: every step evicts
        row["tokens_per_s_steady"] = round(1000 / statistics.median(ms[STEADY[0] : STEADY[1]]), 2)
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    row["ppl"] = round(math.exp(sum(nll) / len(nll)), 4)
    row["wall_s"] = round(sum(ms) / 1000, 1)
    row.update(extra)
    with open(args.out, "w") as f:
        json.dump(row, f, indent=2)
    print(json.dumps(row), flush=True)
