"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Requests are validated by FastAPI against these models (types and simple ranges; the rest by
``SamplingParams``), and the same models make the server's OpenAPI schema complete, so
clients and fuzzers (schemathesis) see exactly what is accepted. Responses are built as plain
dicts and encoded with msgspec for speed; their models here document them.

Field names follow OpenAI; the extra sampling fields (``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ``priority``, ``guided_json``, ...) follow vLLM.
Unknown fields are ignored, as vLLM ignores them, so clients written for other servers keep
working; but vLLM's own extra fields that Surge does not implement are refused with a 400
naming them (``UNIMPLEMENTED_VLLM_FIELDS``), never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from surge.http.openapi import ErrorResponse
from surge.sampling_params import MAX_LOGPROBS

__all__ = [
    "UNIMPLEMENTED_VLLM_FIELDS",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatCompletionStreamResponse",
    "ChatMessage",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionStreamResponse",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "ErrorResponse",
    "HealthResponse",
    "ModelList",
    "TokenizeRequest",
    "TokenizeResponse",
    "unimplemented_fields",
]

MAX_N = 16
# msgpack (the engine protocol) and torch seeds take 64-bit integers; larger ones are refused
# here, as a 400, rather than failing deep in the engine.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="send a last chunk with token usage")


class JsonSchemaFormat(_Request):
    """OpenAI's ``response_format.json_schema``."""

    name: str | None = Field(None, description="the schema's name (not used)")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema",
                                           description="the JSON schema; omitted: any object")
    strict: bool | None = Field(None, description="accepted; the output always follows the "
                                                  "schema")


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="with type 'json_schema'")


class StructuredOutputsRequest(_Request):
    """vLLM's ``structured_outputs``: exactly one field."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="a Lark or GBNF grammar")


# vLLM's extra request fields that Surge does not implement, each with the value that means
# "not used" (vLLM's default): any other value is refused with a 400 naming the field.
UNIMPLEMENTED_VLLM_FIELDS: dict[str, object] = {
    "guided_whitespace_pattern": None, "structural_tag": None, "use_beam_search": False,
    "length_penalty": 1.0, "truncate_prompt_tokens": None, "prompt_logprobs": None,
    "allowed_token_ids": None, "bad_words": None, "logits_processors": None,
    "spaces_between_special_tokens": True, "return_tokens_as_token_ids": False,
    "return_token_ids": False, "continue_final_message": False, "documents": None,
    "chat_template": None, "chat_template_kwargs": None, "mm_processor_kwargs": None,
    "cache_salt": None, "kv_transfer_params": None, "vllm_xargs": None,
    "thinking_token_budget": None, "request_id": None,
}
# Grammar backends a request may name: Surge's is llguidance (vLLM calls it "guidance").
GRAMMAR_BACKENDS = ("guidance", "llguidance", "auto")


def unimplemented_fields(body: BaseModel) -> list[str]:
    """Names of vLLM extra fields this request sets to something Surge would ignore."""
    extra = body.model_extra or {}
    names = [name for name, unused in UNIMPLEMENTED_VLLM_FIELDS.items()
             if name in extra and extra[name] not in (unused, None, [], {})]
    backend = extra.get("guided_decoding_backend")
    if backend is not None and backend not in GRAMMAR_BACKENDS:
        names.append("guided_decoding_backend")
    return names


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions."""

    # Extra fields are kept (not validated) so vLLM's unimplemented ones can be refused by name.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)

    model: str | None = Field(None, description="the served model's name (GET /v1/models); "
                                                "omitted means the served model")
    n: int = Field(1, ge=1, le=MAX_N, description="completions to generate per prompt")
    temperature: float = Field(1.0, ge=0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] | None = Field(None, description="stop strings (not in the output)")
    seed: Int64 | None = Field(None, description="per-request sampling seed; with n > 1, "
                                                 "choice i uses seed + i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="an end-user id: the tenant when no API "
                             "key or --tenant-header names one")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be "
                                                                  "empty")
    # vLLM's extra sampling fields.
    top_k: Int64 = Field(0, ge=-1, description="0 or -1 disable it")
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, description="1 disables it")
    min_tokens: Int64 = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Int64] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: Int64 = Field(0, description="lower values are scheduled first")
    # Structured outputs: OpenAI's response_format, vLLM's guided_* and structured_outputs.
    response_format: ResponseFormat | None = Field(
        None, description="'json_object' or 'json_schema' constrain the output")
    guided_json: dict[str, Any] | str | None = Field(None, description="a JSON schema")
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = Field(None, description="a Lark or GBNF grammar")
    structured_outputs: StructuredOutputsRequest | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        ..., description="a string, a list of strings, token ids, or a list of token-id lists")
    max_tokens: Int64 | None = Field(16, ge=0, description="null: up to the context length; "
                                     "0 (with echo): score the prompt, generate nothing")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="top alternatives to return per token")
    echo: bool = Field(False, description="prepend the prompt to the returned text (with "
                                          "logprobs: the prompt's tokens get logprobs too)")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                        description="vLLM's: each prompt token's logprob and "
                                                    "top alternatives, per choice")
    suffix: str | None = Field(None, description="not supported: must be null")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="only best_of == n is "
                                                                  "supported")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # Tool calling (surge.server.tools checks them): an assistant's earlier calls, and the id
    # of the call a "tool" message answers.
    tool_calls: list[dict[str, Any]] | None = Field(
        None, description="an assistant's calls: [{id, type: 'function', function: {name, "
                          "arguments}}]")
    tool_call_id: str | None = Field(None, description="required in a 'tool' message")


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Int64 | None = Field(None, ge=1, description="null: up to the context length")
    max_completion_tokens: Int64 | None = Field(None, ge=1, description="alias of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = Field(
        None, description="function tools: [{type: 'function', function: {name, description, "
                          "parameters}}]")
    tool_choice: str | dict[str, Any] | None = Field(
        None, description="'auto' (default with tools), 'none', 'required', or "
                          "{type: 'function', function: {name}}; calls always match the "
                          "function's parameters schema")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call")


class TokenizeRequest(_Request):
    """vLLM's /tokenize: either a prompt or chat messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(None, description="default: true for a prompt, "
                                                              "false for messages")
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId]


# -- responses (documentation of what the handlers build) ----------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class CompletionStreamResponse(CompletionResponse):
    """One SSE `data:` chunk of a streamed completion."""


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(description="JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """The first delta of a call has its id, type and name; the next ones argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallDeltaFunction


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionStreamResponse(BaseModel):
    """One SSE `data:` chunk of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "surge"
    root: str
    max_model_len: int | None = None
    # What the model does: "generate" (completions, chat), "embed" (/v1/embeddings) or
    # "classify" (/v1/classify).
    task: Literal["generate", "embed", "classify"] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok"]
    engine_pid: int | None = Field(None, description="the engine process (None: a thread)")
    engine_restarts: int = 0
