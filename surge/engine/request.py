"""A generation request as the engine tracks it between steps."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from surge.sampling_params import SamplingParams

__all__ = ["ANONYMOUS_TENANT", "FinishReason", "Request", "RequestStatus"]

# The tenant of a request that names none (all such requests share one fairness account).
ANONYMOUS_TENANT = "anonymous"

_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(eq=False)
class Request:
    """Prompt and output token ids, the KV blocks that hold them, and how far the model got.

    ``num_computed_tokens`` counts tokens whose KV is in the cache. The scheduler advances it
    toward ``num_tokens``; when it gets there the step's logits yield the next token.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 2**31
    priority: int = 0
    # Who the request is served for: the fair policy shares the engine between tenants.
    tenant: str = ANONYMOUS_TENANT
    arrival_time: float = field(default_factory=time.monotonic)
    # Breaks ties between equal arrival times, so ordering is total and deterministic.
    arrival_seq: int = field(default_factory=lambda: next(_arrival_counter))

    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # Hash chain of this request's full blocks, extended as blocks fill (prefix caching).
    block_hashes: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # When the scheduler first gave it a seat (monotonic, comparable across processes):
    # queue time ends here and prefill begins.
    first_scheduled_time: float | None = None
    # When its first output token was sampled (monotonic), for the request's trace.
    first_token_time: float | None = None
    # Prompt tokens already charged to the tenant: recomputing them after a preemption is free.
    num_charged_prompt_tokens: int = 0
    # A seeded request's own random stream, created at its first sampled token.
    generator: Any = None
    # A structured-output request's grammar position (surge.engine.structured.GrammarState).
    grammar: Any = None
    # With prompt_logprobs: one entry per prompt position so far (None for the first token,
    # which has no context), filled by the runner during the prefill.
    prompt_logprobs: list[Any] | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def max_output_tokens(self) -> int:
        room = self.max_model_len - self.num_prompt_tokens
        limit = self.sampling_params.max_tokens
        return room if limit is None else min(limit, room)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, float, int]:
        """Lower priority values run first, then earlier arrivals."""
        return (self.priority, self.arrival_time, self.arrival_seq)
