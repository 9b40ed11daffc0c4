"""The HTTP routes: each one reads its request and hands it to the app's serving objects.

``open_routes`` need no key (the health check and the static chat page); every route of ``api``
needs the server's API key when one is set.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from importlib import resources
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from . import protocol as P
from . import responses_protocol as RP
from .errors import ApiError, check_api_key, documented
from .openapi import SSE
from .replica import HEARTBEAT_S
from .store import SessionBusy, SessionNotFound
from .threads import off_loop


def authorize(request: Request) -> None:
    check_api_key(request, request.app.state.config.api_key)


open_routes = APIRouter()
api = APIRouter(dependencies=[Depends(authorize)], responses=documented(401, 413, 500))


@open_routes.get("/health")
async def health(request: Request):
    s = request.app.state
    return {"status": "ok", "model": s.config.model_name, "live_requests": s.worker.load,
            "sessions_in_memory": s.store.in_memory, "replica": asdict(s.replica)}  # fmt: skip


@open_routes.get("/", response_class=HTMLResponse)
async def page():  # static: no data; its API calls carry the key the user types in
    return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8"))


@api.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                                                "description": "Prometheus text format"}})  # fmt: skip
async def prometheus(request: Request):
    s = request.app.state
    s.metrics.sessions_memory.set(s.store.in_memory)
    return Response(s.metrics.render(), media_type=s.metrics.content_type)


@api.get("/v1/models", response_model=P.ModelList)
async def models(request: Request):
    return P.ModelList(data=[P.ModelCard(id=name, created=P.now()) for name in request.app.state.config.names])


@api.get("/v1/replicas", response_model=P.ReplicaList)
async def replicas(request: Request):
    """The server processes sharing this server's store that were alive in the last few seconds."""
    since = time.time() - 3 * HEARTBEAT_S
    rows = await off_loop(request.app.state.store.records.replicas, since)
    return P.ReplicaList(
        data=[P.ReplicaInfo(**{**r, "started": int(r["started"]), "seen": int(r["seen"])}) for r in rows]
    )


@api.get("/v1/sessions", response_model=P.SessionList)
async def sessions(request: Request):
    return P.SessionList(data=await off_loop(request.app.state.store.list))


@api.get("/v1/sessions/{sid}", response_model=P.SessionInfo, responses=documented(404))
async def session_info(sid: str, request: Request):
    return P.SessionInfo(**_known(request.app.state.store.info, sid))


@api.get("/v1/sessions/{sid}/messages", response_model=P.Transcript, responses=documented(404))
async def session_messages(sid: str, request: Request):
    return P.Transcript(id=sid, data=_known(request.app.state.store.transcript, sid))


@api.delete("/v1/sessions/{sid}", response_model=P.SessionDeleted, responses=documented(404, 409))
async def session_delete(sid: str, request: Request):
    s = request.app.state
    try:
        _known(s.store.delete, sid)
    except SessionBusy:
        msg = f"session '{sid}' is answering a request; delete it afterwards"
        raise ApiError(409, msg, code="session_busy") from None
    s.metrics.sessions.set(s.store.count())
    return P.SessionDeleted(id=sid)


SESSION_HEADER = {"name": "x-session-id", "in": "header", "required": False, "schema": {"type": "string",
                  "pattern": P.SESSION_ID}, "description": "the session, when the body names none"}  # fmt: skip


@api.post(
    "/v1/chat/completions",
    openapi_extra={"parameters": [SESSION_HEADER]},
    response_model=P.ChatCompletion,
    response_model_exclude_none=True,
    responses={200: {"content": SSE}, **documented(400, 404, 409, 503)},
)
async def chat_completions(req: P.ChatCompletionRequest, request: Request):
    return await request.app.state.chat.create(req, request)


@api.post(
    "/v1/completions",
    response_model=P.Completion,
    response_model_exclude_none=True,
    responses={200: {"content": SSE}, **documented(400, 404, 503)},
)
async def completions(req: P.CompletionRequest, request: Request):
    return await request.app.state.completion.create(req, request)


