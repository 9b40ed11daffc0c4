"""Load test of `sinkstream serve`: C concurrent clients x T turns, each client its own endless session.

    python bench/serve_load.py [--clients 8] [--turns 20] [--max-tokens 32] [--model ...] [--out out/bench-serve]

Runs the same workload twice against a real server process on 127.0.0.1 (the embedded model by default):
continuous batching (--max-batch = clients) and one request at a time (--max-batch 1). With
``--replicas N`` it also runs it against ``sinkstream serve --replicas N`` on a local Ray Serve with a
throwaway PostgreSQL store (run it in a loopback-only network namespace:
``unshare -n sh -c 'ip link set lo up && python bench/serve_load.py --replicas 2 --modes batched'``). Per run: errors,
p50/p99 time to first token, p50/p99 time between tokens, total generated tokens/s, and the server's
peak RSS. The user messages are MT-Bench's first turns (as `sinkstream eval chat` uses them). Streams
with `stream_options.include_usage`, so the token counts are the server's. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from serverproc import Server  # noqa: E402


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1)


def client_loop(
    url: str, cid: int, turns: int, max_tokens: int, questions: list[str], out: dict, start: threading.Event
):
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    start.wait()
    for t in range(turns):
        q = questions[(cid * turns + t) % len(questions)]
        t0 = time.perf_counter()
        first, last, gaps, usage = None, None, [], None
        try:
            stream = c.chat.completions.create(
                model="bench",
                messages=[{"role": "user", "content": q}],
                max_tokens=max_tokens,
                temperature=0.7,
                seed=cid * 1000 + t,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"session_id": f"bench-{cid}"},
            )
            for chunk in stream:
                if chunk.usage:
                    usage = chunk.usage
                if chunk.choices and chunk.choices[0].delta.content:
                    now = time.perf_counter()
                    if first is None:
                        first = now - t0
                    else:
                        gaps.append(now - last)
                    last = now
            out["ttft"].append(first if first is not None else time.perf_counter() - t0)
            out["gaps"].extend(gaps)
            out["tokens"] += usage.completion_tokens
            out["prompt_tokens"] += usage.prompt_tokens
            out["turns"] += 1
        except Exception as e:
            out["errors"].append(f"{type(e).__name__}: {e}")


def run(args, max_batch: int, questions: list[str], replicas: list[str] = ()) -> dict:
    state = Path(args.out) / f"state-batch{max_batch}{'-replicas' if replicas else ''}"
    shutil.rmtree(state, ignore_errors=True)
    srv = Server(
        args.model or "smollm2-135m",
        state,
        "--max-batch",
        str(max_batch),
        *replicas,
        *args.server_args.split(),
        sink=args.sink,
        window=args.window,
        threads=args.threads,
        name="bench",
    )
    srv.start()
    proc = psutil.Process(srv.proc.pid)
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def watch():  # the server and its children (with --replicas: Ray and its replicas)
        while not stop.wait(0.5):
            tree = [proc, *proc.children(recursive=True)]
            peak[0] = max(peak[0], sum(_rss(p) for p in tree))

    out = {"ttft": [], "gaps": [], "tokens": 0, "prompt_tokens": 0, "turns": 0, "errors": []}
    start = threading.Event()
    threads = [
        threading.Thread(target=client_loop, args=(srv.url, i, args.turns, args.max_tokens, questions, out, start))
        for i in range(args.clients)
    ]
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    sessions = [srv.request("GET", f"/v1/sessions/bench-{i}")[1] for i in range(args.clients)]
    model = _model_time(srv.request("GET", "/metrics")[1])
    srv.stop()
    return {
        "max_batch": max_batch,
        "turns": out["turns"],
        "errors": len(out["errors"]),
        "error_samples": out["errors"][:3],
        "generated_tokens": out["tokens"],
        "prompt_tokens": out["prompt_tokens"],
        "wall_s": round(wall, 1),
        "tokens_per_s": round(out["tokens"] / wall, 2),
        "ttft_ms": {"p50": pct(out["ttft"], 0.5), "p99": pct(out["ttft"], 0.99)},
        "token_gap_ms": {"p50": pct(out["gaps"], 0.5), "p99": pct(out["gaps"], 0.99)},
        "server_peak_rss_mb": round(peak[0] / 2**20, 1),
        "session_tokens_seen": [s.get("tokens_seen") for s in sessions],
        "session_tokens_cached_max": max((s.get("tokens_cached") or 0) for s in sessions),
        "model_seconds": model,  # where the worker's time went (the server's /metrics)
    }


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def replicated(args, questions: list[str]) -> dict:
    """The batched workload on ``--replicas N`` over a throwaway PostgreSQL store."""
    from pgserver import PostgresServer

    pg = PostgresServer().start()
    try:
        url = pg.fresh_database("bench")
        flags = ["--replicas", str(args.replicas), "--store", url, "--replica-cpus", str(args.replica_cpus)]
        return {"replicas": args.replicas, **run(args, args.clients, questions, flags)}
    finally:
        pg.stop()


def _model_time(metrics: str) -> dict:
    """Prefill and decode seconds, decode steps and rows, from the server's Prometheus text."""
    out = {}
    for line in metrics.splitlines():
        for key, name in (
            ('sinkstream_model_seconds_total{phase="prefill"}', "prefill_s"),
            ('sinkstream_model_seconds_total{phase="decode"}', "decode_s"),
            ("sinkstream_decode_steps_total", "decode_steps"),
            ("sinkstream_decode_rows_total", "decode_rows"),
        ):
            if line.startswith(key + " "):
                out[name] = round(float(line.split()[-1]), 2)
    if out.get("decode_steps"):
        out["mean_batch"] = round(out["decode_rows"] / out["decode_steps"], 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default=None)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="batched,sequential", help="batched, sequential or both")
    ap.add_argument("--server-args", default="", help="more `sinkstream serve` options, e.g. '--kv-dtype float16'")
    ap.add_argument("--replicas", type=int, default=0, help="also run the batched workload on N Ray Serve replicas")
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--out", default="out/bench-serve")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "src"))
    from sinkstream.eval.data import mt_bench_questions

    questions = [q["turns"][0] for q in mt_bench_questions()]
    result = {
        "clients": args.clients,
        "turns_per_client": args.turns,
        "max_tokens": args.max_tokens,
        "cache": f"{args.sink}+{args.window}",
        "model": args.model or "smollm2-135m",
        "server_args": args.server_args,
        "date": time.strftime("%Y-%m-%d"),
    }
    modes = args.modes.split(",")
    if "batched" in modes:
        result["batched"] = run(args, args.clients, questions)
        print(json.dumps({"batched": result["batched"]}), flush=True)
    if "sequential" in modes:
        result["one_at_a_time"] = run(args, 1, questions)
        print(json.dumps({"one_at_a_time": result["one_at_a_time"]}), flush=True)
    if args.replicas:
        result["replicated"] = replicated(args, questions)
        print(json.dumps({"replicated": result["replicated"]}), flush=True)
        if "batched" in result:
            result["replicated_vs_one_process"] = round(
                result["replicated"]["tokens_per_s"] / result["batched"]["tokens_per_s"], 2
            )
    if "batched" in result and "one_at_a_time" in result:
        result["batched_vs_one_at_a_time"] = round(
            result["batched"]["tokens_per_s"] / result["one_at_a_time"]["tokens_per_s"], 2
        )
    (Path(args.out) / "serve_load.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
