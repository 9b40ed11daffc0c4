"""`sinkstream serve --replicas 2` on a local Ray, driven end to end; run by tests/test_cluster.py inside
a network namespace of its own (only a loopback interface: whatever Ray binds, nothing outside can
reach it). Starts PostgreSQL and the server, checks affinity, concurrency, a kill -9 mid-answer and
the session lock, and writes what it saw as JSON to the path given.

    unshare -n sh -c 'ip link set lo up && python tests/cluster_scenario.py out.json'
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from helpers import tiny_model, tiny_tokenizer
from pgserver import PostgresServer
from serverproc import free_port, request
from sinkstream.models import export_model


def chat(url: str, text: str, sid: str | None = None, header: str | None = None, **kw) -> tuple[int, dict, dict]:
    """(status, body, response headers) of one chat request; the session in the body or the header."""
    host, port = url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host.split("//")[1], int(port), timeout=120)
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 12, "temperature": 0,
            "logprobs": True, **({"session_id": sid} if sid else {}), **kw}  # fmt: skip
    headers = {"Content-Type": "application/json", **({"x-session-id": header} if header else {})}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    r = conn.getresponse()
    data = json.loads(r.read() or b"{}")
    return r.status, data, {k.lower(): v for k, v in r.getheaders()}


def logprobs(body: dict) -> list:
    return [(t["token"], t["logprob"]) for t in body["choices"][0]["logprobs"]["content"]]


def open_stream(url: str, sid: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    host, port = url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host.split("//")[1], int(port), timeout=120)
    body = {"messages": [{"role": "user", "content": "a long answer"}], "session_id": sid, "stream": True,
            "max_tokens": 3000, "temperature": 1.0, "seed": 1, "logit_bias": {"2": -100}}  # fmt: skip
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    for _ in range(5):
        r.readline()
        r.readline()
    return conn, r


def wait_health(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if request(url, "GET", "/health", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server did not answer /health in {seconds} s")


def warm_up(url: str) -> int:
    """Requests without a session until both replicas have answered: the router's view of the replica
    set is then complete (while it fills, a session's hash can still move)."""
    answered = set()
    for i in range(1, 200):
        answered.add(request(url, "GET", "/health")[1]["replica"]["id"])
        if len(answered) == 2:
            return i
        time.sleep(0.1)
    raise RuntimeError("one replica never answered")


def post(url: str, path: str, body: dict) -> tuple[int, dict, dict]:
    host, port = url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host.split("//")[1], int(port), timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"{}"), {k.lower(): v for k, v in r.getheaders()}


def stock_client(url: str) -> dict:
    """Clients that name no session: a chat client resending its whole history and a Responses chain. The
    router keys each by its conversation's beginning, so every turn lands on one replica and resumes."""
    history, chat_replicas, chat_cached = [], set(), []
    for i in range(5):
        history.append({"role": "user", "content": f"stock turn {i}"})
        _, body, headers = post(url, "/v1/chat/completions", {"messages": history, "max_tokens": 8})
        chat_replicas.add(headers["x-sinkstream-replica"])
        chat_cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        history.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    prev, resp_replicas, resp_cached = None, set(), []
    for i in range(4):
        _, body, headers = post(url, "/v1/responses", {"input": f"responses turn {i}", "max_output_tokens": 8,
                                                            "previous_response_id": prev})  # fmt: skip
        resp_replicas.add(headers["x-sinkstream-replica"])
        resp_cached.append(body["usage"]["input_tokens_details"]["cached_tokens"])
        prev = body["id"]
    return {"chat_replicas": len(chat_replicas), "chat_cached": chat_cached, "responses_replicas": len(resp_replicas),
            "responses_cached": resp_cached}  # fmt: skip


