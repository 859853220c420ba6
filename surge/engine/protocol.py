"""Messages between an engine core and its clients: small typed msgspec structs, no pickles.

The same structs serve the in-process client (passed as objects) and the engine process
(encoded with msgpack over ZMQ).
"""

from __future__ import annotations

import msgspec

from surge.engine.request import ANONYMOUS_TENANT, FinishReason
from surge.outputs import TokenLogprobs
from surge.sampling_params import SamplingParams

__all__ = ["AbortRequests", "AddRequest", "EngineCoreOutput", "EngineStats", "ProfileResult",
           "RequestTimings", "SetTenantWeights", "StartProfile", "StepBreakdown", "TenantStats"]


class AddRequest(msgspec.Struct):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = 0.0
    tenant: str = ANONYMOUS_TENANT  # whom the fair scheduling policy serves it for


class AbortRequests(msgspec.Struct):
    request_ids: list[str]


class StartProfile(msgspec.Struct):
    """Record the next ``num_steps`` engine steps with torch.profiler (at most
    ``max_seconds``, for an engine that goes idle)."""

    num_steps: int
    max_seconds: float


class ProfileResult(msgspec.Struct):
    """A finished profile: the Chrome trace JSON, or why there is none."""

    trace: bytes
    num_steps: int
    error: str | None = None


class SetTenantWeights(msgspec.Struct):
    """Replace the fair policy's tenant weights (tenants not named weigh 1), e.g. on reload."""

    weights: dict[str, float]


class RequestTimings(msgspec.Struct, array_like=True):
    """When the engine queued, first scheduled, first sampled and finished one request, in
    ``time.monotonic()`` seconds (one clock for every process of a host), so the API process
    can draw the engine's part of a request's trace without the engine exporting anything."""

    queued: float
    scheduled: float | None
    first_token: float | None
    finished: float
    num_preemptions: int = 0


class EngineCoreOutput(msgspec.Struct):
    """What one request gained in one step: new tokens, and whether it finished."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None  # time.monotonic() when it first got a seat
    # Set when the engine refused the request (it then also carries finish_reason ABORT).
    error: str | None = None
    # With prompt_logprobs, on the request's first output: one entry per prompt token (the
    # first is None: nothing precedes it).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # On the output that finishes the request (not on aborts): the engine's timestamps.
    timings: RequestTimings | None = None


class TenantStats(msgspec.Struct):
    """One tenant's share of the engine: tokens served so far (all policies) and, under the
    fair policy, its virtual token counter (weighted tokens served / weight)."""

    weight: float = 1.0
    virtual_tokens: float = 0.0
    served_prompt_tokens: int = 0
    served_output_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0


class StepBreakdown(msgspec.Struct, array_like=True):
    """Cumulative histograms of where engine steps spent their time, one per phase
    (schedule, forward, sampling, output): counts per bucket (not cumulative across buckets,
    the last one is +Inf) and the sum of seconds, since the engine started."""

    bounds: list[float]
    counts: dict[str, list[int]]
    sums: dict[str, float]


class EngineStats(msgspec.Struct):
    """A snapshot of the scheduler and KV cache, for metrics, health and admission."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    # Tenants with requests in the engine, and idle ones the engine still remembers.
    tenants: dict[str, TenantStats] = msgspec.field(default_factory=dict)
    step_breakdown: StepBreakdown | None = None
