"""A real `sinkstream serve` process on a free 127.0.0.1 port, for the server tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(
        self,
        model: Path | str,
        state_dir: Path,
        *extra: str,
        sink: int = 4,
        window: int = 60,
        threads: int = 1,
        name: str = "tiny",
    ):
        self.model, self.state_dir, self.extra = model, state_dir, list(extra)
        self.sink, self.window, self.threads, self.name = sink, window, threads, name
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = state_dir.parent / f"{state_dir.name}-server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "sinkstream",
            "serve",
            "--model",
            str(self.model),
            "--port",
            str(self.port),
            "--state-dir",
            str(self.state_dir),
            "--sink",
            str(self.sink),
            "--window",
            str(self.window),
            "--threads",
            str(self.threads),
            "--log-level",
            "warning",
            "--served-model-name",
            self.name,
            *self.extra,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("SINKSTREAM_API_KEY", None)
        log = open(self.log, "a")  # noqa: SIM115 (the server writes it while it runs)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        self.kill()
        raise RuntimeError("server did not come up in 300 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict | None = None,
        headers: dict | None = None,
        timeout: float = 120,
    ) -> tuple[int, dict | str]:
        return request(self.url, method, path, body, headers, timeout)


def request(
    url: str,
    method: str,
    path: str,
    body: bytes | dict | None = None,
    headers: dict | None = None,
    timeout: float = 120,
) -> tuple[int, dict | str]:
    """(status, JSON body or text) of one plain HTTP request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    h = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def sse_events(raw: str) -> list[dict | str]:
    """The ``data:`` payloads of a server-sent event stream, JSON-decoded ("[DONE]" kept as text)."""
    out = []
    for line in raw.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
