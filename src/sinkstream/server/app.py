"""The FastAPI app: OpenAI's chat/completions protocol on one model, with endless sessions.

    app = create_app(model, tokenizer, ServerConfig(model_name="smollm2-135m"))

Requests become ``Job``s for the model's one ``Worker`` thread (continuous batching); their events come
back to the request's coroutine through an asyncio queue. A request naming a ``session_id`` leases
that session from the ``SessionStore`` (409 while another request has it, or a bounded wait:
``leases``), feeds only its new message,
and commits the finished turn (snapshot + transcript) before the last event is sent.

The pieces: ``routes`` (thin HTTP routes), ``serving`` (each route's logic and checks), ``turns``
(a request's life with the worker), ``errors`` (OpenAI's error shape), ``events`` (what the worker
sends back), ``worker``, ``store``, ``protocol`` (the request and response bodies).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from ..grammar import Grammars
from ..models import load_model
from ..pinning import check_pin, parse_pin
from . import openapi
from .conversations import ConversationsServing
from .errors import install_error_handlers
from .leases import Leases
from .limits import RequestLimits
from .metrics import Metrics
from .objects import Objects
from .records import Retention, open_records
from .replica import Replica, ReplicaHeader, heartbeats
from .responses import ResponsesServing
from .resume import Resumer
from .routes import api, open_routes
from .serving import ChatServing, CompletionServing, RequestChecks
from .store import SessionStore
from .threads import one_omp_thread
from .tokens import TokenServing
from .turns import Turns
from .worker import Worker

# A snapshot no record names is a crash's leftover only once no replica can still be between writing it
# and committing the record that names it.
SHARED_ORPHAN_GRACE_S = 3600.0


@dataclass
class ServerConfig:
    model_name: str  # the name /v1/models lists first and responses carry
    aliases: tuple[str, ...] = ()  # other names requests may use for the model
    accept_any_model: bool = False  # answer requests for any model name with this model
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API ("*": any)
    max_queue: int = 64  # requests that may wait for a place in the batch (then 429)
    n_sink: int = 4
    window: int = 1020
    pin: str | int = "auto"  # what a new conversation keeps of its beginning (``pinning``), unless it asks
    state_dir: str | Path = "sinkstream-state"
    store_url: str | None = None  # postgresql://… for records shared by replicas (None: SQLite in state_dir)
    snapshot_dir: str | Path | None = None  # None: state_dir/caches
    replica_id: str | None = None  # this process's name in x-sinkstream-replica (None: host:pid)
    api_key: str | None = None
    max_sessions: int = 16  # idle sessions whose cache stays in memory
    max_request_tokens: int = 1_000_000  # tokens one request may feed (a long history streams in chunks)
    max_completion_tokens: int = 16_384  # largest max_tokens accepted
    default_max_tokens: int = 1024  # when a chat request sets none
    max_body_bytes: int = 8 * 2**20
    max_batch: int = 16
    prefill_chunk: int | None = None
    decode: str = "auto"  # one-token steps: the fused decoder where it applies (auto | fused | transformers)
    kv_dtype: str | None = None  # keys/values of new caches stored in this dtype (None: the model's)
    worker_thread: bool = True  # the worker in a thread of its own (False: the caller runs it, ``Worker.run``)
    session_wait_s: float = 0.0  # a request for a busy session waits this long (0: 409 at once)
    session_queue: int = 8  # requests that may wait for one session
    keep_turns: int = 8  # kept turns per conversation (regenerate and edit resume from them)
    turns_disk_mb: float = 8192  # all kept turns' snapshots on disk
    turns_memory_mb: float = 1024  # kept turns' states also held in memory

    def check(self) -> None:
        for name in (
            "max_request_tokens",
            "max_completion_tokens",
            "default_max_tokens",
            "max_body_bytes",
            "max_batch",
            "window",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n_sink < 0 or self.max_sessions < 0 or self.max_queue < 0:
            raise ValueError("sink, max-sessions and max-queue must be >= 0")
        if not (self.session_wait_s >= 0 and self.session_queue >= 1):  # NaN fails too
            raise ValueError("session-wait must be >= 0 and session-queue >= 1")
        check_pin(parse_pin(self.pin), self.n_sink + self.window)
        if self.keep_turns < 1 or not (self.turns_disk_mb >= 0 and self.turns_memory_mb >= 0):
            raise ValueError("keep-turns must be >= 1, turns-disk-mb and turns-memory-mb >= 0")

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the model is served under, the primary first."""
        return (self.model_name, *(a for a in self.aliases if a != self.model_name))

    def scope(self, model_config, tokenizer) -> str:
        """What a kept state is valid for: this model, chat template and cache configuration."""
        template = getattr(tokenizer, "chat_template", None) or ""
        parts = (self.model_name, model_config.to_json_string(use_diff=False), template, self.n_sink, self.window,
                 self.kv_dtype)  # fmt: skip
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ModelSpec:
    """Which model a server loads and how: what each replica of a scaled-out server loads again."""

    name_or_path: str | None = None  # None: the embedded default
    dtype: str = "float32"
    device: str = "cpu"
    attn: str | None = None
    weights: str = "auto"
    threads: int | None = None

    def load(self):
        if self.threads:
            torch.set_num_threads(self.threads)
        return load_model(self.name_or_path, dtype=self.dtype, device=self.device, attn_implementation=self.attn,
                          weights=self.weights)  # fmt: skip


