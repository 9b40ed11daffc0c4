"""ASGI middleware: the request body limit (413, checked on the declared length and on the bytes as they
arrive, so a chunked upload cannot pass it) and the per-route request counter."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException


class BodyTooLarge(HTTPException):
    """Raised while the body is read (FastAPI turns the route's read error into this response)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes (--max-body-bytes)")


class RequestLimits:
    def __init__(self, app, *, max_body_bytes: int, metrics=None):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500, "started": False}

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
                raise BodyTooLarge(self.max_body_bytes)
            received = 0

            async def receive_limited():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise BodyTooLarge(self.max_body_bytes)
                return message

            await self.app(scope, receive_limited, send_tracked)
        except BodyTooLarge:
            if status["started"]:
                raise
            await _too_large(send_tracked, self.max_body_bytes)
        finally:
            if self.metrics is not None:
                route = scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                self.metrics.requests.labels(path, str(status["code"])).inc()


async def _too_large(send, limit: int) -> None:
    body = json.dumps(
        {
            "error": {
                "message": f"request body larger than {limit} bytes (--max-body-bytes)",
                "type": "invalid_request_error",
                "param": None,
                "code": "request_too_large",
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
