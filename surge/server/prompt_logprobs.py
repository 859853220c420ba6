"""Prompt logprobs on /v1/completions, as evaluation harnesses ask for them.

lm-evaluation-harness's ``local-completions`` scores every loglikelihood and multiple-choice
task with ``echo: true, logprobs: k, max_tokens: 0`` (or 1): the response's ``logprobs``
then covers the prompt's tokens too (the first has no logprob: nothing precedes it). vLLM's
``prompt_logprobs: k`` returns them separately, per choice. Both come from the engine's
prefill (``SamplingParams.prompt_logprobs``); no second pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from surge.http.errors import APIError
from surge.outputs import TokenLogprobs
from surge.server.schemas import CompletionRequest, _SamplingRequest

__all__ = ["check_prompt_logprobs_request", "engine_max_tokens", "prompt_logprobs_of",
           "vllm_prompt_logprobs"]


def check_prompt_logprobs_request(body: CompletionRequest) -> None:
    """Prompt logprobs and ``max_tokens: 0`` are answered whole, not streamed."""
    if body.stream and body.max_tokens == 0:
        raise APIError(400, "'max_tokens': 0 is not supported with 'stream': true: allowed is "
                       "max_tokens >= 1, or stream false", param="max_tokens")
    if body.stream and (body.prompt_logprobs is not None
                        or (body.echo and body.logprobs is not None)):
        raise APIError(400, "prompt logprobs ('prompt_logprobs', or 'echo' with 'logprobs') "
                       "are not supported with 'stream': true: allowed is stream false",
                       param="stream")
    if body.max_tokens == 0 and not body.echo and body.prompt_logprobs is None:
        raise APIError(400, "'max_tokens'=0 is invalid: it generates nothing; allowed with "
                       "'echo': true or 'prompt_logprobs', otherwise max_tokens >= 1",
                       param="max_tokens")


def engine_max_tokens(body: CompletionRequest) -> int | None:
    """The engine always samples at least one token; with max_tokens 0 it is dropped."""
    return 1 if body.max_tokens == 0 else body.max_tokens


def prompt_logprobs_of(body: _SamplingRequest, logprobs: int | None) -> int | None:
    """How many alternatives the prefill reports per prompt token, or None."""
    asked = getattr(body, "prompt_logprobs", None)
    echoed = logprobs if getattr(body, "echo", False) and logprobs is not None else None
    if asked is None:
        return echoed
    return asked if echoed is None else max(asked, echoed)


def vllm_prompt_logprobs(entries: list[TokenLogprobs | None], k: int,
                         token_text: Callable[[int], str]) -> list[dict[str, Any] | None]:
    """vLLM's shape: per position None (the first) or {token id: {logprob, rank,
    decoded_token}} for the prompt token and the top ``k`` alternatives."""
    shaped: list[dict[str, Any] | None] = []
    for entry in entries:
        if entry is None:
            shaped.append(None)
            continue
        ranked = sorted(entry.top.items(), key=lambda item: -item[1])[:k]
        position = {str(token_id): {"logprob": logprob, "rank": rank,
                                    "decoded_token": token_text(token_id)}
                    for rank, (token_id, logprob) in enumerate(ranked, start=1)}
        if str(entry.token_id) not in position:
            rank = 1 + sum(1 for lp in entry.top.values() if lp > entry.logprob)
            position[str(entry.token_id)] = {"logprob": entry.logprob, "rank": rank,
                                             "decoded_token": token_text(entry.token_id)}
        shaped.append(position)
    return shaped
