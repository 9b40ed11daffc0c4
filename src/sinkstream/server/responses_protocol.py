"""The Responses and Conversations APIs' request bodies (pydantic, so the OpenAPI document states them).

What the openai SDK and the OpenAI Agents SDK send is taken: ``input`` as text or items (messages with
text parts, ``function_call``, ``function_call_output``, ``item_reference``), ``instructions``,
``previous_response_id``, ``conversation``, ``store``, ``stream``, ``max_output_tokens``, the sampling
fields, flat function ``tools`` and ``tool_choice``, ``text.format``, ``metadata``. Fields that do not
change what this server does (``reasoning``, ``truncation``, ``include``, ``user``, ``service_tier``,
``prompt_cache_key``…) are accepted and ignored, unknown ones too, as OpenAI does.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..sampling import REPETITION_PENALTY, SEED_RANGE
from .protocol import FUNCTION_NAME, Bias, Int, Pin, _Body

MAX_ITEMS = 10_000


class ContentPart(_Body):
    """A text part (this server's models read text: images and files are refused)."""

    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(_Body):
    type: Literal["message"] | None = None
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    status: str | None = None


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    status: str | None = None


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str | None = None
    output: str | list[ContentPart]
    status: str | None = None


class ItemReference(_Body):
    type: Literal["item_reference"] | None = None
    id: str = Field(min_length=1)


InputItem = Annotated[
    FunctionCallItem | FunctionCallOutputItem | MessageItem | ItemReference, Field(union_mode="left_to_right")
]
ConversationItem = Annotated[FunctionCallItem | FunctionCallOutputItem | MessageItem, Field(union_mode="left_to_right")]


class FunctionTool(_Body):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    def as_chat_tool(self) -> dict:
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters, "strict": self.strict}
        return {"type": "function", "function": {k: v for k, v in fn.items() if v is not None}}


class NamedFunctionChoice(_Body):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)


class FormatText(_Body):
    type: Literal["text"]


class FormatJsonObject(_Body):
    type: Literal["json_object"]


class FormatJsonSchema(_Body):
    type: Literal["json_schema"]
    name: str = Field(pattern=FUNCTION_NAME)
    schema_: dict = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Body):
    format: Annotated[FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")] | None = None
    verbosity: str | None = None


class ConversationRef(_Body):
    id: str = Field(min_length=1)


class ResponseRequest(_Body):
    model: str | None = None
    input: str | Annotated[list[InputItem], Field(max_length=MAX_ITEMS)] = ""
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    store: bool | None = True
    stream: bool | None = False
    max_output_tokens: Int(ge=1) | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = None
    top_logprobs: Int(ge=0, le=20) | None = None
    # beyond OpenAI, as on the chat route
    seed: Int(ge=SEED_RANGE[0], le=SEED_RANGE[1]) | None = None
    top_k: Int(ge=-1) | None = None
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1])
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Bias] | None = None
    pin: Pin = None

    @model_validator(mode="after")
    def _check(self):
        if self.previous_response_id and self.conversation:
            raise ValueError("previous_response_id and conversation cannot be used together")
        if self.metadata is not None and len(self.metadata) > 16:
            raise ValueError("metadata holds at most 16 keys")
        if isinstance(self.tool_choice, NamedFunctionChoice) and self.tool_choice.name not in {
            t.name for t in self.tools or ()
        }:
            raise ValueError(f"tool_choice names '{self.tool_choice.name}', which is not among the tools")
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    @property
    def conversation_id(self) -> str | None:
        c = self.conversation
        return c.id if isinstance(c, ConversationRef) else c


class ConversationCreate(_Body):
    items: Annotated[list[ConversationItem], Field(max_length=MAX_ITEMS)] | None = None
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = None


class ConversationUpdate(_Body):
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None


class ItemsCreate(_Body):
    items: Annotated[list[ConversationItem], Field(min_length=1, max_length=MAX_ITEMS)]
