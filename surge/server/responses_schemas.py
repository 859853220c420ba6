"""Request and response bodies of ``POST /v1/responses`` (OpenAI's Responses API), stateless.

The request is validated by FastAPI against ``ResponsesRequest`` (types and ranges); its
``input`` items are checked by ``surge.server.responses`` so each problem is a 400 naming the
item (``input[2].content[0].type``). Response bodies are built as plain dicts; the models
below document them in the OpenAPI schema.

Fields that would make the server keep state (``store: true``, ``previous_response_id``,
``conversation``, ``background``) and fields Surge cannot honour are refused with a 400
naming them (``UNSUPPORTED_FIELDS``), never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from surge.server.schemas import Int64

__all__ = [
    "UNSUPPORTED_FIELDS",
    "FunctionTool",
    "ResponseObject",
    "ResponseTextConfig",
    "ResponseTextFormat",
    "ResponsesRequest",
    "unsupported_fields",
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class ResponseTextFormat(_Request):
    """``text.format``: plain text, any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, description="the schema's name (with json_schema)")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema",
                                           description="the JSON schema (with json_schema)")
    strict: bool | None = Field(None, description="accepted; the output always follows the "
                                                  "schema")


class ResponseTextConfig(_Request):
    format: ResponseTextFormat | None = None
    verbosity: Literal["medium"] | None = Field(
        None, description="only 'medium' (this model has no verbosity setting)")


class FunctionTool(_Request):
    """A function the model may call; other tool types (web search, files) are refused."""

    type: Literal["function"]
    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the "
                                                                "arguments object")
    strict: bool | None = None


class NamedFunctionChoice(_Request):
    type: Literal["function"]
    name: str


class ResponsesRequest(_Request):
    """OpenAI's ``POST /v1/responses`` request; Surge keeps no state between requests."""

    # Extra fields are kept (not validated) so the unsupported ones can be refused by name.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)

    model: str | None = Field(None, description="the served model's name (GET /v1/models); "
                                                "omitted means the served model")
    input: str | list[dict[str, Any]] = Field(
        ..., description="a user message as text, or a list of items: messages "
        "({role, content}), function_call and function_call_output items")
    instructions: str | None = Field(None, description="a system message put before input")
    max_output_tokens: Int64 | None = Field(None, ge=1,
                                            description="null: up to the context length")
    temperature: float | None = Field(None, ge=0, le=2, description="null: 1; 0 is greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    text: ResponseTextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool | None = Field(None, description="only false: this server keeps no responses")
    previous_response_id: str | None = Field(None, description="not supported: must be null "
                                                               "(send the whole input)")
    metadata: dict[str, str] | None = Field(None, description="returned as sent")
    user: str | None = Field(None, description="an end-user id (accepted, not used)")
    truncation: Literal["disabled"] | None = Field(None, description="only 'disabled': an "
                                                   "input too long is a 400")


# Responses API fields Surge does not implement: name -> (the values that mean "not used",
# why it is refused). Any other value is a 400 naming the field.
UNSUPPORTED_FIELDS: dict[str, tuple[tuple[object, ...], str]] = {
    "conversation": ((None,), "this server stores no conversations"),
    "background": ((None, False), "responses run in the foreground only"),
    "reasoning": ((None, {}), "this model has no reasoning settings"),
    "include": ((None, []), "no extra output data is available"),
    "prompt": ((None,), "this server stores no prompt templates"),
    "max_tool_calls": ((None,), "tool calls are not limited per response"),
    "top_logprobs": ((None, 0), "logprobs are not returned by /v1/responses"),
    "context_management": ((None, []), "the input is never compacted"),
}
_STATELESS = "this server keeps no responses: send the whole conversation as 'input'"


def unsupported_fields(body: ResponsesRequest) -> list[tuple[str, str]]:
    """(name, why) of each request field set to something this server would otherwise
    ignore, the stateful ones first."""
    found = []
    if body.previous_response_id is not None:
        found.append(("previous_response_id", _STATELESS))
    if body.store:
        found.append(("store", _STATELESS + "; allowed is false or omitting it"))
    extra = body.model_extra or {}
    found += [(name, why) for name, (unused, why) in UNSUPPORTED_FIELDS.items()
              if name in extra and not any(extra[name] == value for value in unused)]
    return found


# -- responses (documentation of what the handlers build) ----------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str = Field(..., description="a JSON object, as text")
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage | FunctionCallItem]
    parallel_tool_calls: bool
    previous_response_id: None = None
    store: Literal[False] = False
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
