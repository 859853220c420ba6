"""Request and response bodies of the apps' endpoints (``/api/apps``), as pydantic models so
they are validated and appear in the OpenAPI schema at ``/docs``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

__all__ = [
    "AppsConfig",
    "ChatMessage",
    "DeleteResult",
    "Generation",
    "GenerationCreate",
    "GenerationList",
    "HistoryExport",
    "HistoryItem",
    "MessageCreate",
    "Session",
    "SessionCreate",
    "SessionDetail",
    "SessionList",
    "StatusReport",
    "StopResult",
    "TemplateInfo",
    "WritingOptions",
]

MAX_MESSAGE_CHARS = 32_000


class SessionCreate(BaseModel):
    title: str = Field("", max_length=200, description="empty: the first message titles it")


class Session(BaseModel):
    id: str
    title: str
    created_at: float
    updated_at: float


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Session]


class ChatMessage(BaseModel):
    id: int
    session_id: str
    # "tool": an order-status lookup; its content is JSON {call_id, name, arguments, result}.
    role: Literal["user", "assistant", "tool"]
    content: str
    status: Literal["complete", "stopped", "error"]
    finish_reason: str | None
    created_at: float


class SessionDetail(Session):
    messages: list[ChatMessage]


class HistoryItem(BaseModel):
    role: Literal["user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


class MessageCreate(BaseModel):
    content: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
    max_tokens: int | None = Field(None, ge=1, description="at most the deployment's "
                                   "--chat-max-tokens (the default)")
    temperature: float = Field(0.7, ge=0, le=2)
    seed: int | None = Field(None, ge=0, lt=2**63, description="fixed seed: a repeatable answer")
    model: str | None = None
    history: list[HistoryItem] = Field(
        default_factory=list, description="earlier messages of the conversation; used only "
        "when the server stores no history (--no-history)")


class StopResult(BaseModel):
    stopped: bool = Field(description="false when no answer was being generated")


class DeleteResult(BaseModel):
    sessions: int
    messages: int
    generations: int


class GenerationCreate(BaseModel):
    template: str = Field(description="email, story, outline or summary")
    inputs: dict[str, str] = Field(description="the template's fields, e.g. {'points': ...}")
    tone: str = "neutral"
    length: str = "medium"
    temperature: float = Field(0.0, ge=0, le=2, description="0 (or a seed) makes the request "
                               "deterministic, so a repeat is answered from the model "
                               "server's response cache")
    seed: int | None = Field(None, ge=0, lt=2**63)
    model: str | None = None


class Generation(BaseModel):
    id: str
    template: str
    tone: str
    length: str
    inputs: dict[str, str]
    model: str | None
    temperature: float
    seed: int | None
    output: str
    finish_reason: str | None
    created_at: float
    cached: bool = Field(False, description="answered from the model server's response "
                         "cache (an earlier identical request by this user)")
    latency_ms: float | None = None


class GenerationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Generation]


class HistoryExport(BaseModel):
    exported_at: float
    sessions: list[SessionDetail]
    generations: list[Generation]


class TemplateInfo(BaseModel):
    name: str
    title: str
    fields: list[str]


class WritingOptions(BaseModel):
    templates: list[TemplateInfo]
    tones: list[str]
    lengths: list[str]


class AppsConfig(BaseModel):
    history: bool = Field(description="false: the server stores nothing (--no-history)")
    api_key_required: bool
    chat_max_tokens: int
    writing: WritingOptions


class StatusReport(BaseModel):
    window_seconds: float
    requests_per_second: float | None
    output_tokens_per_second: float | None
    latency_seconds: dict[str, dict[str, float | None]]
    requests_running: float
    queue_depth: float
    kv_cache_usage: float
    requests_total: float
    requests_rejected_total: float
    prefix_cache_hit_rate: float | None
    response_cache_hit_rate: float | None = None
    # Jain's index of the tenants' weighted service (surge:tenant_fairness_index), and one
    # row per tenant: output tokens/s and TTFT p50/p99 in the window, totals, weight.
    fairness_index: float | None = None
    tenants: list[dict[str, object]] = []
    # Where recent requests' time went: {phase, mean_seconds, count} per request stage
    # (stage:NAME), queue, prefill, decode, other (the rest of end to end), e2e.
    breakdown: list[dict[str, object]] = []
    replicas: list[dict[str, object]]
    upstream: str
