"""``/tokenize`` and ``/detokenize``: the server's tokenizer and chat rendering, as vLLM and llama.cpp
serve them (a client counts tokens, or checks what a chat becomes, before it sends it)."""

from __future__ import annotations

from jinja2 import TemplateError

from ..chat import Conversation
from . import protocol as P
from .errors import ApiError


class TokenServing:
    def __init__(self, tokenizer, checks, cache_capacity: int):
        self.tokenizer, self.checks, self.cache_capacity = tokenizer, checks, cache_capacity

    def tokenize(self, req: P.TokenizeRequest) -> P.TokenizeResponse:
        self.checks.model(req.model)
        if req.messages is not None:
            conv = Conversation(tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None)
            try:
                text = conv.render(self.tokenizer, [m.as_dict() for m in req.messages], req.add_generation_prompt)
            except (ValueError, TemplateError) as e:
                raise ApiError(400, f"cannot render the conversation: {e}", param="messages") from None
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        else:
            special = req.add_special if req.add_special is not None else req.add_special_tokens
            ids = self.tokenizer(
                req.prompt if req.prompt is not None else req.content, add_special_tokens=special
            ).input_ids
        strs = None
        if req.return_token_strs or req.with_pieces:
            strs = [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        return P.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.checks.config.max_request_tokens,
                                  cache_capacity=self.cache_capacity, token_strs=strs)  # fmt: skip

    def detokenize(self, req: P.DetokenizeRequest) -> P.DetokenizeResponse:
        self.checks.model(req.model)
        bad = [t for t in req.tokens if t >= self.checks.vocab]
        if bad:
            msg = f"tokens are ids of this vocabulary (0..{self.checks.vocab - 1}), got {bad[0]}"
            raise ApiError(400, msg, code="invalid_value", param="tokens")
        text = self.tokenizer.decode(req.tokens, skip_special_tokens=False)
        return P.DetokenizeResponse(prompt=text, content=text)
