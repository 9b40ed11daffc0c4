"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, for every way a
request can fail — our own checks, pydantic's validation, Starlette's HTTP errors and anything
unexpected (a 500 that names the exception's type, never a traceback)."""

from __future__ import annotations

import re
import secrets
from typing import ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P


class ApiError(Exception):
    """An OpenAI-style error response."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        405: "invalid_request_error",
        409: "conflict_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "server_error",
    }

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    def body(self) -> P.ErrorBody:
        kind = self.TYPES.get(self.status, "error")
        return P.ErrorBody(error=P.ErrorDetail(message=self.message, type=kind, code=self.code, param=self.param))

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=headers or self.headers)


WHY = {
    400: "invalid request: the body, a value, or a rule of this server (the message says which)",
    401: "missing or wrong API key (when the server has one)",
    404: "no such model, session or resource",
    409: "the session is answering another request",
    413: "request body larger than --max-body-bytes",
    429: "the server is at --max-batch + --max-queue requests in flight: retry after Retry-After seconds",
    500: "generation failed, or an internal error",
    503: "the request was cancelled before it finished (a sibling prompt failed, or the server is stopping)",
}


def documented(*statuses: int) -> dict:
    """The ``responses`` of a route that can answer these error statuses (OpenAI's error body)."""
    return {s: {"model": P.ErrorBody, "description": WHY[s]} for s in statuses}


def generation_failed(error: str) -> ApiError:
    """A turn that did not finish: 500 for a failure, 503 when it was cancelled (a sibling failed)."""
    return ApiError(500 if error != "cancelled" else 503, f"generation failed: {error}", code="generation_failed")


def check_api_key(request: Request, api_key: str | None) -> None:
    if not api_key:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    if not secrets.compare_digest(key.strip().encode(), api_key.encode()):
        raise ApiError(401, "invalid API key", code="invalid_api_key")


async def _api_error(request, exc: ApiError):
    return exc.response()


def _first_error(errors: list[dict]) -> dict:
    """The error to report: for a value of a union (``str | list[str]``), the branch the value was
    meant for (the one that did not fail on its type), not the first one tried."""
    meant = [e for e in errors if not e.get("type", "").endswith("_type")]
    return (meant or errors or [{}])[0]


def _where(loc) -> str:
    """``prompt.list[str]`` -> ``prompt``: the field's path without the union branch's name."""
    names = {"str", "int", "float", "bool", "dict", "list", "function-before", "function-after"}
    return ".".join(str(x) for x in loc if x != "body" and not (isinstance(x, str) and ("[" in x or x in names)))


# what to do instead, for fields whose limits are this server's choice
HINTS = {"n": "this server returns one choice per request: send n requests (with different seeds) for n answers"}


async def _invalid(request, exc: RequestValidationError):
    err = _first_error(exc.errors())
    msg = err.get("msg", "invalid request")
    if err.get("type") == "json_invalid":
        msg = "the body is not valid JSON (UTF-8)"
    where = _where(err.get("loc", ()))
    if where in HINTS:
        msg = f"{msg}; {HINTS[where]}"
    return ApiError(
        400, f"{where + ': ' if where else ''}{msg}", code="invalid_request", param=where or None
    ).response()


def allowed_methods(request: Request) -> str:
    """Every method the API document lists for this path (Starlette's 405 names only the first
    matching route's, and a path such as /v1/sessions/{sid} has several routes)."""
    path, found = request.url.path, set()
    for template, ops in request.app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), path):
            found |= {m.upper() for m in ops}
    return ", ".join(sorted(found))


async def _http(request, exc: StarletteHTTPException):
    if isinstance(exc.__cause__, UnicodeDecodeError):
        return ApiError(400, f"the body is not valid UTF-8: {exc.__cause__}", code="invalid_request").response()
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request)
    return ApiError(exc.status_code, str(exc.detail)).response(headers=headers)


async def _crash(request, exc: Exception):
    return ApiError(500, f"internal error: {type(exc).__name__}").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _crash)
