"""What ``/openapi.json`` says about errors and event streams, in one place for every feature.

Every route answers errors in OpenAI's shape (``ErrorResponse``), and a request that fails
validation gets 400, never FastAPI's 422 (see ``surge.http.handlers``). FastAPI still documents
a 422 ``HTTPValidationError`` on every route with parameters; ``document_validation_as_400``
rewrites the schema so it says what the server does. Clients generated from the schema, and the
schemathesis fuzz test, rely on it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

__all__ = [
    "VALIDATION_ERROR",
    "ErrorDetail",
    "ErrorResponse",
    "document_validation_as_400",
    "error_responses",
    "event_stream_content",
]

VALIDATION_ERROR = "invalid request (the message names the field and what is allowed)"
_ERROR_REF = "#/components/schemas/ErrorResponse"
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error answer (``surge.http.errors.APIError.body``)."""

    error: ErrorDetail


def error_responses(descriptions: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status with its meaning and OpenAI's error body."""
    return {status: {"model": ErrorResponse, "description": text}
            for status, text in descriptions.items()}


def event_stream_content(data: str) -> dict[str, Any]:
    """The ``content`` of a ``text/event-stream`` answer. Before OpenAPI 3.2, a stream's
    ``schema`` describes one event (its ``data`` line, an optional ``event`` name), not the
    whole body as a string; ``data`` says what each event's data holds."""
    event = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "description": data},
                            "event": {"type": "string"}, "id": {"type": "string"},
                            "retry": {"type": "integer"}}}
    return {"text/event-stream": {"schema": event}}


def document_validation_as_400(app: FastAPI) -> None:
    """Make ``app.openapi()`` document validation failures as the 400 the server sends."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _replace_422(build())
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _replace_422(schema: dict[str, Any]) -> None:
    for operation in _operations(schema):
        responses = operation.get("responses", {})
        if (responses.pop("422", None) is not None and "400" not in responses
                and _can_fail_validation(operation)):
            responses["400"] = {"description": VALIDATION_ERROR, "content": {
                "application/json": {"schema": {"$ref": _ERROR_REF}}}}
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorResponse" not in components:
        error_schema = ErrorResponse.model_json_schema(
            ref_template="#/components/schemas/{model}")
        components.update(error_schema.pop("$defs", {}))
        components["ErrorResponse"] = error_schema
    for name in _FASTAPI_VALIDATION_SCHEMAS:  # ValidationError is used by the first only
        if f'"#/components/schemas/{name}"' not in json.dumps(schema):
            components.pop(name, None)


def _can_fail_validation(operation: dict[str, Any]) -> bool:
    """False when the only inputs are free-text path or optional parameters (FastAPI documents
    422 for those too, but no value of them is refused)."""
    if "requestBody" in operation:
        return True
    return any((parameter.get("required") and parameter.get("in") != "path")
               or not _is_free_text(parameter.get("schema", {}))
               for parameter in operation.get("parameters", []))


_ANNOTATIONS = frozenset({"title", "description", "default", "examples"})


def _is_free_text(schema: dict[str, Any]) -> bool:
    rules = {key: value for key, value in schema.items() if key not in _ANNOTATIONS}
    if set(rules) == {"anyOf"}:  # `str | None`
        return all(_is_free_text(member) for member in rules["anyOf"])
    return set(rules) == {"type"} and rules["type"] in ("string", "null")


def _operations(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [operation for path_item in schema.get("paths", {}).values()
            for operation in path_item.values() if isinstance(operation, dict)]