@api.post(
    "/tokenize", response_model=P.TokenizeResponse, response_model_exclude_none=True, responses=documented(400, 404)
)
async def tokenize(req: P.TokenizeRequest, request: Request):
    """Token ids of a text or of a chat as this server renders it (vLLM's and llama.cpp's route)."""
    return await off_loop(request.app.state.tokens.tokenize, req)


@api.post("/detokenize", response_model=P.DetokenizeResponse, responses=documented(400, 404))
async def detokenize(req: P.DetokenizeRequest, request: Request):
    return await off_loop(request.app.state.tokens.detokenize, req)


# -- the Responses API ------------------------------------------------------------------------------
@api.post("/v1/responses", responses={200: {"content": SSE, "description": "a Response object, or its event stream"},
                                      **documented(400, 404, 409, 429, 503)})  # fmt: skip
async def responses_create(req: RP.ResponseRequest, request: Request):
    return await request.app.state.responses.create(req, request)


@api.get("/v1/responses/{rid}", responses={200: {"content": SSE, "description": "the Response, or its events replayed"},
                                            **documented(400, 404)})  # fmt: skip
async def responses_get(rid: str, request: Request, stream: bool = False):
    serving = request.app.state.responses
    if stream:
        serving.retrieve(rid)  # 404 before the stream starts
        return StreamingResponse(serving.replay(rid), media_type="text/event-stream")
    return await off_loop(serving.retrieve, rid)


@api.delete("/v1/responses/{rid}", responses=documented(404))
async def responses_delete(rid: str, request: Request):
    s = request.app.state
    return await off_loop(s.responses.delete, rid, s.store)


@api.get("/v1/responses/{rid}/input_items", responses=documented(400, 404))
async def responses_input_items(rid: str, request: Request, after: str | None = None,
                                limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "desc"):  # fmt: skip
    return await off_loop(request.app.state.responses.input_items, rid, after, limit, order)


# -- the Conversations API --------------------------------------------------------------------------
@api.post("/v1/conversations", responses=documented(400))
async def conversations_create(body: RP.ConversationCreate, request: Request):
    return await off_loop(request.app.state.conversations.create, body)


@api.get("/v1/conversations/{cid}", responses=documented(404))
async def conversations_get(cid: str, request: Request):
    return await off_loop(request.app.state.conversations.retrieve, cid)


@api.post("/v1/conversations/{cid}", responses=documented(400, 404))
async def conversations_update(cid: str, body: RP.ConversationUpdate, request: Request):
    return await off_loop(request.app.state.conversations.update, cid, body)


@api.delete("/v1/conversations/{cid}", responses=documented(404, 409))
async def conversations_delete(cid: str, request: Request):
    return await off_loop(request.app.state.conversations.delete, cid)


@api.post("/v1/conversations/{cid}/items", responses=documented(400, 404))
async def conversation_items_create(cid: str, body: RP.ItemsCreate, request: Request):
    return await off_loop(request.app.state.conversations.add_items, cid, body)


@api.get("/v1/conversations/{cid}/items", responses=documented(400, 404))
async def conversation_items_list(cid: str, request: Request, after: str | None = None,
                                  limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "desc"):  # fmt: skip
    return await off_loop(request.app.state.conversations.list_items, cid, after, limit, order)


@api.get("/v1/conversations/{cid}/items/{item_id}", responses=documented(404))
async def conversation_item_get(cid: str, item_id: str, request: Request):
    return await off_loop(request.app.state.conversations.item, cid, item_id)


@api.delete("/v1/conversations/{cid}/items/{item_id}", responses=documented(404))
async def conversation_item_delete(cid: str, item_id: str, request: Request):
    return await off_loop(request.app.state.conversations.delete_item, cid, item_id)


def _known(fn, sid: str):
    try:
        return fn(sid)
    except SessionNotFound:
        raise ApiError(404, f"no session '{sid}'", code="session_not_found", param="session_id") from None
