"""The FastAPI app: OpenAI's chat/completions protocol on one model, with endless sessions.

    app = create_app(model, tokenizer, ServerConfig(model_name="smollm2-135m"))

Requests become ``Job``s for the model's one ``Worker`` thread (continuous batching); their events come
back to the request's coroutine through an asyncio queue. A request naming a ``session_id`` leases
that session from the ``SessionStore`` (409 while another request has it), feeds only its new message,
and commits the finished turn (snapshot + transcript) before the last event is sent.
"""

from __future__ import annotations

import asyncio
import json

import torch
import secrets
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from jinja2 import TemplateError
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..cache import SinkCache
from ..chat import Conversation
from ..engine import SamplingParams
from . import protocol as P
from .limits import RequestLimits
from .metrics import Metrics
from .store import Session, SessionBusy, SessionNotFound, SessionStore
from .worker import Job, Worker


@dataclass
class ServerConfig:
    model_name: str
    n_sink: int = 4
    window: int = 1020
    state_dir: str | Path = "sinkstream-state"
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

    def check(self) -> None:
        for name in ("max_request_tokens", "max_completion_tokens", "default_max_tokens", "max_body_bytes",
                     "max_batch", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n_sink < 0 or self.max_sessions < 0:
            raise ValueError("sink and max-sessions must be >= 0")


class ApiError(Exception):
    """An OpenAI-style error response."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             409: "conflict_error", 413: "invalid_request_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        body = P.ErrorBody(error=P.ErrorDetail(message=self.message, type=self.TYPES.get(self.status, "error"),
                                               code=self.code, param=self.param))
        return JSONResponse(body.model_dump(), status_code=self.status)


class AsyncEvents:
    """The worker's events for one request, delivered into the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue | None = None, tag=None):
        self.loop, self.queue, self.tag = loop, queue or asyncio.Queue(), tag

    def put(self, event: tuple) -> None:  # called from the worker thread
        item = event if self.tag is None else (self.tag, event)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


@dataclass
class Turn:
    """One generation request in flight."""

    job: Job
    conversation: Conversation | None  # chat requests
    session: Session | None = None
    messages_before: int = 0
    finish_reason: str | None = None
    error: str | None = None
    committed: bool = False
    info: P.SessionInfo | None = None  # the session after this turn's commit
    ended: bool = False  # the session is handed back and the metrics counted (exactly once)
    commit_task: asyncio.Future | None = None


class TurnStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends: finished, client gone, or cancelled
    before its body was ever iterated (then the body generator's own ``finally`` never runs)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def create_app(model, tokenizer, config: ServerConfig) -> FastAPI:
    config.check()
    metrics = Metrics()
    store = SessionStore(config.state_dir, model_config=model.config, n_sink=config.n_sink, window=config.window,
                         max_sessions=config.max_sessions, device=next(model.parameters()).device)
    chunk = min(config.prefill_chunk or max(1, config.window // 2), config.window)
    worker = Worker(model, tokenizer, prefill_chunk=chunk, max_batch=config.max_batch, metrics=metrics,
                    decode=config.decode)

    async def lifespan(app):
        worker.start()
        metrics.sessions.set(store.count())
        yield
        worker.stop()
        store.close()

    app = FastAPI(title="sinkstream", version="0.1.0", lifespan=lifespan)
    app.state.store, app.state.worker, app.state.metrics, app.state.config = store, worker, metrics, config
    app.add_middleware(RequestLimits, max_body_bytes=config.max_body_bytes, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            msg = "the body is not valid JSON (UTF-8)"
        return ApiError(400, f"{'.'.join(loc) + ': ' if loc else ''}{msg}", code="invalid_request",
                        param=".".join(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, UnicodeDecodeError):
            return ApiError(400, f"the body is not valid UTF-8: {exc.__cause__}", code="invalid_request").response()
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        return ApiError(500, f"internal error: {type(exc).__name__}").response()

    def authorize(request: Request) -> None:
        if not config.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        if not secrets.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    open_routes = APIRouter()
    api = APIRouter(dependencies=[Depends(authorize)])

    # -- open routes --------------------------------------------------------------------------------
    @open_routes.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "live_requests": worker.load,
                "sessions_in_memory": store.in_memory}

    @open_routes.get("/", response_class=HTMLResponse)
    async def page():  # static: no data; its API calls carry the key the user types in
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8"))

    # -- API ----------------------------------------------------------------------------------------
    @api.get("/metrics")
    async def prometheus():
        metrics.sessions_memory.set(store.in_memory)
        return Response(metrics.render(), media_type=metrics.content_type)

    @api.get("/v1/models", response_model=P.ModelList)
    async def models():
        return P.ModelList(data=[P.ModelCard(id=config.model_name, created=P.now())])

    @api.get("/v1/sessions", response_model=P.SessionList)
    async def sessions():
        return P.SessionList(data=await run_in_threadpool(store.list))

    @api.get("/v1/sessions/{sid}", response_model=P.SessionInfo)
    async def session_info(sid: str):
        return P.SessionInfo(**_known(store.info, sid))

    @api.get("/v1/sessions/{sid}/messages", response_model=P.Transcript)
    async def session_messages(sid: str):
        return P.Transcript(id=sid, data=_known(store.transcript, sid))

    @api.delete("/v1/sessions/{sid}", response_model=P.SessionDeleted)
    async def session_delete(sid: str):
        try:
            _known(store.delete, sid)
        except SessionBusy:
            raise ApiError(409, f"session '{sid}' is answering a request; delete it afterwards",
                           code="session_busy") from None
        metrics.sessions.set(store.count())
        return P.SessionDeleted(id=sid)

    @api.post("/v1/chat/completions", response_model_exclude_none=True)
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        _check_model(req.model)
        params = _params(req)
        turn = await _start_chat(req, params)
        rid = P.new_id("chatcmpl")
        if req.stream:
            return TurnStream(_chat_stream(turn, req, rid, request), lambda: _end(turn), media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        tokens, logprobs = [], []
        async for kind, *rest in _events(turn, request):
            if kind == "token" and rest[2] is not None:
                logprobs.append(_logprob_entry(rest[0], rest[2]))
        _raise_failed(turn)
        choice = P.ChatChoice(message=P.AssistantMessage(content=turn.job.text), finish_reason=turn.finish_reason,
                              logprobs=P.ChoiceLogprobs(content=logprobs) if req.logprobs else None)
        return P.ChatCompletion(id=rid, created=P.now(), model=config.model_name, choices=[choice],
                                usage=_usage(turn.job), session=turn.info)

    @api.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request):
        _check_model(req.model)
        params = _params(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        bias, turns = _bias(req), []
        for i, prompt in enumerate(prompts):
            ids = tokenizer(prompt).input_ids if prompt else [tokenizer.bos_token_id or 0]
            _check_length(len(ids))
            job = Job(ids, params, new_cache(),
                      events=AsyncEvents(loop, queue, tag=i), logit_bias=bias)
            turns.append(Turn(job, None))
        submitted = []
        try:
            for t in turns:
                _submit(t.job)
                submitted.append(t)
        except BaseException:
            for t in submitted:
                _end(t)  # cancels the jobs already in the worker
            raise
        rid = P.new_id("cmpl")
        if req.stream:
            return TurnStream(_completion_stream(turns, queue, req, prompts, rid, request),
                              lambda: [_end(t) for t in turns], media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache"})
        async for _ in _multi_events(turns, queue, request):
            pass
        _raise_failed(*turns)
        choices = [P.CompletionChoice(index=i, text=(prompts[i] if req.echo else "") + t.job.text,
                                      finish_reason=t.finish_reason) for i, t in enumerate(turns)]
        return P.Completion(id=rid, created=P.now(), model=config.model_name, choices=choices,
                            usage=_sum_usage(turns))

    app.include_router(open_routes)
    app.include_router(api)

    # -- helpers ------------------------------------------------------------------------------------
    def _known(fn, sid):
        try:
            return fn(sid)
        except SessionNotFound:
            raise ApiError(404, f"no session '{sid}'", code="session_not_found", param="session_id") from None

    def _check_model(name: str | None) -> None:
        if name and name != config.model_name:
            raise ApiError(404, f"model '{name}' is not served here; this server serves '{config.model_name}'",
                           code="model_not_found", param="model")

    def _check_length(n: int) -> None:
        if n > config.max_request_tokens:
            raise ApiError(400, f"the request feeds {n} tokens; this server accepts at most {config.max_request_tokens} "
                                "per request (--max-request-tokens)", code="request_too_long", param="messages")

    vocab = model.config.get_text_config().vocab_size

    def _bias(req) -> dict[int, float] | None:
        if not req.logit_bias:
            return None
        bias = {int(k): v for k, v in req.logit_bias.items()}
        bad = [i for i in bias if i >= vocab]
        if bad:
            raise ApiError(400, f"logit_bias names token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}",
                           code="invalid_value", param="logit_bias")
        return bias

    def _params(req) -> SamplingParams:
        max_new = req.max_tokens if req.max_tokens is not None else config.default_max_tokens
        if max_new > config.max_completion_tokens:
            raise ApiError(400, f"max_tokens is {max_new}; this server allows at most {config.max_completion_tokens} "
                                "(--max-completion-tokens)", code="invalid_value", param="max_tokens")
        try:  # the schema admits only values SamplingParams takes; this is the second line of defence
            return SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                  stop=tuple(req.stop or ()))
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_value") from None

    kv_dtype = getattr(torch, config.kv_dtype) if config.kv_dtype else None

    def new_cache() -> SinkCache:
        return SinkCache(config.n_sink, config.window, config=model.config, kv_dtype=kv_dtype)

    def _submit(job: Job) -> None:
        worker.submit(job)
        metrics.active.inc()  # _end decrements it

    async def _start_chat(req: P.ChatCompletionRequest, params: SamplingParams) -> Turn:
        """Lease the session (if any), render the new message and hand the job to the worker. Any failure
        on the way hands the session back unchanged."""
        bias = _bias(req)
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
        session = await _lease(req.session_id) if req.session_id else None
        try:
            turn = await _chat_turn(req, params, bias, msgs, session)
            _submit(turn.job)
            return turn
        except BaseException:
            if session:
                store.rollback(session)
            raise

    async def _lease(sid: str) -> Session:
        """``store.acquire`` in a thread; a request cancelled meanwhile hands the lease back when it comes."""
        lease = asyncio.ensure_future(run_in_threadpool(store.acquire, sid))
        try:
            return await asyncio.shield(lease)
        except SessionBusy:
            raise ApiError(409, f"session '{sid}' is answering another request; retry when it is done",
                           code="session_busy", param="session_id") from None
        except asyncio.CancelledError:
            lease.add_done_callback(lambda f: f.cancelled() or f.exception() or store.rollback(f.result()))
            raise

    async def _chat_turn(req, params, bias, msgs, session: Session | None) -> Turn:
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        if session:
            conv = session.conversation
            if session.new:  # the first request's messages are the conversation so far
                conv.system, conv.messages = system, msgs[:-1]
            cache = session.cache or new_cache()
            session.cache = None  # the job owns it now (one copy in memory); the commit brings the new one
            session.mark()
        else:
            conv = Conversation(system=system, messages=msgs[:-1])
            cache = new_cache()
        before = len(conv.messages)
        try:
            ids = await run_in_threadpool(conv.begin, tokenizer, msgs[-1]["content"])
        except (ValueError, TemplateError) as e:
            raise ApiError(400, f"cannot render the conversation: {e}", param="messages") from None
        if session:
            session.mark()
        _check_length(len(ids))
        job = Job(ids, params, cache, events=AsyncEvents(asyncio.get_running_loop()),
                  top_logprobs=req.want_logprobs, logit_bias=bias)
        return Turn(job, conv, session, before)

    async def _events(turn: Turn, request: Request):
        """The job's events as they come; on ``done`` the turn is committed (or rolled back) first.
        Leaving early (client gone) cancels the job and rolls the session back; a commit under way
        finishes first."""
        try:
            async for event in _queue_items(turn.job.events.queue, request):
                if event[0] == "token":
                    yield event
                    continue
                if event[0] == "done" and event[1] in ("stop", "length"):
                    turn.finish_reason = event[1]
                    turn.commit_task = asyncio.ensure_future(_commit(turn))
                    await asyncio.shield(turn.commit_task)
                else:
                    turn.error = event[1] if event[0] == "error" else "cancelled"
                return
        finally:
            _end(turn)

    async def _queue_items(queue: asyncio.Queue, request: Request):
        """Items from ``queue`` as they come; ends when the client has gone (checked every second)."""
        while True:
            try:
                yield await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return

    async def _commit(turn: Turn) -> None:
        """Record the answer and persist the session's turn; a failure leaves the turn uncommitted."""
        job = turn.job
        try:
            turn.conversation.finish(tokenizer, job.generated, last_unfed=job.last_unfed,
                                     cut_text=job.text if job.stop_hit else None)
            if turn.session is not None:
                await run_in_threadpool(store.commit, turn.session, job.cache, turn.messages_before)
        except Exception as e:  # noqa: BLE001 - e.g. a full disk: this turn fails, the session stays as it was
            turn.error = f"could not save the turn: {type(e).__name__}: {e}"
            return
        if turn.session is not None:
            metrics.sessions.set(store.count())
            turn.info = P.SessionInfo(id=turn.session.id, tokens_seen=job.cache.tokens_seen,
                                      tokens_cached=job.cache.tokens_cached, turns=turn.session.turns,
                                      cache_capacity=config.n_sink + config.window)
        turn.committed = True

    def _end(turn: Turn) -> None:
        """Hand the turn's session back (kept if committed, else rolled back) and count the turn: once."""
        if turn.ended:
            return
        if turn.commit_task is not None and not turn.commit_task.done():
            turn.commit_task.add_done_callback(lambda _: _end(turn))  # the commit decides
            return
        turn.ended = True
        if not turn.committed and turn.error is None:
            turn.error = "cancelled"
        if not turn.committed:  # committed implies the job finished
            turn.job.cancel.set()
        if turn.session is not None:
            (store.keep if turn.committed else store.rollback)(turn.session)
            turn.session = None  # no longer ours
        metrics.active.dec()
        metrics.turns.labels("ok" if turn.committed else ("error" if turn.error != "cancelled" else "cancelled")).inc()

    def _raise_failed(*turns: Turn) -> None:
        """The error response of the first turn that failed (a real failure before a cancelled sibling)."""
        failed = [t for t in turns if not t.committed]
        if failed:
            turn = next((t for t in failed if t.error != "cancelled"), failed[0])
            raise ApiError(500 if turn.error != "cancelled" else 503, f"generation failed: {turn.error}",
                           code="generation_failed")

    def _usage(job: Job) -> P.Usage:
        return P.Usage(prompt_tokens=len(job.ids), completion_tokens=len(job.generated),
                       total_tokens=len(job.ids) + len(job.generated))

    def _sum_usage(turns: list[Turn]) -> P.Usage:
        p = sum(len(t.job.ids) for t in turns)
        c = sum(len(t.job.generated) for t in turns)
        return P.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    def _token_text(tid: int) -> str:
        return tokenizer.decode([tid], skip_special_tokens=False)

    def _logprob_entry(tid: int, lp) -> P.TokenLogprob:
        chosen, top = lp

        def one(i, v):
            text = _token_text(i)
            return P.TopLogprob(token=text, logprob=v, bytes=list(text.encode("utf-8")))

        first = one(tid, chosen)
        return P.TokenLogprob(token=first.token, logprob=chosen, bytes=first.bytes, top_logprobs=[one(i, v) for i, v in top])

    def _sse(obj) -> str:
        body = obj.model_dump_json(exclude_none=True) if hasattr(obj, "model_dump_json") else json.dumps(obj)
        return f"data: {body}\n\n"

    def _sse_failed(error: str) -> str:
        return _sse(P.ErrorBody(error=P.ErrorDetail(message=f"generation failed: {error}", type="server_error",
                                                    code="generation_failed")))

    async def _chat_stream(turn: Turn, req: P.ChatCompletionRequest, rid: str, request: Request):
        created = P.now()

        def chunk(delta: P.Delta, finish=None, logprobs=None, **kw):
            choice = P.ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)
            return _sse(P.ChatCompletionChunk(id=rid, created=created, model=config.model_name, choices=[choice], **kw))

        yield chunk(P.Delta(role="assistant", content=""))
        async for kind, tid, text, lp in _events(turn, request):
            if text or lp is not None:
                logprobs = P.ChoiceLogprobs(content=[_logprob_entry(tid, lp)]) if lp is not None else None
                yield chunk(P.Delta(content=text), logprobs=logprobs)
        if not turn.committed:
            if turn.error != "cancelled":
                yield _sse_failed(turn.error)
                yield "data: [DONE]\n\n"
            return
        yield chunk(P.Delta(), finish=turn.finish_reason, session=turn.info)
        if req.include_usage:
            yield _sse(P.ChatCompletionChunk(id=rid, created=created, model=config.model_name, choices=[],
                                             usage=_usage(turn.job)))
        yield "data: [DONE]\n\n"

    async def _multi_events(turns: list[Turn], queue: asyncio.Queue, request: Request):
        """Events of several jobs sharing one queue, as (index, event); ends when all are done, or when one
        fails (the request fails as a whole: the others are cancelled)."""
        live = set(range(len(turns)))
        try:
            async for i, event in _queue_items(queue, request):
                if event[0] == "token":
                    yield i, event
                    continue
                t = turns[i]
                if event[0] == "done" and event[1] in ("stop", "length"):
                    t.finish_reason, t.committed = event[1], True
                    yield i, event
                else:
                    t.error = event[1] if event[0] == "error" else "cancelled"
                    return
                live.discard(i)
                if not live:
                    return
        finally:
            for t in turns:
                _end(t)

    async def _completion_stream(turns, queue, req: P.CompletionRequest, prompts, rid: str, request: Request):
        created = P.now()

        def chunk(i, text, finish=None):
            c = P.CompletionChoice(index=i, text=text, finish_reason=finish)
            return _sse(P.Completion(id=rid, created=created, model=config.model_name, choices=[c]))

        if req.echo:
            for i, p in enumerate(prompts):
                yield chunk(i, p)
        async for i, event in _multi_events(turns, queue, request):
            if event[0] == "done":
                yield chunk(i, "", event[1])
            elif event[2]:
                yield chunk(i, event[2])
        failed = [t for t in turns if not t.committed and t.error != "cancelled"]
        if failed:
            yield _sse_failed(failed[0].error)
        elif any(not t.committed for t in turns):
            return
        elif req.include_usage:
            yield _sse(P.Completion(id=rid, created=created, model=config.model_name, choices=[],
                                    usage=_sum_usage(turns)))
        yield "data: [DONE]\n\n"

    return app
