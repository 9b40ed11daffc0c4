"""Scale-out on Ray Serve: ``sinkstream serve --replicas N --store postgresql://…``.

Two deployments in one Serve application:

- ``ModelReplica`` (N replicas): each builds the same app a single server runs (its own model and
  batching worker, the shared PostgreSQL store) and serves HTTP requests handed to it through
  ``forward``, which runs the request through that app and yields the response as it comes (SSE
  streams chunk by chunk).
- ``SessionRouter`` (the HTTP ingress): reads each request's session (the ``session_id`` body field,
  else the ``x-session-id`` header; for a request that names none, a key of its conversation's
  beginning) and forwards it with ``handle.options(session_id=…)``, so that Serve's
  ``ConsistentHashRouter`` keeps a conversation on one replica while the replica set is stable.

Affinity is an optimisation, not what keeps sessions right: the replica set changes (a replica dies,
a replacement joins the hash ring), so a session will move. Every replica commits each turn to the
shared store, takes a session with the store's lock before a turn (``records.PostgresRecords``), and
loads a session it does not hold (or holds an older copy of) from the store.

This module needs Ray (``pip install 'sinkstream[cluster]'``) and is imported only with ``--replicas``.
"""

import asyncio
import json
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig

from . import history
from .app import ModelSpec, ServerConfig, build_app

SESSION_HEADER = "x-session-id"
ROUTER_CPUS = 0.05
APP = "sinkstream"
AFFINITY = RequestRouterConfig(
    request_router_class="ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
    request_router_kwargs={"num_virtual_nodes": 100, "num_fallback_replicas": 1},
)


def route_key(headers, body: bytes) -> str | None:
    """What keeps a request's conversation on one replica: its session (the JSON body's ``session_id``,
    else the ``x-session-id`` header; a Responses request's ``conversation``), else, for a client that
    names none, a key of its conversation's beginning, the same every turn (a resent history's first
    messages, or the key a ``previous_response_id`` carries), so its kept turns are in that replica's
    memory."""
    try:
        data = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        data = {}
    data = data if isinstance(data, dict) else {}
    conv = data.get("conversation")
    for sid in (
        data.get("session_id"),
        headers.get(SESSION_HEADER),
        conv.get("id") if isinstance(conv, dict) else conv,
    ):
        if isinstance(sid, str) and sid:
            return sid
    prev = data.get("previous_response_id")
    key = history.affinity_of_response(prev) if isinstance(prev, str) else None
    messages = data.get("messages")
    if key is None and isinstance(data.get("input"), str | list):
        messages = _response_messages(data)
    if key is None and isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        key = history.affinity(messages)
    return f"conversation:{key}" if key else None


def _response_messages(data: dict) -> list[dict]:
    """A Responses request's first messages, as the server will see them (``responses``)."""
    first = data["input"] if isinstance(data["input"], list) else [{"role": "user", "content": data["input"]}]
    instructions = data.get("instructions")
    head = [{"role": "system", "content": instructions}] if isinstance(instructions, str) and instructions else []
    return head + [m for m in first if isinstance(m, dict) and m.get("role")]


@dataclass(frozen=True)
class ClusterOptions:
    replicas: int
    replica_cpus: float = 1.0
    ray_address: str | None = None  # an existing Ray cluster (None: start a local Ray)
    host: str = "127.0.0.1"
    port: int = 8000


