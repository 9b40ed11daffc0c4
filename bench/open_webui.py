"""Open WebUI, a real chat front end, in headless Chromium against `sinkstream serve`: what the server
prefilled per user action.

    python bench/open_webui.py [--turns 15] [--window 1020] [--default-max-tokens N]
                               [--out out/bench-stock/open-webui]

Installs ``open-webui==0.12.4`` once into ``out/venv-open-webui`` (about 7 GB; reused afterwards), starts
``sinkstream serve`` with the embedded SmolLM2-135M (fresh state under ``--out``) and Open WebUI offline
in front of it (no login, no title, tag, follow-up or autocomplete requests; its log in ``--out``), then
drives the page with Playwright and the system's Chromium (``/usr/bin/chromium``):

- ``--turns`` user messages, MT-Bench questions (both turns of each question, in order);
- "Regenerate" > "Try Again" on the last answer;
- "Edit" on the third-from-last user message, its text changed, "Send".

Open WebUI sends plain streaming Chat Completions with the whole history and its built-in tool
definitions every time, and no ``max_tokens`` (the server's ``--default-max-tokens`` applies). An action
ends when the server counts one more finished turn (``sinkstream_turns_total``), it has no request in
flight and the page shows no stop button. Per action, from the server's ``/metrics`` before and after:
tokens prefilled, tokens resumed from kept states, how the conversation started (new, resumed, appended,
continued, branched, restarted) and the Chat Completions requests received.

Last line: one JSON object (also ``--out``/open_webui.json); on failure it has an ``error`` key saying
where. Never part of ``make test``: it needs Chromium, the 7 GB install and minutes of CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))
from serverproc import Server, free_port, request  # noqa: E402

VERSION = "0.12.4"
VENV = ROOT / "out" / "venv-open-webui"
MODEL = "smollm2"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]  # fmt: skip
CHAT_ROUTE = "/v1/chat/completions"
QUIET_ROUTES = {"/metrics", "/health"}


def log(message: str) -> None:
    print(f"[open_webui {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def questions() -> list[str]:
    from sinkstream.eval.data import mt_bench_questions

    return [t for q in mt_bench_questions() for t in q["turns"]]


# -- Open WebUI ---------------------------------------------------------------------------------------
def open_webui_bin() -> Path:
    """The ``open-webui`` command of ``out/venv-open-webui``, installed there on first use."""
    exe = VENV / "bin" / "open-webui"
    if exe.exists():
        return exe
    log(f"installing open-webui=={VERSION} into {VENV} (about 7 GB, once)")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    done = subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", f"open-webui=={VERSION}"],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode or not exe.exists():
        shutil.rmtree(VENV, ignore_errors=True)
        raise RuntimeError(f"pip install open-webui=={VERSION} failed: {done.stderr.strip()[-500:]}")
    return exe


class OpenWebUI:
    """``open-webui serve`` offline on a free port, pointed at one OpenAI-compatible server."""

    def __init__(self, exe: Path, api_url: str, data_dir: Path, log_path: Path):
        self.exe, self.api_url, self.data_dir, self.log_path = exe, api_url, data_dir, log_path
        self.port, self.proc = free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        return dict(os.environ, OFFLINE_MODE="true", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                    ENABLE_OLLAMA_API="false", WEBUI_AUTH="false", WEBUI_SECRET_KEY="sinkstream-bench",
                    DATA_DIR=str(self.data_dir), OPENAI_API_BASE_URL=self.api_url + "/v1",
                    OPENAI_API_KEY="sinkstream-bench", ENABLE_TITLE_GENERATION="false",
                    ENABLE_TAGS_GENERATION="false", ENABLE_FOLLOW_UP_GENERATION="false",
                    ENABLE_AUTOCOMPLETE_GENERATION="false", ENABLE_WEB_SEARCH="false",
                    ENABLE_VERSION_UPDATE_CHECK="false")  # fmt: skip

    def start(self, timeout: float = 600) -> OpenWebUI:
        """Start it and wait for ``/health`` (it first logs a traceback for the RAG embedding model it cannot
        fetch offline, and carries on)."""
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir.mkdir(parents=True)
        cmd = [str(self.exe), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        out = open(self.log_path, "w")  # noqa: SIM115 (it writes there while it runs)
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env())
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"open-webui exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if request(self.url, "GET", "/health", timeout=5)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"open-webui did not answer on /health in {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


# -- the server's counters ----------------------------------------------------------------------------
def metrics(url: str) -> dict[str, float]:
    """Every sample of the server's ``/metrics`` by its name and labels, e.g. ``sinkstream_turns_total{outcome="ok"}``."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    return {key: float(value) for key, _, value in (ln.rpartition(" ") for ln in lines if ln and ln[0] != "#")}


