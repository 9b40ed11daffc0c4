"""The logic behind the OpenAI routes: one request's checks, its turns, its response or its stream.

``ChatServing`` serves ``/v1/chat/completions`` (a session's next turn, or a whole sessionless
conversation streamed through a fresh cache); ``CompletionServing`` serves ``/v1/completions`` (one
or more prompts, decoded together). Both share ``RequestChecks``: the one place where request
values are held against this server's limits and vocabulary.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

import torch
from fastapi import Request
from jinja2 import TemplateError

from ..cache import SinkCache
from ..grammar import Constraint, GrammarError, Grammars
from ..pinning import check_pin, choose, prefix_name, prefix_tokens
from ..sampling import SamplingParams
from ..tools import CallStream, call_schema, parse_calls
from . import protocol as P
from .errors import ApiError
from .events import AsyncEvents, DoneEvent, TokenEvent
from .resume import Resumer
from .store import Session
from .threads import off_loop
from .turns import Turn, Turns, TurnStream, raise_failed
from .worker import Job

DONE = "data: [DONE]\n\n"
log = logging.getLogger("sinkstream.server")


class RequestChecks:
    """Request values against this server's model, limits and vocabulary (400/404 otherwise)."""

    def __init__(self, config, model_config, grammars: Grammars):
        self.config, self.model_config, self.grammars = config, model_config, grammars
        self.vocab = model_config.get_text_config().vocab_size
        self.token_id = re.compile(P.decimal_below(self.vocab))
        self.kv_dtype = getattr(torch, config.kv_dtype) if config.kv_dtype else None

    def model(self, name: str | None) -> None:
        names = self.config.names
        if name and name not in names and not self.config.accept_any_model:
            served = " or ".join(f"'{n}'" for n in names)
            msg = (
                f"model '{name}' is not served here; this server serves {served} "
                "(a server started with --accept-any-model answers any name with its model)"
            )
            raise ApiError(404, msg, code="model_not_found", param="model")

    def session_header(self, request: Request) -> str | None:
        """The ``x-session-id`` header: the session of a request whose body names none (what a
        scaled-out server routes by)."""
        sid = request.headers.get("x-session-id")
        if sid is not None and not re.fullmatch(P.SESSION_ID, sid):
            msg = "x-session-id must be 1-128 letters, digits or _.:- characters"
            raise ApiError(400, msg, code="invalid_request", param="x-session-id")
        return sid

    def pin(self, req) -> str | int:
        """The request's pin (``pinning``), else the server's; a number must leave a window."""
        pin = req.pin if req.pin is not None else self.config.pin
        try:
            check_pin(pin, self.config.n_sink + self.config.window)
        except ValueError as e:
            raise ApiError(400, f"{e} (the server's cache)", code="invalid_value", param="pin") from None
        return pin

    def length(self, n: int) -> None:
        limit = self.config.max_request_tokens
        if n > limit:
            msg = (
                f"the request feeds {n} tokens; this server accepts at most {limit} per request (--max-request-tokens)"
            )
            raise ApiError(400, msg, code="request_too_long", param="messages")

    def logit_bias(self, req) -> dict[int, float] | None:
        if not req.logit_bias:
            return None
        bad = [k for k in req.logit_bias if not self.token_id.fullmatch(k)]
        if bad:
            msg = f"logit_bias keys are token ids of this vocabulary (0..{self.vocab - 1}), got {bad[0][:20]!r}"
            raise ApiError(400, msg, code="invalid_value", param="logit_bias")
        return {int(k): v for k, v in req.logit_bias.items()}

    def sampling(self, req) -> SamplingParams:
        limit = self.config.max_completion_tokens
        for name in ("max_tokens", "max_completion_tokens"):
            asked = getattr(req, name, None)
            if asked is not None and asked > limit:
                msg = f"{name} is {asked}; this server allows at most {limit} (--max-completion-tokens)"
                raise ApiError(400, msg, code="invalid_value", param=name)
        max_new = req.max_tokens if req.max_tokens is not None else self.config.default_max_tokens
        try:  # the schema admits only values SamplingParams takes; this is the second line of defence
            return SamplingParams(
                max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                stop=tuple(req.stop or ()), top_k=max(req.top_k, 0), min_p=req.min_p,
                repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
            )  # fmt: skip
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_value") from None

    def constraint(self, req, tool_schema: dict | None = None) -> Constraint | None:
        """The grammar the answer follows: a forced tool call's, else the ``response_format``'s."""
        fmt = req.response_format
        try:
            if tool_schema is not None:
                return self.grammars.json_schema(tool_schema)
            if isinstance(fmt, P.JsonSchemaFormat):
                return self.grammars.json_schema(fmt.json_schema.schema_)
            if isinstance(fmt, P.JsonObjectFormat):
                return self.grammars.json_object()
        except GrammarError as e:
            raise ApiError(
                400, str(e), code="invalid_schema", param="tools" if tool_schema else "response_format"
            ) from None
        return None

    def new_cache(self, pin: int | None = None) -> SinkCache:
        """An empty cache whose stream keeps its first ``pin`` tokens (default: the sinks)."""
        c = self.config
        return SinkCache(c.n_sink, c.window, config=self.model_config, kv_dtype=self.kv_dtype, pin=pin)