class ModelReplica:
    """One replica: the single server's app, with its lifespan (the worker thread) started here."""

    async def __init__(self, spec: ModelSpec, config: ServerConfig):
        context = serve.get_replica_context()
        self.replica_id = f"{context.replica_id.unique_id}:{os.getpid()}"
        self.app = build_app(spec, replace(config, replica_id=self.replica_id))
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()

    async def __del__(self):
        """Serve's shutdown of this replica: the app's own (worker stopped, store closed, heartbeat gone)."""
        await self.lifespan.__aexit__(None, None, None)

    def check_health(self) -> None:
        """Serve's health check: a replica whose model worker has died is replaced."""
        if not self.app.state.worker.alive:
            raise RuntimeError("the model worker thread is not running")

    async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes):
        """One HTTP request through this replica's app: yields the response's status and headers,
        then its body as it is sent. Closing the generator (the client went away) is a disconnect."""
        sent, gone = asyncio.Queue(), asyncio.Event()
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
                 "root_path": "", "headers": [(k.encode(), v.encode()) for k, v in headers],
                 "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}  # fmt: skip
        task = asyncio.create_task(self.app(scope, receive, sent.put))
        try:
            while True:
                message = await sent.get()
                if message["type"] == "http.response.start":
                    yield {
                        "status": message["status"],
                        "headers": [(k.decode(), v.decode()) for k, v in message["headers"]],
                    }
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        return
        finally:
            gone.set()
            await asyncio.wait({task}, timeout=30)


def unavailable(e: Exception) -> JSONResponse:
    message = f"the replica serving this request failed ({type(e).__name__}); retry: the session is at its last turn"
    error = {"message": message, "type": "server_error", "param": None, "code": "replica_unavailable"}
    return JSONResponse({"error": error}, status_code=503, headers={"Retry-After": "1"})


def router_app(replicas) -> FastAPI:
    """The HTTP ingress: every path, forwarded to the replica the request's session hashes to."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)  # the replicas serve the document

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
    async def forward(path: str, request: Request):
        body = await request.body()
        sid = route_key(request.headers, body)
        handle = replicas.options(stream=True, **({"session_id": sid} if sid else {}))
        answer = handle.forward.remote(request.method, request.url.path, request.url.query.encode(),
                                       list(request.headers.items()), body)  # fmt: skip
        try:
            start = await answer.__anext__()
        except Exception as e:  # the replica died under the request, or cannot be reached: retry
            return unavailable(e)
        skip = {"content-length", "transfer-encoding"}
        headers = {k: v for k, v in start["headers"] if k.lower() not in skip}
        return StreamingResponse(answer, status_code=start["status"], headers=headers)

    return app


@serve.ingress()
class SessionRouter:
    def __init__(self, replicas):
        self.replicas = replicas

    def __serve_build_asgi_app__(self):
        return router_app(self.replicas)


def application(spec: ModelSpec, config: ServerConfig, options: ClusterOptions):
    """The Serve application: ``options.replicas`` replicas of this model and configuration, and the router."""
    replica = serve.deployment(
        ModelReplica,
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.replica_cpus},
        request_router_config=AFFINITY,
        max_ongoing_requests=max(16, 2 * config.max_batch),
        health_check_period_s=2,
        health_check_timeout_s=10,
        graceful_shutdown_timeout_s=10,
    )
    router = serve.deployment(SessionRouter, ray_actor_options={"num_cpus": ROUTER_CPUS}, max_ongoing_requests=1000)
    return router.bind(replica.bind(spec, config))


def local_resources(options: ClusterOptions) -> dict:
    """A local Ray's CPUs: the machine's, or enough for every replica, a replacement and the router
    (``serve.run`` waits without a limit for CPUs that are not there). An existing cluster has its own."""
    if options.ray_address:
        return {}
    needed = (options.replicas + 1) * options.replica_cpus + ROUTER_CPUS
    return {"num_cpus": max(os.cpu_count() or 1, math.ceil(needed))}


def run(spec: ModelSpec, config: ServerConfig, options: ClusterOptions) -> int:
    """Start (or join) Ray, deploy, serve until SIGINT/SIGTERM, then shut the application down."""
    import ray

    os.environ.setdefault("RAY_SERVE_SESSION_ID_HEADER_KEY", SESSION_HEADER)  # read once, before Ray starts
    ray.init(address=options.ray_address, include_dashboard=False, log_to_driver=False, **local_resources(options))
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(application(spec, config, options), name=APP, route_prefix="/")
    print(f"sinkstream serve: {options.replicas} replicas on Ray Serve at http://{options.host}:{options.port}",
          file=sys.stderr, flush=True)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(APP)
    serve.shutdown()
    ray.shutdown()
    return 0
