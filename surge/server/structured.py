"""Structured outputs on the HTTP side: which request field asks for a constraint, and a 400
naming the field when it is malformed or cannot compile, before the request is admitted.

A request may ask in one of OpenAI's or vLLM's ways: ``response_format`` (``json_object``,
``json_schema``), ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``,
or ``structured_outputs: {...}``. They all become one ``StructuredOutputsParams``, which the
engine compiles (surge.engine.structured). vLLM's extra fields that Surge does not implement
are refused here too, by name.
"""

from __future__ import annotations

import asyncio

from surge.engine.structured import GrammarError, validate_constraint
from surge.http.errors import APIError
from surge.sampling_params import StructuredOutputsParams
from surge.server.schemas import _SamplingRequest, unimplemented_fields

__all__ = ["check_request_fields", "structured_outputs_of"]


def structured_outputs_of(body: _SamplingRequest) -> StructuredOutputsParams | None:
    """The request's constraint, or None; a 400 naming the field when it is malformed."""
    asked = _constraints(body)
    if len(asked) > 1:
        raise APIError(400, f"{', '.join(repr(n) for n in asked)} each constrain the output: "
                       "allowed is at most one of them", param=next(iter(asked)))
    if not asked:
        return None
    (param, fields), = asked.items()
    try:
        return StructuredOutputsParams(**fields)
    except (ValueError, TypeError) as exc:
        raise APIError(400, f"'{param}' is invalid: {exc}", param=param,
                       code="invalid_value") from exc


async def check_request_fields(body: _SamplingRequest) -> None:
    """Refuse unimplemented vLLM fields, and a constraint that cannot compile (checked on a
    worker thread: a large schema must not hold up the event loop)."""
    unused = unimplemented_fields(body)
    if unused:
        raise APIError(400, f"{', '.join(repr(n) for n in unused)} "
                       f"{'is' if len(unused) == 1 else 'are'} not supported by this server: "
                       "allowed is to omit them (or send their default)", param=unused[0])
    spec = structured_outputs_of(body)
    if spec is None:
        return
    try:
        await asyncio.to_thread(validate_constraint, spec)
    except GrammarError as exc:
        param = next(iter(_constraints(body)))
        raise APIError(400, f"'{param}': {exc}", param=param, code="invalid_value") from exc


def _constraints(body: _SamplingRequest) -> dict[str, dict[str, object]]:
    """Each field that asks for a constraint -> StructuredOutputsParams keyword arguments."""
    asked: dict[str, dict[str, object]] = {}
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        asked["response_format"] = {"json_object": True}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise APIError(400, "'response_format.json_schema' is required with type "
                           "'json_schema'", param="response_format.json_schema")
        schema = fmt.json_schema.schema_
        asked["response_format"] = ({"json": schema} if schema is not None
                                    else {"json_object": True})
    guided = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
              "guided_grammar": "grammar"}
    for name, field in guided.items():
        value = getattr(body, name)
        if value is not None:
            asked[name] = {field: value}
    if body.structured_outputs is not None:
        so = body.structured_outputs
        fields = {"json": so.json_, "regex": so.regex, "choice": so.choice,
                  "grammar": so.grammar, "json_object": bool(so.json_object)}
        asked["structured_outputs"] = {k: v for k, v in fields.items() if v not in (None, False)}
    return asked
