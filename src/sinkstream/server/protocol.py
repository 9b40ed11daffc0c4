"""The OpenAI-compatible wire format: request and response bodies as pydantic models.

Fields OpenAI clients send are taken (tools, ``response_format``, penalties, ``stream_options``);
``user`` and ``parallel_tool_calls`` are accepted and not used; unknown fields are ignored, as OpenAI
does; ``n`` must be 1. ``session_id`` is sinkstream's extra field: the name of an endless
conversation whose cache the server keeps (OpenAI clients pass it with ``extra_body``), as are
``repetition_penalty``, ``min_p`` and ``top_k`` (vLLM's and llama.cpp's names).

Every number is range-checked here, where it enters, and the schema states each range (the OpenAPI
document is generated from these models): no NaN or infinity anywhere, JSON integers only where an
integer is meant, seeds within what ``torch.Generator`` takes. Values that are valid but extreme keep
a defined meaning (``sampling``): a temperature below 1e-5 is greedy, a tiny ``top_p`` keeps the
likeliest token.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from ..sampling import REPETITION_PENALTY, SEED_RANGE

SESSION_ID = r"^[A-Za-z0-9_.:-]{1,128}$"
MAX_PROMPTS = 64  # prompts of one /v1/completions request


class _Body(BaseModel):
    """A request body: unknown fields are ignored (as OpenAI does), values are taken strictly (a
    ``true`` is not a number, ``"1"`` is not a temperature)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


def _json_integer(v):
    """JSON's integers, 1.0 included, but not ``true`` or ``"1"`` (pydantic's lax mode takes those)."""
    if isinstance(v, bool | str):
        raise ValueError("Input should be a valid integer")
    return v


def Int(**constraints):
    """An integer field type with ``constraints`` (``ge``, ``le``) that the schema states too."""
    return Annotated[int, Field(strict=False, **constraints), BeforeValidator(_json_integer)]


