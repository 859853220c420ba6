"""Synchronous text-in, text-out engine for the offline `LLM` API, over the token-level core.

It tokenizes requests (the core validates them), runs the core one step at a time, and turns
each update into text with the ``OutputProcessor`` the server uses too; a stop string ends
the request in the core at once, so its blocks are freed in the same step.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from surge.config import EngineConfig
from surge.engine.core import EngineCore
from surge.engine.output_processor import OutputProcessor
from surge.engine.protocol import AddRequest, EngineCoreOutput
from surge.engine.request import ANONYMOUS_TENANT, FinishReason
from surge.outputs import RequestOutput, TokenLogprobs
from surge.sampling_params import SamplingParams
from surge.tokenizer import ChatTokenizer, load_tokenizer

__all__ = ["LLMEngine", "PromptInput"]

PromptInput = str | Sequence[int]


@dataclass
class _Tracked:
    """What the client keeps per request between steps."""

    prompt: str | None
    prompt_token_ids: list[int]
    processor: OutputProcessor
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig, model_dir: str):
        self.core = EngineCore(config, model_dir)  # first: its errors explain a bad model dir
        self.tokenizer: ChatTokenizer = load_tokenizer(model_dir, config.chat_template)
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def add_request(self, prompt: PromptInput, params: SamplingParams,
                    request_id: str | None = None, priority: int = 0,
                    tenant: str = ANONYMOUS_TENANT) -> str:
        """Validate, tokenize and queue a request; bad input raises ValueError naming the field."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        text, token_ids = self._tokenize(prompt)
        self.core.add_request(AddRequest(request_id, token_ids, params, priority, tenant=tenant))
        processor = OutputProcessor(self.tokenizer.tokenizer, token_ids, params)
        self._tracked[request_id] = _Tracked(text, token_ids, processor)
        return request_id

    def abort_request(self, request_ids: list[str]) -> list[RequestOutput]:
        return [self._emit(out) for out in self.core.abort_requests(request_ids)]

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        return [self._emit(out) for out in self.core.step()]

    # -- internals ---------------------------------------------------------------------------

    def _tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, Sequence) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise ValueError("prompt must be a string or a list of token ids (integers)")

    def _emit(self, out: EngineCoreOutput) -> RequestOutput:
        tracked = self._tracked[out.request_id]
        tracked.prompt_logprobs = tracked.prompt_logprobs or out.prompt_logprobs
        delta = tracked.processor.process(out)
        if delta.needs_abort:
            self.core.finish_request(out.request_id, FinishReason.STOP, delta.stop_reason)
        if delta.finished:
            del self._tracked[out.request_id]
        return RequestOutput(out.request_id, tracked.prompt, tracked.prompt_token_ids,
                             [tracked.processor.completion(delta)], delta.finished,
                             out.num_cached_tokens, tracked.prompt_logprobs)
