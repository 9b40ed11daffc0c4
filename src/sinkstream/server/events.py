"""What the worker tells a request, and how it reaches the request's event loop.

A job's events are, in order: any number of ``TokenEvent``s, then one ``DoneEvent`` (finish reason
``stop``, ``length`` or ``cancelled``) or one ``ErrorEvent``. A cancelled job's cache is unusable.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token. ``text`` may be empty (a special token, or part of a character); the worker's
    last text of a finished row comes with ``id`` -1. ``logprobs`` is ``None`` unless the job asked:
    ``(logprob, [(id, logprob), ...])`` for the token and the likeliest ones."""

    id: int
    text: str
    logprobs: tuple[float, list[tuple[int, float]]] | None = None


@dataclass(frozen=True)
class DoneEvent:
    reason: str  # stop | length | cancelled

    @property
    def finished(self) -> bool:
        return self.reason in ("stop", "length")


@dataclass(frozen=True)
class ErrorEvent:
    message: str


WorkerEvent = TokenEvent | DoneEvent | ErrorEvent


class AsyncEvents:
    """The worker's events for one request, delivered into the request's event loop; with ``tag``,
    each event arrives as ``(tag, event)`` (several jobs sharing one queue)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue | None = None, tag=None):
        self.loop, self.queue, self.tag = loop, queue or asyncio.Queue(), tag

    def put(self, event: WorkerEvent) -> None:  # called from the worker thread
        item = event if self.tag is None else (self.tag, event)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
