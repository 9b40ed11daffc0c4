"""Which server process answered: every response names it in ``x-sinkstream-replica``, and ``/health``
describes it. With several replicas behind one address (sharing a ``--store``), this is how a client,
a log line or a test tells them apart."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

HEADER = b"x-sinkstream-replica"


@dataclass
class Replica:
    id: str = ""
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    started: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or f"{self.host}:{self.pid}"


class ReplicaHeader:
    """ASGI middleware: adds ``x-sinkstream-replica: <id>`` to every HTTP response."""

    def __init__(self, app, *, replica: Replica):
        self.app, self.value = app, replica.id.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (HEADER, self.value)]}
            await send(message)

        await self.app(scope, receive, send_named)
