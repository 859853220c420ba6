"""Text to token ids and back, as every text endpoint does it, and vLLM's ``/tokenize`` and
``/detokenize`` routes on top.

``Tokenization`` is the one place that renders a chat with the model's template and tokenizes
it (long texts on a worker thread, so one huge prompt does not stall every other request's
stream); tokenizer failures on the client's text are the client's 400.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.responses import Response

from surge.http.errors import APIError
from surge.http.openapi import error_responses
from surge.http.responses import json_response
from surge.server.models import ServedModels
from surge.server.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from surge.tokenizer import ChatTokenizer

if TYPE_CHECKING:
    from surge.server.completions import OpenAIServingCompletions

__all__ = ["Tokenization", "add_tokenize_routes"]

# Prompts longer than this many characters are tokenized on a worker thread.
_INLINE_TOKENIZE_CHARS = 20_000

_ERRORS = error_responses({
    400: "invalid request (the message names the field and what is allowed)",
    401: "missing or wrong API key", 404: "unknown model", 413: "request body too large"})


class Tokenization:
    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            if len(text) <= _INLINE_TOKENIZE_CHARS:
                return self.tokenizer.encode(text, add_special_tokens)
            return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)
        except Exception as exc:  # the Rust tokenizer refuses e.g. lone surrogates
            raise APIError(400, f"the text cannot be tokenized: {exc}", param="prompt") from exc

    def render_chat(self, messages: Sequence[Any], add_generation_prompt: bool) -> str:
        conversation = [{"role": _template_role(m.role), "content": _message_text(m.content, i)}
                        for i, m in enumerate(messages)]
        try:
            return self.tokenizer.apply_chat_template(conversation, add_generation_prompt)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        except Exception as exc:  # a template that fails on this input is the input's problem
            raise APIError(400, f"the chat template failed on these messages: {exc}",
                           param="messages") from exc

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one tokenization object per server
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def add_tokenize_routes(app: FastAPI, models: ServedModels) -> None:
    @app.post("/tokenize", response_model=TokenizeResponse, tags=["vllm"], responses=_ERRORS)
    async def tokenize(body: TokenizeRequest) -> Response:
        serving: OpenAIServingCompletions = models.resolve(body.model, "generate").target
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        tokens = serving.tokens
        if body.prompt is not None:
            ids = await tokens.encode(body.prompt, body.add_special_tokens is not False)
        else:
            text = tokens.render_chat(body.messages or [], body.add_generation_prompt)
            ids = await tokens.encode(text, bool(body.add_special_tokens))
        return json_response({"count": len(ids), "max_model_len": serving.max_model_len(),
                              "tokens": ids})

    @app.post("/detokenize", response_model=DetokenizeResponse, tags=["vllm"],
              responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> Response:
        serving: OpenAIServingCompletions = models.resolve(body.model, "generate").target
        vocab_size = serving.tokenizer.vocab_size
        bad = [t for t in body.tokens if t >= vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are unknown: allowed is "
                           f"[0, {vocab_size - 1}]", param="tokens")
        return json_response({"prompt": serving.tokenizer.decode(body.tokens)})


def _template_role(role: str) -> str:
    # OpenAI's newer clients send "developer" where chat templates know "system".
    return "system" if role == "developer" else role


def _message_text(content: Any, index: int) -> str:
    if content is None:
        raise APIError(400, f"'messages[{index}].content' is null: allowed is a string or "
                       "a list of text parts", param=f"messages[{index}].content")
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)
