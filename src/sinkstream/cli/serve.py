"""``sinkstream serve``: options, their checks, and the uvicorn run."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from ..extras import need
from .options import UsageError, add_model_and_cache, add_pin, check_cache_options, check_pin, model_name

DEFAULT_STATE = "~/.local/state/sinkstream"


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible server with endless, persistent chat sessions")
    add_model_and_cache(s)
    add_pin(s, "each conversation's system prompt and tools (a request's 'pin' field chooses for its conversation)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health and the page "
        "(default: env SINKSTREAM_API_KEY; none: open)",
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_names(s.add_argument_group("the model's names and the clients it serves"))
    _add_store(s.add_argument_group("sessions and their store"))
    _add_limits(s.add_argument_group("limits"))
    k = s.add_argument_group("kept turns: any client's resent history resumes instead of being fed again")
    k.add_argument(
        "--keep-turns", type=int, default=8, help="turns kept per conversation for regenerate and edit (default 8)"
    )
    k.add_argument("--turns-disk-mb", type=float, default=8192, help="disk all kept turns may take (default 8192)")
    k.add_argument("--turns-memory-mb", type=float, default=1024, help="kept turns also held in memory (default 1024)")
    c = s.add_argument_group("scale-out on Ray Serve (pip install 'sinkstream[cluster]')")
    c.add_argument("--replicas", type=int, default=None, help="serve N replicas on Ray Serve (needs --store)")
    c.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local Ray)")
    c.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")


def _add_names(g) -> None:
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the model's names in the API, the first one primary (default: --model, or smollm2-135m); "
        "a request for another name gets 404 unless --accept-any-model",
    )
    g.add_argument(
        "--accept-any-model",
        action="store_true",
        help="answer requests for any model name with this model (clients with a hard-coded name, e.g. gpt-4o-mini)",
    )
    g.add_argument(
        "--cors-origins",
        nargs="+",
        default=None,
        metavar="ORIGIN",
        help="let web pages from these origins call the API (e.g. http://localhost:3000; '*' for any); default: none",
    )


def _add_store(g) -> None:
    g.add_argument(
        "--state-dir",
        default=None,
        help=f"sessions database and cache snapshots (default $SINKSTREAM_STATE or {DEFAULT_STATE})",
    )
    g.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="sessions' records in this PostgreSQL database (postgresql://…; default: SQLite in --state-dir)",
    )
    g.add_argument(
        "--snapshot-dir",
        default=None,
        help="cache snapshots here (default: --state-dir/caches); replicas sharing a --store need one they all see",
    )
    g.add_argument("--replica-id", default=None, help="this server's name in x-sinkstream-replica (default host:pid)")
    g.add_argument(
        "--max-sessions",
        type=int,
        default=16,
        help="idle sessions kept in memory; the others wait on disk (default 16)",
    )
    g.add_argument(
        "--session-wait",
        type=float,
        default=0.0,
        help="seconds a request for a busy session waits its turn (default 0: refused at once with 409)",
    )
    g.add_argument("--session-queue", type=int, default=8, help="requests that may wait for one session (default 8)")


def _add_limits(g) -> None:
    g.add_argument(
        "--max-request-tokens", type=int, default=1_000_000, help="tokens one request may feed (default 1000000)"
    )
    g.add_argument(
        "--max-completion-tokens",
        type=int,
        default=16_384,
        help="largest max_tokens a request may ask for (default 16384)",
    )
    g.add_argument(
        "--default-max-tokens",
        type=int,
        default=None,
        help="max_tokens of a chat request that sets none (default 1024, at most --max-completion-tokens)",
    )
    g.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body in MiB (default 8)")
    g.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16; 1: one at a time)")
    g.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests that may wait for a place in the batch; more get 429 with Retry-After (default 64)",
    )


def validate(args) -> None:
    for module in ("fastapi", "uvicorn", "prometheus_client", "xgrammar"):
        need(module, "server")
    check_cache_options(args)
    check_pin(args)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.default_max_tokens is None:
        args.default_max_tokens = min(1024, args.max_completion_tokens)
    for name in ("max_request_tokens", "max_completion_tokens", "default_max_tokens", "max_batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_sessions < 0:
        raise UsageError(f"--max-sessions must be >= 0, got {args.max_sessions}")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
    for origin in args.cors_origins or ():
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise UsageError(f"--cors-origins takes origins such as http://localhost:3000 or '*', got '{origin}'")
    if not args.session_wait >= 0:  # NaN fails too
        raise UsageError(f"--session-wait must be >= 0 seconds, got {args.session_wait}")
    if args.session_queue < 1:
        raise UsageError(f"--session-queue must be >= 1, got {args.session_queue}")
    if args.max_body_mb <= 0:
        raise UsageError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    if args.keep_turns < 1:
        raise UsageError(f"--keep-turns must be >= 1, got {args.keep_turns}")
    for name in ("turns_disk_mb", "turns_memory_mb"):
        if not getattr(args, name) >= 0:  # NaN fails too
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.default_max_tokens > args.max_completion_tokens:
        raise UsageError("--default-max-tokens is larger than --max-completion-tokens")
    args.api_key = args.api_key or os.environ.get("SINKSTREAM_API_KEY") or None
    state = Path(args.state_dir or os.environ.get("SINKSTREAM_STATE") or DEFAULT_STATE).expanduser()
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --state-dir '{state}': {e}") from None
    if not os.access(state, os.W_OK):
        raise UsageError(f"--state-dir '{state}' is not writable")
    args.state_dir = state
    _check_store(args)
    _check_replicas(args)


def _check_replicas(args) -> None:
    if args.replicas is None:
        return
    if args.replicas < 1:
        raise UsageError(f"--replicas must be >= 1, got {args.replicas}")
    if not args.replica_cpus > 0:
        raise UsageError(f"--replica-cpus must be > 0, got {args.replica_cpus}")
    if not args.store:
        raise UsageError("--replicas needs --store postgresql://…: sessions move between replicas")
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise UsageError("--replicas needs Ray Serve: pip install 'sinkstream[cluster]'") from None


def _check_store(args) -> None:
    """--store opens (before the model loads: a wrong URL is one line, not a traceback)."""
    if not args.store:
        return
    from ..server.records import open_records

    try:
        open_records(args.store, args.state_dir).close()
    except ImportError:
        raise UsageError("--store postgresql:// needs psycopg: pip install 'sinkstream[postgres]'") from None
    except Exception as e:  # psycopg's OperationalError, a bad URL: said in one line
        raise UsageError(f"cannot open --store: {str(e).strip().splitlines()[0][:300]}") from None


def server_config(args):
    """The server's configuration from these options (names, limits, cache, store, kept turns)."""
    from ..server.app import ServerConfig

    names = args.served_model_name or [
        Path(args.model).name if args.model and os.path.exists(args.model) else model_name(args)
    ]
    return ServerConfig(
        model_name=names[0],
        aliases=tuple(names[1:]),
        accept_any_model=args.accept_any_model,
        cors_origins=tuple(args.cors_origins or ()),
        max_queue=args.max_queue,
        n_sink=args.sink,
        window=args.window,
        pin=args.pin,
        state_dir=args.state_dir,
        store_url=args.store,
        snapshot_dir=args.snapshot_dir,
        replica_id=args.replica_id,
        api_key=args.api_key,
        max_sessions=args.max_sessions,
        session_wait_s=args.session_wait,
        session_queue=args.session_queue,
        max_request_tokens=args.max_request_tokens,
        max_completion_tokens=args.max_completion_tokens,
        default_max_tokens=args.default_max_tokens,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_batch=args.max_batch,
        decode=args.decode,
        kv_dtype=None if args.kv_dtype == "auto" else args.kv_dtype,
        keep_turns=args.keep_turns,
        turns_disk_mb=args.turns_disk_mb,
        turns_memory_mb=args.turns_memory_mb,
    )