def sse(obj) -> str:
    body = obj.model_dump_json(exclude_none=True) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {body}\n\n"


def sse_failed(error: str) -> str:
    detail = P.ErrorDetail(message=f"generation failed: {error}", type="server_error", code="generation_failed")
    return sse(P.ErrorBody(error=detail))


def usage(*jobs: Job, cached: int = 0) -> P.Usage:
    """OpenAI's usage: ``prompt_tokens`` is the request's whole prompt, ``cached`` of them resumed from a
    kept state instead of fed."""
    prompt = sum(len(j.ids) for j in jobs) + cached
    completion = sum(len(j.row.generated) for j in jobs)
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached))  # fmt: skip


class ChatServing:
    def __init__(self, turns: Turns, checks: RequestChecks, tokenizer, model_name: str, resumer: Resumer):
        self.turns, self.checks, self.tokenizer, self.model_name = turns, checks, tokenizer, model_name
        self.resumer = resumer
        self.warned = False  # the log said once what ``auto`` could not pin

    def _pin(self, conv, ids: list[int], pin: str | int) -> int:
        """The sinks of a conversation that starts with ``ids``: its pinned prefix (``pinning.choose``)."""
        c = self.checks.config
        chosen = choose(prefix_tokens(self.tokenizer, conv, ids), c.n_sink, c.window, pin, prefix_name(conv.tools))
        if chosen.warning and not self.warned:
            log.warning("%s (said once)", chosen.warning)
            self.warned = True
        return chosen.tokens

    async def create(self, req: P.ChatCompletionRequest, request: Request):
        self.checks.model(req.model)
        header = self.checks.session_header(request)  # checked whenever sent, as the document says
        req.session_id = req.session_id or header
        turn = await self._start(req, self.checks.sampling(req))
        rid = P.new_id("chatcmpl")
        if req.stream:
            return TurnStream(
                self._stream(turn, req, rid, request),
                lambda: self.turns.end(turn),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        logprobs = [self._logprob_entry(e) async for e in self.turns.events(turn, request) if e.logprobs is not None]
        raise_failed(turn)
        content, calls = turn.job.row.text, []
        if req.tool_mode != "none":
            content, calls = parse_calls(content, _tool_names(req))
        choice = P.ChatChoice(
            message=P.AssistantMessage(content=content, tool_calls=[_tool_call(c) for c in calls] or None),
            finish_reason="tool_calls" if calls else turn.finish_reason,
            logprobs=P.ChoiceLogprobs(content=logprobs) if req.logprobs else None,
        )
        return P.ChatCompletion(
            id=rid,
            created=P.now(),
            model=self.model_name,
            choices=[choice],
            session=turn.info,
            usage=usage(turn.job, cached=turn.cached_tokens),
        )

    async def _start(self, req: P.ChatCompletionRequest, params: SamplingParams) -> Turn:
        """Lease the session (if any), render the new messages and hand the job to the worker. Any failure
        on the way hands the session back unchanged."""
        bias = self.checks.logit_bias(req)
        forced = req.tool_mode in ("required", "named")
        name = req.tool_choice.function.name if req.tool_mode == "named" else None
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tool_mode != "none" else None
        constraint = await off_loop(self.checks.constraint, req, call_schema(tools, name) if forced else None)
        msgs = [m.as_dict() for m in req.messages]
        session = await self.turns.lease(req.session_id) if req.session_id else None
        try:
            turn = await self._turn(req, params, bias, msgs, tools, session)
            turn.job.constraint = constraint
            self.turns.submit(turn)
            return turn
        except BaseException:
            if session:
                self.turns.store.rollback(session)
            raise

    async def _turn(self, req, params, bias, msgs: list[dict], tools, session: Session | None) -> Turn:
        """The turn's job: the state the request goes on from (``resume``: a kept turn it matches, its
        session, or nothing) and the request's messages after it, rendered and fed."""
        pin = self.checks.pin(req)
        start = await off_loop(self.resumer.plan, msgs, tools, session, pin)
        state = start.state
        conv = state.conversation
        conv.tools = tools
        cache, state.cache = state.cache, None  # the job owns it now (one copy in memory); the commit brings it back
        state.mark()
        before = len(conv.messages)
        try:
            ids = await off_loop(conv.begin, self.tokenizer, start.new)
        except (ValueError, TemplateError) as e:
            raise ApiError(400, f"cannot render the conversation: {e}", param="messages") from None
        state.digests += start.new_digests
        state.mark()
        if not ids:
            raise ApiError(400, "the messages add nothing to the conversation", param="messages")
        self.checks.length(len(ids))
        if cache is None:  # the conversation starts here: its beginning decides its pinned prefix
            cache = self.checks.new_cache(await off_loop(self._pin, conv, ids, pin))
        self.turns.metrics.resumed(start.mode, start.cached_tokens)
        events = AsyncEvents(asyncio.get_running_loop())
        job = Job(ids, params, cache, events=events, top_logprobs=req.want_logprobs, logit_bias=bias)
        return Turn(job, conv, session, before, state=state, mode=start.mode, cached_tokens=start.cached_tokens,
                    tool_names=_tool_names(req) if req.tool_mode != "none" else None)  # fmt: skip

    async def _stream(self, turn: Turn, req: P.ChatCompletionRequest, rid: str, request: Request):
        created = P.now()

        def chunk(delta: P.Delta, finish=None, logprobs=None, **kw):
            choice = P.ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)
            return sse(P.ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=[choice], **kw))

        calls = CallStream(_tool_names(req), stream_text=req.tool_mode == "auto") if req.tool_mode != "none" else None
        yield chunk(P.Delta(role="assistant", content=""))
        async for event in self.turns.events(turn, request):
            text = calls.add(event.text) if calls else event.text
            if text or event.logprobs is not None:
                lp = P.ChoiceLogprobs(content=[self._logprob_entry(event)]) if event.logprobs is not None else None
                yield chunk(P.Delta(content=text), logprobs=lp)
        if not turn.committed:
            if turn.error != "cancelled":
                yield sse_failed(turn.error)
                yield DONE
            return
        finish = turn.finish_reason
        if calls:
            rest, found = calls.finish()
            if rest:
                yield chunk(P.Delta(content=rest))
            if found:
                deltas = [
                    P.DeltaToolCall(index=i, id=c.id, type="function", function=_tool_call(c).function)
                    for i, c in enumerate(found)
                ]
                yield chunk(P.Delta(tool_calls=deltas))
                finish = "tool_calls"
        yield chunk(P.Delta(), finish=finish, session=turn.info)
        if req.include_usage:
            yield sse(
                P.ChatCompletionChunk(
                    id=rid,
                    created=created,
                    model=self.model_name,
                    choices=[],
                    usage=usage(turn.job, cached=turn.cached_tokens),
                )
            )
        yield DONE

    def _logprob_entry(self, event: TokenEvent) -> P.TokenLogprob:
        chosen, top = event.logprobs

        def one(i, v):
            text = self.tokenizer.decode([i], skip_special_tokens=False)
            return P.TopLogprob(token=text, logprob=v, bytes=list(text.encode("utf-8")))

        first = one(event.id, chosen)
        return P.TokenLogprob(
            token=first.token, logprob=chosen, bytes=first.bytes, top_logprobs=[one(i, v) for i, v in top]
        )


