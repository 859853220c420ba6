"""Text to token ids and back, as every text endpoint does it, and vLLM's ``/tokenize`` and
``/detokenize`` routes on top.

``Tokenization`` is the one place that renders a chat with the model's template and tokenizes
it; tokenizer failures on the client's text are the client's 400.

A body may hold megabytes of text (``--max-body-bytes``, 8 MiB by default), far more than any
context: tokenized whole, a 6.9 MB prompt took the event loop for seconds and left the process
gigabytes larger. So a text with a context limit is measured before it is tokenized: longer than
``max_model_len`` times the longest token of the vocabulary (in characters), it cannot fit and
is refused at once; otherwise long texts are tokenized on one worker thread, first counted in
bounded pieces (stopping as soon as the count passes the context), then encoded whole only if
they fit. Memory per request stays proportional to the context, not to the body.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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

# Prompts longer than this many characters are tokenized on the worker thread.
_INLINE_TOKENIZE_CHARS = 20_000
# Longer texts with a context limit are counted in pieces of about this many characters (cut
# at whitespace) before being encoded whole.
PIECE_CHARS = 16_384

_ERRORS = error_responses({
    400: "invalid request (the message names the field and what is allowed)",
    401: "missing or wrong API key", 404: "unknown model", 413: "request body too large"})


class Tokenization:
    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer
        # One thread: big texts queue rather than each holding its own tokenizer buffers
        # (and its own malloc arena, which glibc keeps after the request).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="surge-tokenize")
        # No token of this vocabulary spells more characters than this (byte-level and
        # SentencePiece spellings are at least as long as the text they stand for).
        vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
        self.max_token_chars = max((len(token) for token in vocab), default=1)

    async def encode(self, text: str, add_special_tokens: bool = True, *,
                     max_tokens: int | None = None, param: str = "prompt") -> list[int]:
        """The token ids of ``text``; with ``max_tokens`` (the context length), a text that
        cannot fit is refused (400 ``context_length_exceeded``) before it is tokenized whole."""
        if max_tokens is not None:
            self._check_chars(text, max_tokens, param)
        try:
            if len(text) <= _INLINE_TOKENIZE_CHARS:
                return self.tokenizer.encode(text, add_special_tokens)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._thread, self._encode_long, text,
                                              add_special_tokens, max_tokens)
        except _TooLong as exc:
            raise _context_exceeded(f"has more than {exc.counted - exc.slack} tokens",
                                    max_tokens or 0, param) from None
        except Exception as exc:  # the Rust tokenizer refuses e.g. lone surrogates
            raise APIError(400, f"the text cannot be tokenized: {exc}", param=param) from exc

    def _check_chars(self, text: str, max_tokens: int, param: str) -> None:
        bound = max_tokens * self.max_token_chars
        if len(text) > bound:
            raise _context_exceeded(
                f"has {len(text)} characters, more than {max_tokens} tokens can spell (at "
                f"most {self.max_token_chars} characters per token of this tokenizer, "
                f"{bound} in all)", max_tokens, param)

    def _encode_long(self, text: str, add_special_tokens: bool,
                     max_tokens: int | None) -> list[int]:
        if max_tokens is not None and len(text) > 4 * PIECE_CHARS:
            count_within(self.tokenizer, text, max_tokens)
        return self.tokenizer.encode(text, add_special_tokens)

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
        tokens, limit = serving.tokens, serving.max_model_len()
        if body.prompt is not None:
            ids = await tokens.encode(body.prompt, body.add_special_tokens is not False,
                                      max_tokens=limit)
        else:
            text = tokens.render_chat(body.messages or [], body.add_generation_prompt)
            ids = await tokens.encode(text, bool(body.add_special_tokens), max_tokens=limit,
                                      param="messages")
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


class _TooLong(Exception):
    def __init__(self, counted: int, slack: int) -> None:
        super().__init__(counted)
        self.counted = counted
        self.slack = slack


def count_within(tokenizer: ChatTokenizer, text: str, max_tokens: int) -> int:
    """Tokens of ``text`` counted piece by piece; raises _TooLong as soon as the count passes
    ``max_tokens`` (plus one per cut: a cut may split what the whole text makes one token)."""
    counted = 0
    for cuts, piece in enumerate(text_pieces(text, PIECE_CHARS)):
        counted += len(tokenizer.encode(piece, add_special_tokens=False))
        if counted > max_tokens + cuts:
            raise _TooLong(counted, cuts)
    return counted


def text_pieces(text: str, size: int) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``size`` characters, cut before whitespace
    where there is some (so words stay whole)."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            space = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
            end = space if space > start else end
        yield text[start:end]
        start = end


def _context_exceeded(what: str, max_tokens: int, param: str) -> APIError:
    return APIError(400, f"This model's maximum context length is {max_tokens} tokens. "
                         f"However, the {param} {what}. Please reduce the length of the "
                         f"{param}.", param=param, code="context_length_exceeded")


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