def scenario(url: str, snapshots: Path, db_url: str) -> dict:
    seen: dict = {"warm_up_requests": warm_up(url)}
    # affinity: every turn of a session on one replica, for the body field and the header alike
    body_turns = [chat(url, f"turn {i}", sid="by-body") for i in range(5)]
    head_turns = [chat(url, f"turn {i}", header="by-header") for i in range(5)]
    seen["statuses"] = [t[0] for t in body_turns + head_turns]
    seen["body_replicas"] = sorted({t[2]["x-sinkstream-replica"] for t in body_turns})
    seen["header_replicas"] = sorted({t[2]["x-sinkstream-replica"] for t in head_turns})
    seen["header_turns"] = [t[1]["session"]["turns"] for t in head_turns]
    seen["stock"] = stock_client(url)
    # two sessions that hash to different replicas decode at the same time
    where = {}
    for i in range(40):
        where.setdefault(chat(url, "hello", sid=f"spread-{i}")[2]["x-sinkstream-replica"], f"spread-{i}")
        if len(where) == 2:
            break
    seen["replicas"] = sorted(where)
    streams = [open_stream(url, sid) for sid in where.values()]  # both mid-answer now
    seen["concurrent"] = [r.status for _, r in streams]
    for conn, _ in streams:
        conn.close()
    # the session lock: a second request for a session that is answering gets the busy answer
    conn, _ = open_stream(url, "locked")
    seen["busy"] = chat(url, "meanwhile", sid="locked")[1].get("error", {}).get("code")
    conn.close()
    seen["replicas_listed"] = sorted(r["id"] for r in request(url, "GET", "/v1/replicas")[1]["data"])
    # kill -9 the replica answering a session; the session goes on elsewhere from its last commit
    for sid in ("victim", "twin"):
        chat(url, "first turn", sid=sid)
    conn, r = open_stream(url, "victim")
    victim = r.getheader("x-sinkstream-replica")
    os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
    t0 = time.time()
    conn.close()
    for _ in range(60):
        status, after, headers = chat(url, "second turn", sid="victim")
        if status == 200:
            break
        time.sleep(1)  # the session's lock goes with the dead replica's connection; its retries wait
    seen["failover"] = {"status": status, "seconds": round(time.time() - t0, 1),
                        "replica": headers.get("x-sinkstream-replica"), "killed": victim,
                        "turns": after.get("session", {}).get("turns")}  # fmt: skip
    twin = chat(url, "second turn", sid="twin")[1]
    seen["same_logprobs_as_twin"] = logprobs(after) == logprobs(twin)
    import psycopg

    with psycopg.connect(db_url) as db:
        named = {row[0] for row in db.execute("SELECT snapshot FROM sessions UNION SELECT snapshot FROM turns")}
    seen["orphan_or_partial_snapshots"] = sorted({p.name for p in snapshots.iterdir()} - named)
    return seen


def main(out: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="sinkstream-cluster-"))
    model = export_model(tiny_model("llama", layers=2), tiny_tokenizer(), tmp / "tiny")
    pg = PostgresServer().start()
    proc = None
    result: dict = {}
    try:
        db_url = pg.fresh_database("cluster")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "sinkstream", "serve", "--replicas", "2", "--replica-cpus", "0.5",
               "--store", db_url, "--model", str(model), "--state-dir", str(tmp / "state"), "--port", str(port),
               "--sink", "4", "--window", "60", "--threads", "1", "--served-model-name", "tiny"]  # fmt: skip
        t0 = time.time()
        log = open(tmp / "server.log", "w")  # noqa: SIM115 (the server writes it while it runs)
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_AUTH_MODE": "disabled"}
        )
        wait_health(url, proc, 300)
        result["startup_s"] = round(time.time() - t0, 1)
        result.update(scenario(url, tmp / "state" / "caches", db_url))
    except Exception as e:  # reported to the test, with the server's log
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                result["exit"] = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                result["exit"] = "killed"
            result["log_tail"] = (tmp / "server.log").read_text()[-3000:]
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
        pg.stop()
        Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    threading.excepthook = lambda a: None
    main(sys.argv[1])