def model_spec(args):
    from ..server.app import ModelSpec

    return ModelSpec(args.model, dtype=args.dtype, device=args.device, attn=args.attn, weights=args.weights,
                     threads=args.threads)  # fmt: skip


def run(args) -> int:
    import uvicorn

    from ..server.app import build_app

    spec, config = model_spec(args), server_config(args)
    if args.replicas:
        from ..server import cluster

        options = cluster.ClusterOptions(args.replicas, args.replica_cpus, args.ray_address, args.host, args.port)
        return cluster.run(spec, config, options)
    config.worker_thread = False  # this thread runs the model (``serve_http_beside``)
    try:
        app = build_app(spec, config)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"sinkstream serve: warning: listening on {args.host} without an API key", file=sys.stderr)
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    )
    print(
        f"sinkstream serve: model {config.model_name}, cache {args.sink}+{args.window}, pin {args.pin}, state {args.state_dir}",
        file=sys.stderr,
        flush=True,
    )
    return serve_http_beside(server, app.state.worker)


def serve_http_beside(server, worker) -> int:
    """Serve HTTP from a thread while this (the main) thread runs the model's worker, where OpenMP starts
    the kernels' parallel loops fastest (``server.worker``). SIGINT and SIGTERM stop both gracefully, also
    where the server was started with SIGINT ignored (a background job of a script, as uvicorn handles it
    too); if the HTTP server ends on its own (it could not bind its port, say), so does the worker."""
    http = threading.Thread(target=server.run, name="sinkstream-http", daemon=True)

    def interrupt(*_):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    http.start()
    try:
        worker.run(until=lambda: not http.is_alive())
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=30)
        worker.stop()
    return 0 if server.started else 1
