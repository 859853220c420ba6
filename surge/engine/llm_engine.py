"""Synchronous text-in, text-out engine for the offline `LLM` API, over the token-level core.

It tokenizes requests (the core validates them), runs the core one step at a time, detokenizes
incrementally and applies stop strings (ending the request in the core at once, so its
blocks are freed in the same step).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from surge.config import EngineConfig
from surge.engine.core import EngineCore
from surge.engine.detokenize import IncrementalDetokenizer
from surge.engine.protocol import AddRequest, EngineCoreOutput
from surge.engine.request import FinishReason
from surge.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from surge.sampling_params import SamplingParams
from surge.tokenizer import ChatTokenizer, load_tokenizer

__all__ = ["LLMEngine", "PromptInput"]

PromptInput = str | Sequence[int]


@dataclass
class _Tracked:
    """What the client keeps per request between steps."""

    prompt: str | None
    prompt_token_ids: list[int]
    detokenizer: IncrementalDetokenizer
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None


class LLMEngine:
    def __init__(self, config: EngineConfig, model_dir: str):
        self.core = EngineCore(config, model_dir)  # first: its errors explain a bad model dir
        self.tokenizer: ChatTokenizer = load_tokenizer(model_dir)
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def add_request(self, prompt: PromptInput, params: SamplingParams,
                    request_id: str | None = None, priority: int = 0) -> str:
        """Validate, tokenize and queue a request; bad input raises ValueError naming the field."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        text, token_ids = self._tokenize(prompt)
        self.core.add_request(AddRequest(request_id, token_ids, params, priority))
        detokenizer = IncrementalDetokenizer(self.tokenizer.tokenizer, token_ids, params)
        self._tracked[request_id] = _Tracked(text, token_ids, detokenizer, [],
                                             [] if params.logprobs is not None else None)
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
        detok = tracked.detokenizer
        tracked.token_ids.extend(out.new_token_ids)
        if tracked.logprobs is not None and out.new_logprobs:
            tracked.logprobs.extend(out.new_logprobs)
        update = detok.apply_update(out.new_token_ids, out.finish_reason, out.stop_reason)
        if update.needs_abort:
            self.core.finish_request(out.request_id, FinishReason.STOP, update.stop_reason)
        finish, stop_reason, delta = update.finish_reason, update.stop_reason, update.text
        finished = finish is not None
        if finished:
            del self._tracked[out.request_id]
        completion = CompletionOutput(
            0, detok.output_text, list(tracked.token_ids),
            finish.value if finish else None, stop_reason, tracked.logprobs,
            delta_text=delta, delta_token_ids=list(out.new_token_ids))
        return RequestOutput(out.request_id, tracked.prompt, tracked.prompt_token_ids,
                             [completion], finished, out.num_cached_tokens)