def _tool_names(req: P.ChatCompletionRequest) -> set[str]:
    return {t.function.name for t in req.tools or ()}


def _tool_call(call) -> P.ToolCall:
    return P.ToolCall(id=call.id, function=P.FunctionCall(name=call.name, arguments=call.arguments))


class CompletionServing:
    def __init__(self, turns: Turns, checks: RequestChecks, tokenizer, model_name: str):
        self.turns, self.checks, self.tokenizer, self.model_name = turns, checks, tokenizer, model_name

    async def create(self, req: P.CompletionRequest, request: Request):
        self.checks.model(req.model)
        params = self.checks.sampling(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        queue = asyncio.Queue()  # shared by the prompts' jobs, their events tagged with the prompt's index
        constraints = [await off_loop(self.checks.constraint, req) for _ in prompts]  # compiled once
        turns = self._turns(req, params, prompts, constraints, asyncio.get_running_loop(), queue)
        self.turns.submit_all(turns)
        rid = P.new_id("cmpl")
        if req.stream:
            return TurnStream(
                self._stream(turns, queue, req, prompts, rid, request),
                lambda: [self.turns.end(t) for t in turns],
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        async for _ in self.turns.multi_events(turns, queue, request):
            pass
        raise_failed(*turns)
        choices = [
            P.CompletionChoice(
                index=i, text=(prompts[i] if req.echo else "") + t.job.row.text, finish_reason=t.finish_reason
            )
            for i, t in enumerate(turns)
        ]
        return P.Completion(
            id=rid, created=P.now(), model=self.model_name, choices=choices, usage=usage(*(t.job for t in turns))
        )

    def _turns(self, req, params, prompts: list[str], constraints, loop, queue: asyncio.Queue) -> list[Turn]:
        bias, turns = self.checks.logit_bias(req), []
        for i, (prompt, constraint) in enumerate(zip(prompts, constraints)):
            # a prompt with no tokens (empty, or only characters the tokenizer drops) starts from BOS alone
            ids = (self.tokenizer(prompt).input_ids if prompt else []) or [self.tokenizer.bos_token_id or 0]
            self.checks.length(len(ids))
            events = AsyncEvents(loop, queue, tag=i)
            job = Job(ids, params, self.checks.new_cache(), events=events, logit_bias=bias, constraint=constraint)
            turns.append(Turn(job, None))
        return turns

    async def _stream(self, turns, queue, req: P.CompletionRequest, prompts, rid: str, request: Request):
        created = P.now()

        def chunk(i, text, finish=None):
            c = P.CompletionChoice(index=i, text=text, finish_reason=finish)
            return sse(P.Completion(id=rid, created=created, model=self.model_name, choices=[c]))

        if req.echo:
            for i, p in enumerate(prompts):
                yield chunk(i, p)
        async for i, event in self.turns.multi_events(turns, queue, request):
            if isinstance(event, DoneEvent):
                yield chunk(i, "", event.reason)
            elif event.text:
                yield chunk(i, event.text)
        failed = [t for t in turns if not t.committed and t.error != "cancelled"]
        if failed:
            yield sse_failed(failed[0].error)
        elif any(not t.committed for t in turns):
            return
        elif req.include_usage:
            total = usage(*(t.job for t in turns))
            yield sse(P.Completion(id=rid, created=created, model=self.model_name, choices=[], usage=total))
        yield DONE
