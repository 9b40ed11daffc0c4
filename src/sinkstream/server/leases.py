"""Which request may use a session now: one at a time, the others refused or queued.

A session answers one request at a time (its cache is one stream). By default a second request for
a busy session is refused at once (409 ``session_busy``), as a client that retries expects. With
``wait_s`` > 0 it queues instead: up to ``queue_size`` requests per session wait in order of arrival,
each for at most ``wait_s`` seconds (then 409 ``session_busy_timeout``); a request that finds the queue
full is refused (409 ``session_queue_full``). A request that arrives while others wait joins the end
of the queue, so the order holds. The head of the queue retries the lease every ``POLL_S``.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .errors import ApiError
from .store import Session, SessionBusy, SessionStore
from .threads import off_loop

POLL_S = 0.05


def _busy(sid: str, why: str, code: str = "session_busy") -> ApiError:
    return ApiError(409, f"session '{sid}' is answering another request; {why}", code=code, param="session_id")


class Leases:
    def __init__(self, store: SessionStore, wait_s: float = 0.0, queue_size: int = 8):
        self.store, self.wait_s, self.queue_size = store, wait_s, queue_size
        self.queues: dict[str, deque[object]] = {}  # the requests waiting for each session, in order

    async def acquire(self, sid: str) -> Session:
        """The session, leased to this request (409 if it stays busy)."""
        if not self.queues.get(sid):
            try:
                return await self._acquire(sid)
            except SessionBusy:
                if self.wait_s <= 0:
                    raise _busy(sid, "retry when it is done (or start the server with --session-wait)") from None
        return await self._wait(sid)

    async def _wait(self, sid: str) -> Session:
        queue = self.queues.setdefault(sid, deque())
        if len(queue) >= self.queue_size:
            raise _busy(sid, f"{len(queue)} requests already wait for it (--session-queue)", "session_queue_full")
        me, loop = object(), asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        queue.append(me)
        try:
            while True:
                if queue[0] is me:
                    try:
                        return await self._acquire(sid)
                    except SessionBusy:
                        pass
                if loop.time() >= deadline:
                    raise _busy(sid, f"waited {self.wait_s:g} s (--session-wait)", "session_busy_timeout")
                await asyncio.sleep(POLL_S)
        finally:
            queue.remove(me)
            if not queue:
                self.queues.pop(sid, None)

    async def _acquire(self, sid: str) -> Session:
        """``store.acquire`` in a thread; a request cancelled meanwhile hands the lease back when it comes."""
        lease = asyncio.ensure_future(off_loop(self.store.acquire, sid))
        try:
            return await asyncio.shield(lease)
        except asyncio.CancelledError:
            lease.add_done_callback(lambda f: f.cancelled() or f.exception() or self.store.rollback(f.result()))
            raise