def build_app(spec: ModelSpec, config: ServerConfig) -> FastAPI:
    """The server's app: the model loaded, then ``create_app``."""
    model, tokenizer = spec.load()
    return create_app(model, tokenizer, config)


def create_app(model, tokenizer, config: ServerConfig) -> FastAPI:
    config.check()
    metrics = Metrics()
    device = next(model.parameters()).device
    store = SessionStore(config.state_dir, model_config=model.config, n_sink=config.n_sink, window=config.window,
                         max_sessions=config.max_sessions, device=device,
                         records=open_records(config.store_url, Path(config.state_dir)),
                         snapshot_dir=config.snapshot_dir,
                         orphan_grace_s=SHARED_ORPHAN_GRACE_S if config.store_url else 0.0,
                         retention=Retention(config.keep_turns, int(config.turns_disk_mb * 2**20)),
                         kept_memory_bytes=int(config.turns_memory_mb * 2**20))  # fmt: skip
    worker = Worker(model, tokenizer, prefill_chunk=config.prefill_chunk, max_batch=config.max_batch, metrics=metrics,
                    decode=config.decode)  # fmt: skip

    async def lifespan(app):
        one_omp_thread()  # this (the event loop's) thread: requests' tensor work on one OpenMP thread
        if config.worker_thread:
            worker.start()
        metrics.sessions.set(store.count())
        beating = asyncio.create_task(heartbeats(app.state.replica, store, worker))
        yield
        beating.cancel()
        worker.stop()
        store.records.forget_replica(app.state.replica.id)
        store.close()

    app = FastAPI(title="sinkstream", version="0.1.0", lifespan=lifespan)
    app.state.replica = Replica(config.replica_id or "")
    metrics.replica.labels(app.state.replica.id).set(1)
    leases = Leases(store, wait_s=config.session_wait_s, queue_size=config.session_queue)
    turns = Turns(worker, leases, metrics, tokenizer, cache_capacity=config.n_sink + config.window,
                  capacity=config.max_batch + config.max_queue)  # fmt: skip
    grammars = Grammars(tokenizer, model.config.get_text_config().vocab_size, worker.eos_ids)
    checks = RequestChecks(config, model.config, grammars)
    app.state.store, app.state.worker, app.state.metrics, app.state.config = store, worker, metrics, config
    resumer = Resumer(store, config.scope(model.config, tokenizer))
    app.state.chat = ChatServing(turns, checks, tokenizer, config.model_name, resumer)
    app.state.completion = CompletionServing(turns, checks, tokenizer, config.model_name)
    app.state.tokens = TokenServing(tokenizer, checks, cache_capacity=config.n_sink + config.window)
    objects = Objects(store.records)
    app.state.responses = ResponsesServing(app.state.chat, objects, config.model_name)
    app.state.conversations = ConversationsServing(objects, store)
    app.add_middleware(RequestLimits, max_body_bytes=config.max_body_bytes, metrics=metrics)
    app.add_middleware(ReplicaHeader, replica=app.state.replica)
    if config.cors_origins:  # outermost: errors (401, 413) carry the headers too, preflights need no key
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-sinkstream-replica", "retry-after"])  # fmt: skip
    install_error_handlers(app)
    openapi.install(app, max_tokens=config.max_completion_tokens, vocab=checks.vocab)
    app.include_router(open_routes)
    app.include_router(api)
    app.mount("/static", StaticFiles(directory=str(resources.files(__package__).joinpath("static"))), name="static")
    return app
