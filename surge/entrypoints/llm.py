"""`LLM`: the offline Python API, named and shaped like vLLM's."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from surge.config import EngineConfig
from surge.engine.llm_engine import LLMEngine, PromptInput
from surge.engine.request import ANONYMOUS_TENANT
from surge.outputs import RequestOutput
from surge.sampling_params import SamplingParams
from surge.tokenizer import ChatTokenizer

__all__ = ["LLM"]

Conversation = list[dict[str, str]]


class LLM:
    """Generate with the continuous-batching engine, in this process.

    >>> llm = LLM("path/to/checkpoint", dtype="bfloat16")          # doctest: +SKIP
    >>> out = llm.generate(["Hello"], SamplingParams(max_tokens=8))  # doctest: +SKIP
    >>> out[0].outputs[0].text                                      # doctest: +SKIP

    ``model`` is a checkpoint directory, a ``.gguf`` file or a catalogue name
    (``"smollm2-135m-instruct"``, pulled on first use); with none it runs the built-in demo
    checkpoint (random weights, no download: for tests and offline demos). Keyword
    arguments are ``EngineConfig`` fields: ``dtype``, ``device``, ``max_num_seqs``,
    ``max_num_batched_tokens``, ``block_size``, ``kv_cache_memory_bytes``, ...
    """

    def __init__(self, model: str | os.PathLike | None = None, **engine_args: Any):
        if model is None:
            from surge.testing.make_model import ensure_demo_model

            model = ensure_demo_model()
        from surge.hub import resolve_model

        self.model_dir = str(resolve_model(model))
        self.config = EngineConfig(model=self.model_dir, **engine_args)
        self.engine = LLMEngine(self.config, self.model_dir)
        # Outputs of requests owned by a stream() the caller is not iterating right now: a
        # step run for one caller advances every request, and no one else's output may be lost.
        self._outbox: dict[str, list[RequestOutput]] = {}

    def get_tokenizer(self) -> ChatTokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: PromptInput | Sequence[PromptInput] | Sequence[dict],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool = True,
                 priority: Sequence[int] | None = None,
                 tenant: str | Sequence[str] = ANONYMOUS_TENANT) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs come back in prompt order.

        ``tenant`` (one for all prompts, or one per prompt) is whom each request is served
        for: under ``scheduling_policy="fair"`` tenants share the engine by weight."""
        prompt_list = _normalize_prompts(prompts)
        params = _broadcast(sampling_params, len(prompt_list))
        priorities = list(priority) if priority is not None else [0] * len(prompt_list)
        if len(priorities) != len(prompt_list):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompt_list)} prompts: "
                             "allowed is one integer per prompt")
        tenants = [tenant] * len(prompt_list) if isinstance(tenant, str) else list(tenant)
        if len(tenants) != len(prompt_list):
            raise ValueError(f"got {len(tenants)} tenants for {len(prompt_list)} prompts: "
                             "allowed is one tenant for all, or one per prompt")
        ids = self._add_all(prompt_list, params, priorities, tenants)
        finished = self._run(ids, use_tqdm)
        return [finished[request_id] for request_id in ids]

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             *, use_tqdm: bool = True, add_generation_prompt: bool = True
             ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, via the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts = [tokenizer.encode(tokenizer.apply_chat_template(c, add_generation_prompt),
                                    add_special_tokens=False) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompt: PromptInput, sampling_params: SamplingParams | None = None,
               priority: int = 0, tenant: str = ANONYMOUS_TENANT) -> Iterator[RequestOutput]:
        """Yield incremental outputs of one request (``delta_text``/``delta_token_ids`` are
        the new part); closing the iterator early aborts the request and frees its blocks."""
        request_id = self.engine.add_request(prompt, sampling_params or SamplingParams(),
                                             priority=priority, tenant=tenant)
        self._outbox[request_id] = []
        done = False
        try:
            while not done:
                if not self._outbox[request_id]:
                    if not self.engine.has_unfinished_requests():
                        return  # aborted through the engine: nothing more will come
                    self._step()
                    continue
                output = self._outbox[request_id].pop(0)
                done = output.finished
                yield output
        finally:
            del self._outbox[request_id]
            if not done:
                self.engine.abort_request([request_id])

    # -- internals ---------------------------------------------------------------------------

    def _add_all(self, prompts: list[PromptInput], params: list[SamplingParams],
                 priorities: list[int], tenants: list[str]) -> list[str]:
        """Queue all prompts, or none: one bad prompt aborts those already queued."""
        ids: list[str] = []
        try:
            for index, (prompt, p, prio, tenant) in enumerate(zip(prompts, params, priorities,
                                                                  tenants, strict=True)):
                ids.append(self._add_one(index, prompt, p, prio, tenant))
        except ValueError:
            self.engine.abort_request(ids)
            raise
        return ids

    def _add_one(self, index: int, prompt: PromptInput, params: SamplingParams,
                 priority: int, tenant: str) -> str:
        try:
            return self.engine.add_request(prompt, params, priority=priority, tenant=tenant)
        except ValueError as exc:
            raise ValueError(f"prompts[{index}]: {exc}") from exc

    def _run(self, ids: list[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        wanted = set(ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm)
        start, num_tokens = time.perf_counter(), 0
        with bar:
            while len(finished) < len(wanted) and self.engine.has_unfinished_requests():
                for output in self._step():
                    num_tokens += len(output.outputs[0].delta_token_ids)
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        bar.update(1)
                elapsed = time.perf_counter() - start
                bar.set_postfix_str(f"{num_tokens / max(elapsed, 1e-9):.0f} tok/s output")
        return finished

    def _step(self) -> list[RequestOutput]:
        """One engine step; outputs of open streams go to their outbox."""
        outputs = self.engine.step()
        for output in outputs:
            if output.request_id in self._outbox:
                self._outbox[output.request_id].append(output)
        return outputs


def _normalize_prompts(prompts: Any) -> list[PromptInput]:
    if isinstance(prompts, str | dict):
        prompts = [prompts]
    elif isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int):
        prompts = [prompts]  # one prompt given as token ids
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty string, token-id list, or list of those")
    return [_unwrap(p) for p in prompts]


def _unwrap(prompt: Any) -> PromptInput:
    if isinstance(prompt, dict):  # vLLM's TextPrompt / TokensPrompt dicts
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    return prompt


def _broadcast(params: SamplingParams | Sequence[SamplingParams] | None,
               count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling_params for {count} prompts: allowed is "
                         "one SamplingParams for all, or one per prompt")
    return list(params)
