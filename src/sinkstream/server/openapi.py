"""The OpenAPI document, made to say what the server does.

FastAPI's generated document is close; what it cannot know is fixed here:

- validation errors are 400 in OpenAI's error shape, never FastAPI's 422 (each route lists its own
  error statuses, ``errors.documented``);
- the limits that depend on this server's configuration and model: ``max_tokens`` up to
  ``--max-completion-tokens``, ``logit_bias`` keys as token ids below the vocabulary size;
- integer bounds FastAPI would round to floats (the seed's);
- what a route streams (``text/event-stream``) or serves as text (Prometheus' format), and the
  ``x-sinkstream-replica`` header every response carries.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ..sampling import SEED_RANGE
from .protocol import decimal_below

SSE_EVENT = {  # OpenAPI 3.1: the schema of a text/event-stream describes each event
    "type": "object",
    "properties": {
        "data": {
            "type": "string",
            "description": "a JSON chunk (the route's chunk object, or an error body), or [DONE]",
        },
        "event": {"type": "string"},
    },
    "required": ["data"],
}
SSE = {"text/event-stream": {"schema": SSE_EVENT}}
REQUESTS = ("ChatCompletionRequest", "CompletionRequest", "ResponseRequest")
REPLICA_HEADER = {"description": "the server process that answered (--replica-id)", "schema": {"type": "string"}}


def _limit_fields(schemas: dict, max_tokens: int, vocab: int) -> None:
    for name in REQUESTS:
        props = schemas[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            for alt in props.get(field, {}).get("anyOf", []):
                if alt.get("type") == "integer":
                    alt["maximum"] = max_tokens
        for alt in props["seed"]["anyOf"]:  # exact: FastAPI writes bounds as floats, and 2**64 - 1 is not one
            if alt.get("type") == "integer":
                alt["minimum"], alt["maximum"] = SEED_RANGE
        for alt in props["logit_bias"]["anyOf"]:
            if alt.get("type") == "object":
                alt["propertyNames"] = {"pattern": decimal_below(vocab)}
    schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] = vocab - 1


def install(app: FastAPI, *, max_tokens: int, vocab: int) -> None:
    """Serve the corrected document at ``/openapi.json``."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for ops in doc["paths"].values():
                for op in ops.values():
                    op["responses"].pop("422", None)
                    for response in op["responses"].values():
                        response.setdefault("headers", {})["x-sinkstream-replica"] = REPLICA_HEADER
            schemas = doc["components"]["schemas"]
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            _limit_fields(schemas, max_tokens, vocab)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