def labelled(sample: dict[str, float], name: str, label: str) -> dict[str, float]:
    """``{label value: value}`` of one labelled counter, e.g. starts by mode."""
    out = {}
    for key, value in sample.items():
        m = re.fullmatch(rf"{name}\{{(.*)\}}", key)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[labels.get(label, "")] = out.get(labels.get(label, ""), 0.0) + value
    return out


def grown(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {k: int(v - before.get(k, 0)) for k, v in after.items() if v > before.get(k, 0)}


def requests_by_route(sample: dict[str, float]) -> dict[str, float]:
    return labelled(sample, "sinkstream_requests_total", "route")


def finished_turns(sample: dict[str, float]) -> float:
    return sum(labelled(sample, "sinkstream_turns_total", "outcome").values())


def delta(before: dict[str, float], after: dict[str, float]) -> dict:
    """One action's row fields from the server's counters before and after it."""
    routes = grown(requests_by_route(before), requests_by_route(after))
    row = {
        "prefilled": int(after["sinkstream_prompt_tokens_total"] - before["sinkstream_prompt_tokens_total"]),
        "resumed": int(
            after["sinkstream_resumed_prompt_tokens_total"] - before["sinkstream_resumed_prompt_tokens_total"]
        ),
        "generated": int(after["sinkstream_generated_tokens_total"] - before["sinkstream_generated_tokens_total"]),
        "modes": grown(*(labelled(s, "sinkstream_conversation_starts_total", "mode") for s in (before, after))),
        "requests": routes.pop(CHAT_ROUTE, 0),
    }
    outcomes = grown(*(labelled(s, "sinkstream_turns_total", "outcome") for s in (before, after)))
    if set(outcomes) - {"ok"}:
        row["outcomes"] = outcomes
    other = {route: n for route, n in routes.items() if route not in QUIET_ROUTES}
    if other:
        row["other_requests"] = other
    return row


# -- the page -----------------------------------------------------------------------------------------
class Chat:
    """One Open WebUI chat page; each action returns its row once the answer is complete."""

    def __init__(self, page, server_url: str, timeout: float):
        self.page, self.server_url, self.timeout = page, server_url, timeout

    def open(self, url: str) -> None:
        """Load the page, dismiss the "What's New" dialog if it shows, and select the sinkstream model."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        self.page.goto(url, wait_until="domcontentloaded", timeout=120_000)
        self.page.locator("#chat-input").wait_for(timeout=120_000)
        dialog = self.page.get_by_role("button", name="Okay, Let's Go!")
        try:
            dialog.wait_for(timeout=5_000)
            dialog.click()
        except PlaywrightTimeout:  # no dialog: this version's notes were seen before
            pass
        selector = self.page.locator("#model-selector-model-button")
        if (selector.get_attribute("aria-label") or "") != f"Selected model: {MODEL}":
            selector.click()
            self.page.get_by_role("option", name=f"Select {MODEL} model").first.click()
        label = selector.get_attribute("aria-label")
        if label != f"Selected model: {MODEL}":
            raise RuntimeError(f"the model selector says {label!r}")

    def type_into(self, locator, text: str) -> None:
        """Text into the rich chat input; lines joined with Shift+Enter (Enter would send)."""
        locator.click()
        for i, line in enumerate(text.split("\n")):
            if i:
                self.page.keyboard.press("Shift+Enter")
            self.page.keyboard.insert_text(line)

    def send(self, text: str) -> dict:
        self.type_into(self.page.locator("#chat-input"), text)
        return self.act(lambda: self.page.locator("#send-message-button").click())

    def regenerate(self) -> dict:
        def click():
            self.page.get_by_role("button", name="Regenerate").last.click()
            again = self.page.get_by_text("Try Again", exact=True)  # 0.12 opens a menu first
            again.wait_for(timeout=10_000)
            again.click()

        return self.act(click)

    def user_message(self, from_end: int):
        """The ``from_end``-th user message from the last (1: the last one); Open WebUI shows only the last few
        messages of a long chat and loads older ones as it is scrolled up."""
        messages = self.page.locator(".user-message")
        for _ in range(60):
            if messages.count() >= from_end:
                return messages.nth(messages.count() - from_end)
            self.page.locator("#messages-container").evaluate("e => e.scrollTo(0, 0)")
            self.page.wait_for_timeout(500)
        raise RuntimeError(f"only {messages.count()} user messages on the page")

    def edit(self, from_end: int, original: str, text: str) -> dict:
        """Edit the ``from_end``-th user message from the last (its text ``original``): replace its text and
        send it."""
        message = self.user_message(from_end)
        message.hover()
        message.get_by_role("button", name="Edit").click()
        box = self.page.locator("textarea[id^=message-edit-]")
        shown = box.input_value()
        if not shown.startswith(original[:40]):
            raise RuntimeError(f"editing the wrong message: {shown[:80]!r}")
        box.fill(text)
        return self.act(lambda: self.page.locator("#confirm-edit-message-button").click())

    def idle(self) -> bool:
        return not self.page.locator('button[aria-label="Stop"]').is_visible()

    def act(self, submit) -> dict:
        """Submit, then wait for the end of the answer: one more finished turn on the server, nothing in
        flight there, no stop button on the page. Gives up early if page and server stay idle with no turn
        finished (Open WebUI showed an error)."""
        before = metrics(self.server_url)
        t0 = time.perf_counter()
        submit()
        quiet_since, seconds = None, None
        while True:
            now = metrics(self.server_url)
            busy = now.get("sinkstream_active_requests", 0) > 0 or not self.idle()
            if finished_turns(now) > finished_turns(before) and not busy:
                seconds = time.perf_counter() - t0
                break
            quiet_since = None if busy else quiet_since or time.perf_counter()
            if quiet_since and time.perf_counter() - quiet_since > 30:
                break
            if time.perf_counter() - t0 > self.timeout:
                raise TimeoutError(f"no answer in {self.timeout:.0f} s")
            time.sleep(0.25)
        after = self.settle(now)
        row = {"seconds": round(seconds, 2) if seconds else None, **delta(before, after)}
        if seconds is None:
            row["error"] = "no turn finished on the server"
        return row

    def settle(self, last: dict[str, float], quiet: float = 3.0) -> dict[str, float]:
        """The counters once nothing changed for ``quiet`` seconds (a request Open WebUI sends after the
        answer counts with it)."""
        t0 = time.perf_counter()
        while True:
            time.sleep(quiet)
            now = metrics(self.server_url)
            keys = ("sinkstream_prompt_tokens_total", "sinkstream_generated_tokens_total")
            same = requests_by_route(now).get(CHAT_ROUTE) == requests_by_route(last).get(CHAT_ROUTE)
            if same and all(now[k] == last[k] for k in keys) and now.get("sinkstream_active_requests", 0) == 0:
                return now
            if time.perf_counter() - t0 > self.timeout:
                raise TimeoutError("the server did not settle")
            last = now


# -- the run ------------------------------------------------------------------------------------------
def run(args, result: dict, stage: list[str]) -> None:
    out = Path(args.out)
    stage[0] = "installing open-webui"
    exe = open_webui_bin()
    stage[0] = "starting sinkstream serve"
    state = out / "state"
    shutil.rmtree(state, ignore_errors=True)
    extra = ["--default-max-tokens", str(args.default_max_tokens)] if args.default_max_tokens else []
    srv = Server("smollm2-135m", state, *extra, sink=4, window=args.window, threads=args.threads, name=MODEL)
    ui = None
    try:
        srv.start()
        stage[0] = "starting open-webui"
        ui = OpenWebUI(exe, srv.url, out / "open-webui-data", out / "open-webui.log").start()
        log(f"sinkstream on {srv.url}, open-webui on {ui.url}")
        stage[0] = "launching chromium"
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            try:
                drive(Chat(page, srv.url, args.timeout), ui.url, args.turns, result["rows"], stage)
            except Exception:
                with contextlib.suppress(Exception):  # what the page showed, for the error in the JSON
                    page.screenshot(path=str(out / "failure.png"))
                    (out / "failure.html").write_text(page.content())
                raise
            finally:
                browser.close()
    finally:
        if ui is not None:
            ui.stop()
        srv.stop()


def drive(chat: Chat, url: str, turns: int, rows: list[dict], stage: list[str]) -> None:
    """The user's actions, each recorded as a row: the turns, Regenerate, and an edit of the third-from-last
    user message."""

    def record(action: str, do, *args) -> None:
        stage[0] = action
        rows.append({"action": action, **do(*args)})
        log(json.dumps(rows[-1]))

    stage[0] = "opening the page"
    chat.open(url)
    qs = questions()
    for turn in range(1, turns + 1):
        record(f"turn {turn}", chat.send, qs[(turn - 1) % len(qs)])
    record("regenerate", chat.regenerate)
    edited = max(1, turns - 2)
    original = qs[(edited - 1) % len(qs)]
    record(f"edit turn {edited}", chat.edit, turns - edited + 1, original, original + " Answer in three sentences.")


def summary(rows: list[dict]) -> dict:
    by = {r["action"]: r for r in rows}
    later = [r["prefilled"] for r in rows if r["action"].startswith("turn ") and int(r["action"][5:]) >= 3]
    edit = next((r for r in rows if r["action"].startswith("edit")), None)
    return {
        "prefilled_turn_1": by["turn 1"]["prefilled"] if "turn 1" in by else None,
        "max_prefilled_turns_3_on": max(later) if later else None,
        "regenerate_prefilled": by["regenerate"]["prefilled"] if "regenerate" in by else None,
        "edit_prefilled": edit["prefilled"] if edit else None,
        "requests_per_action": sorted({r["requests"] for r in rows}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=15)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--default-max-tokens", type=int, default=None,
                    help="the server's max_tokens for requests that set none (Open WebUI's); default: the server's")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=600, help="seconds one action may take")
    ap.add_argument("--out", default="out/bench-stock/open-webui")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    result = {"open_webui": VERSION, "date": time.strftime("%Y-%m-%d"), "cpu": cpu.split(":")[-1].strip(),
              "model": "smollm2-135m", "window": args.window, "sink": 4, "turns": args.turns,
              "default_max_tokens": args.default_max_tokens or "server default (1024)", "rows": []}  # fmt: skip
    stage = ["starting"]
    t0 = time.perf_counter()
    try:
        run(args, result, stage)
        result["summary"] = summary(result["rows"])
    except Exception as e:  # reported in the JSON line
        result["error"] = f"{stage[0]}: {type(e).__name__}: {str(e)[:500]}"
        if result["rows"]:
            result["summary"] = summary(result["rows"])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "open_webui.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