Stop = Annotated[str, Field(min_length=1)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result: the call it answers

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_dict(self) -> dict:
        """The message as the chat template and the conversation hold it (``developer`` is ``system``)."""
        m = {"role": "system" if self.role == "developer" else self.role, "content": self.text}
        if self.tool_calls:
            m["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id:
            m["tool_call_id"] = self.tool_call_id
        if self.name and self.role == "tool":
            m["name"] = self.name
        return m


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionDef(_Body):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = Field(default=None, description="the arguments' JSON schema")
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class TextFormat(_Body):
    type: Literal["text"]


class JsonObjectFormat(_Body):
    type: Literal["json_object"]


class JsonSchemaSpec(_Body):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(_Body):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


PIN_DOC = (
    "sinkstream's extra field: how much of the conversation's beginning (its system prompt and tools, as the "
    "template renders them before the first user message) its cache keeps for good, chosen when the conversation "
    "starts: auto (when it fits in a quarter of the cache), none (the attention sinks alone) or at most N tokens; "
    "default: the server's --pin. A conversation resumes only states made with the same choice."
)
Pin = Annotated[Literal["auto", "none"] | Int(ge=0) | None, Field(description=PIN_DOC)]


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: Int(ge=1) | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    seed: Int(ge=SEED_RANGE[0], le=SEED_RANGE[1]) | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Int(ge=1, le=1) = Field(default=1, description="one choice per request: send n requests for n answers")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # beyond OpenAI, as vLLM and llama.cpp's server take them
    repetition_penalty: float = Field(default=1.0, ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1])
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    top_k: Int(ge=-1) = Field(default=0, description="0 or -1: off")
    user: str | None = Field(default=None, max_length=256, description="the end user's id (accepted, not used)")
    response_format: ResponseFormat | None = None
    # token id (a canonical decimal below the vocabulary size, checked by the server) -> bias added to its logit
    logit_bias: dict[str, Bias] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        return [v] if isinstance(v, str) else list(v or [])

    @property
    def include_usage(self) -> bool:  # stream_options matter only when streaming, as OpenAI's
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Int(ge=1) | None = None
    session_id: str | None = Field(default=None, pattern=SESSION_ID)
    pin: Pin = None
    logprobs: bool = False
    top_logprobs: Int(ge=0, le=20) | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names '{name}', which is not among the tools")
        return self

    @property
    def tool_mode(self) -> str:
        """``none`` (no tools offered), ``auto``, ``required`` or ``named``."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @property
    def want_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    # an empty prompt starts from the beginning-of-sequence token alone
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: Int(ge=1) | None = 16
    echo: bool = False


class TokenizeRequest(_Body):
    """vLLM's ``/tokenize`` (``prompt`` or ``messages``) and llama.cpp's (``content``)."""

    model: str | None = None
    prompt: str | None = None
    content: str | None = Field(default=None, description="llama.cpp's name for prompt")
    messages: list[Message] | None = Field(
        default=None, min_length=1, description="a chat, rendered as a chat request would be"
    )
    tools: list[Tool] | None = Field(default=None, max_length=128)
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    add_special: bool | None = Field(default=None, description="llama.cpp's name for add_special_tokens")
    return_token_strs: bool = False
    with_pieces: bool = Field(default=False, description="llama.cpp's name for return_token_strs")

    @model_validator(mode="after")
    def _one_input(self):
        if sum(x is not None for x in (self.prompt, self.content, self.messages)) != 1:
            raise ValueError("give one of prompt, content or messages")
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int = Field(description="tokens one request may feed (the stream has no length limit)")
    cache_capacity: int
    token_strs: list[str] | None = None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[Int(ge=0)] = Field(max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    prompt: str
    content: str = Field(description="the same text, under llama.cpp's name")


def decimal_below(n: int) -> str:
    """A regular expression for the canonical decimals 0 .. n-1 (no sign, no leading zero): the
    ``logit_bias`` keys of a vocabulary of ``n`` tokens, in the OpenAPI schema and in validation."""
    top = str(n - 1)
    d = len(top)
    if d == 1:
        return f"^[0-{top}]$"
    alts = ["0", f"[1-9][0-9]{{0,{d - 2}}}"]  # fewer digits than n - 1
    for i, c in enumerate(top):  # as many digits: equal to n - 1 up to i, smaller at i
        lo = 1 if i == 0 else 0
        if int(c) > lo:
            rest = f"[0-9]{{{d - i - 1}}}" if d - i - 1 else ""
            alts.append(f"{top[:i]}[{lo}-{int(c) - 1}]{rest}")
    alts.append(top)
    return "^(" + "|".join(alts) + ")$"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(default=0, description="prompt tokens resumed from a kept state instead of fed")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class SessionInfo(BaseModel):
    id: str
    object: Literal["session"] = "session"
    tokens_seen: int
    tokens_cached: int
    tokens_pinned: int = Field(
        description="the first tokens of the conversation its cache keeps for good: its pinned prefix (system "
        "prompt and tools, as the template renders them), or the attention sinks alone"
    )
    turns: int
    cache_capacity: int
    mode: Literal["new", "resumed", "appended", "continued", "branched", "restarted"] | None = Field(
        default=None,
        description="how this request's turn started: a session's first turn (new, or resumed from a kept "
        "turn it matched), its next turn from new messages only (appended), a resent history that extends the "
        "transcript (continued), one that departs from it and went back to a kept turn (branched), or one "
        "nothing kept covers, streamed afresh (restarted)",
    )
    created: int | None = None
    updated: int | None = None
    in_memory: bool | None = None
    busy: bool | None = None


class ReplicaInfo(BaseModel):
    id: str
    object: Literal["replica"] = "replica"
    pid: int
    host: str
    started: int
    seen: int  # when it last said it was alive
    sessions_in_memory: int
    live_requests: int


class ReplicaList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ReplicaInfo]


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[str]


class TranscriptMessage(BaseModel):
    turn: int
    role: str
    content: str


class Transcript(BaseModel):
    object: Literal["list"] = "list"
    id: str
    data: list[TranscriptMessage]


class SessionDeleted(BaseModel):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    session: SessionInfo | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    session: SessionInfo | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sinkstream"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
