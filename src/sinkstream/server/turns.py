"""A request's life with the worker: submit its job, follow its events, commit or roll back.

Every path a turn can take — finished, failed in the worker, failed to commit, client gone,
cancelled before its body was read — ends in ``Turns.end`` exactly once, which hands the session
back (kept if the turn was committed, else rolled back to its last committed turn) and counts it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..chat import Conversation
from ..tools import parse_calls
from . import history
from . import protocol as P
from .errors import ApiError, generation_failed
from .events import DoneEvent, ErrorEvent, TokenEvent
from .leases import Leases
from .store import Session
from .threads import off_loop
from .worker import Job, Worker


@dataclass
class Turn:
    """One generation request in flight."""

    job: Job
    conversation: Conversation | None  # chat requests
    session: Session | None = None  # the leased session (``state`` is it)
    messages_before: int = 0
    state: Session | None = None  # chat requests: the conversation it goes on (a session's, or anonymous)
    mode: str | None = None  # how it started (``resume.Start.mode``)
    cached_tokens: int = 0  # prompt tokens resumed instead of fed
    tool_names: set[str] | None = None  # tools offered: the answer is read for calls
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


async def queue_items(queue: asyncio.Queue, request: Request):
    """Items from ``queue`` as they come; ends when the client has gone (checked every second)."""
    while True:
        try:
            yield await asyncio.wait_for(queue.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return


class Turns:
    """Submits turns to the worker and sees each one to its end. At most ``capacity`` turns are in
    flight (decoding or waiting for a place in the batch); beyond that a request is refused with 429
    and ``Retry-After`` rather than queued without bound."""

    def __init__(self, worker: Worker, leases: Leases, metrics, tokenizer, cache_capacity: int, capacity: int):
        self.worker, self.leases, self.store = worker, leases, leases.store
        self.metrics, self.tokenizer, self.cache_capacity = metrics, tokenizer, cache_capacity
        self.capacity, self.live = capacity, 0

    def admit(self, n: int = 1) -> None:
        """Refuse (429) ``n`` more turns that would pass the capacity."""
        if self.live + n > self.capacity:
            msg = f"the server is busy: {self.live} requests are in flight or waiting (--max-batch + --max-queue); retry shortly"
            raise ApiError(429, msg, code="server_busy", headers={"Retry-After": "1"})

    def submit(self, turn: Turn) -> None:
        self.admit()
        self.worker.submit(turn.job)
        self.live += 1
        self.metrics.active.inc()  # end() decrements both

    def submit_all(self, turns: list[Turn]) -> None:
        """Submit every turn, or none: a failure ends the ones already submitted (cancelling their jobs)."""
        self.admit(len(turns))
        submitted = []
        try:
            for t in turns:
                self.submit(t)
                submitted.append(t)
        except BaseException:
            for t in submitted:
                self.end(t)
            raise

    async def lease(self, sid: str) -> Session:
        return await self.leases.acquire(sid)

    async def events(self, turn: Turn, request: Request):
        """The job's token events as they come; on ``done`` the turn is committed (or rolled back)
        first. Leaving early (client gone) cancels the job and rolls the session back; a commit under
        way finishes first."""
        try:
            async for event in queue_items(turn.job.events.queue, request):
                if isinstance(event, TokenEvent):
                    yield event
                    continue
                if isinstance(event, DoneEvent) and event.finished:
                    turn.finish_reason = event.reason
                    turn.commit_task = asyncio.ensure_future(self._commit(turn))
                    await asyncio.shield(turn.commit_task)
                else:
                    turn.error = event.message if isinstance(event, ErrorEvent) else "cancelled"
                return
        finally:
            self.end(turn)

    async def multi_events(self, turns: list[Turn], queue: asyncio.Queue, request: Request):
        """Events of several sessionless jobs sharing one queue, as (index, event); ends when all are
        done, or when one fails (the request fails as a whole: the others are cancelled)."""
        live = set(range(len(turns)))
        try:
            async for i, event in queue_items(queue, request):
                if isinstance(event, TokenEvent):
                    yield i, event
                    continue
                t = turns[i]
                if isinstance(event, DoneEvent) and event.finished:
                    t.finish_reason, t.committed = event.reason, True
                    yield i, event
                else:
                    t.error = event.message if isinstance(event, ErrorEvent) else "cancelled"
                    return
                live.discard(i)
                if not live:
                    return
        finally:
            for t in turns:
                self.end(t)

    async def _commit(self, turn: Turn) -> None:
        """Record the answer and persist the session's turn; a failure leaves the turn uncommitted."""
        job, row = turn.job, turn.job.row
        try:
            turn.conversation.finish(
                self.tokenizer, row.generated, last_unfed=row.last_unfed, cut_text=row.text if row.stop_hit else None
            )
            if turn.state is not None:
                self._chain_answer(turn)
                await off_loop(self.store.commit, turn.state, job.cache, turn.messages_before)
        except Exception as e:
            turn.error = f"could not save the turn: {type(e).__name__}: {e}"
            return
        if turn.session is not None:
            self.metrics.sessions.set(self.store.count())
            turn.info = P.SessionInfo(
                id=turn.session.id,
                tokens_seen=job.cache.tokens_seen,
                tokens_cached=job.cache.tokens_cached,
                tokens_pinned=job.cache.pins[0],
                turns=turn.session.turns,
                cache_capacity=self.cache_capacity,
                mode=turn.mode,
            )
        turn.committed = True

    @staticmethod
    def _chain_answer(turn: Turn) -> None:
        """Extend the conversation's digests with the answer as the client gets it back (its text, or its
        calls): how the client's next request will name it. A chain that does not cover every message
        (a session from before digests) is dropped: such a turn is kept for its session only."""
        state, text = turn.state, turn.job.row.text
        content, calls = parse_calls(text, turn.tool_names) if turn.tool_names else (text, [])
        answer = state.conversation.messages[-1]
        if not calls and (content or "") != answer["content"]:
            answer["shown"] = content or ""  # the transcript shows what the client got (special tokens left out)
        if not state.digests or len(state.digests) != len(state.conversation.messages) - 1:
            state.digests = []
            return
        prev = state.digests[-1]
        state.digests += history.extend(prev, [history.returned_answer(content, calls)])

    def end(self, turn: Turn) -> None:
        """Hand the turn's session back (kept if committed, else rolled back) and count the turn: once."""
        if turn.ended:
            return
        if turn.commit_task is not None and not turn.commit_task.done():
            turn.commit_task.add_done_callback(lambda _: self.end(turn))  # the commit decides
            return
        turn.ended = True
        if not turn.committed and turn.error is None:
            turn.error = "cancelled"
        if not turn.committed:  # committed implies the job finished
            turn.job.cancel.set()
        if turn.session is not None:
            (self.store.keep if turn.committed else self.store.rollback)(turn.session)
            turn.session = None  # no longer ours
        self.live -= 1
        self.metrics.active.dec()
        outcome = "ok" if turn.committed else ("error" if turn.error != "cancelled" else "cancelled")
        self.metrics.turns.labels(outcome).inc()


def raise_failed(*turns: Turn) -> None:
    """The error response of the first turn that failed (a real failure before a cancelled sibling)."""
    failed = [t for t in turns if not t.committed]
    if failed:
        raise generation_failed(next((t for t in failed if t.error != "cancelled"), failed[0]).error)
