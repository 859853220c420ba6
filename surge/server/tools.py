"""Tool calling: request validation, prompt rendering, constrained calls, output parsing.

Reused by every endpoint that takes OpenAI tools (``/v1/chat/completions``, the Responses API):

- ``tool_request_of`` validates ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` into a
  ``ToolRequest`` (a 400 naming the field otherwise); ``check_tool_messages`` checks a history's
  ``tool`` and assistant ``tool_calls`` messages.
- ``render_tool_chat`` renders the conversation through the chat template's ``tools`` variable
  when the template uses one (as transformers does). Templates without tool support (SmolLM2's,
  ChatML, Llama 2, ...) get Surge's default tool prompt instead, the Hermes / Qwen2.5 format:
  the tools are listed as JSON inside ``<tools></tools>`` in the system message, the model is
  asked to answer with ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  earlier calls are rendered in that form in the assistant's turn and tool results as a user
  turn of ``<tool_response>\\n...\\n</tool_response>`` blocks (a user turn, so templates that
  insist on alternating user / assistant turns still render it).
- ``ToolParser`` (registry: ``register_tool_parser``, chosen per model family from its chat
  template by ``tool_parser_for``) knows one family's call format: the grammar that makes every
  call valid JSON for its function's schema (``tool_choice`` ``auto`` too: a call may start
  anywhere in the text, but once it starts it follows the grammar; ``required`` and a named
  function: only calls), the non-streaming parse, and the streaming assembler.
- ``ToolStreamer`` turns text deltas into OpenAI chat deltas: text as ``content``, each call as
  ``{"index", "id", "type", "function": {"name", "arguments": ""}}`` first, then argument
  fragments. It emits a call's header only once its name is known and argument text only when it
  is certain to belong to the arguments, so the fragments always concatenate to exactly the
  non-streamed arguments (the non-streamed parse is the same assembler fed the whole text).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from surge.engine.structured import GrammarError, validate_constraint
from surge.http.errors import APIError
from surge.sampling_params import StructuredOutputsParams
from surge.tokenizer import ChatTokenizer

__all__ = [
    "ChatTools",
    "FunctionSpec",
    "HermesToolParser",
    "ParsedTools",
    "ToolCall",
    "ToolParser",
    "ToolRequest",
    "ToolStreamer",
    "chat_tools_of",
    "check_tool_messages",
    "check_tool_request",
    "finish_reason_for",
    "register_tool_parser",
    "render_tool_chat",
    "template_supports_tools",
    "tool_parser_for",
    "tool_request_of",
    "tool_stream_choices",
]

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's limit
_CHOICES = ("none", "auto", "required")
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


# -- the request ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    description: str | None
    parameters: dict[str, Any]
    strict: bool | None = None

    def openai(self) -> dict[str, Any]:
        """As chat templates (and OpenAI's chat API) take a tool."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolRequest:
    """Validated tools: ``choice`` is "auto", "none", "required" or "function" (then
    ``function`` names the one function the model must call)."""

    functions: dict[str, FunctionSpec]
    choice: str = "auto"
    parallel: bool = True
    function: str | None = None
    param: str = "tools"  # the request field the functions came from (for error messages)
    indexes: dict[str, int] = field(default_factory=dict)  # name -> position in the request

    @property
    def calls_allowed(self) -> bool:
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        """The output must be tool calls only (``required`` or a named function)."""
        return self.choice in ("required", "function")

    def allowed(self) -> list[FunctionSpec]:
        """The functions a call may name."""
        if self.function is not None:
            return [self.functions[self.function]]
        return list(self.functions.values())

    def template_tools(self) -> list[dict[str, Any]]:
        return [f.openai() for f in self.functions.values()]


def tool_request_of(tools: Sequence[Any] | None, tool_choice: Any = None,
                    parallel_tool_calls: Any = None, *, param: str = "tools",
                    choice_param: str = "tool_choice") -> ToolRequest | None:
    """Validate OpenAI's tool fields; None when no tools were given. Accepts the chat API's
    ``{"type": "function", "function": {...}}`` and the Responses API's flat
    ``{"type": "function", "name": ..., "parameters": ...}``."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise APIError(400, "'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, f"'{choice_param}' names a tool but no '{param}' were given: "
                           "allowed without tools is 'none', 'auto' or null", param=choice_param)
        return None
    if not isinstance(tools, list | tuple):
        raise APIError(400, f"'{param}' must be a list of tools", param=param)
    if len(tools) > MAX_TOOLS:
        raise APIError(400, f"'{param}' has {len(tools)} tools: allowed is at most {MAX_TOOLS}",
                       param=param)
    functions: dict[str, FunctionSpec] = {}
    indexes: dict[str, int] = {}
    for i, tool in enumerate(tools):
        spec, where = _function_of(tool, f"{param}[{i}]")
        if spec.name in functions:
            raise APIError(400, f"'{where}.name' {spec.name!r} is also the name of "
                           f"{param}[{indexes[spec.name]}]: tool names must be unique",
                           param=f"{where}.name")
        functions[spec.name], indexes[spec.name] = spec, i
    named = _choice_of(tool_choice, functions, choice_param)
    choice, function = (named, None) if named in _CHOICES else ("function", named)
    if isinstance(tool_choice, dict):  # a function may be called "auto": the dict names it
        choice, function = "function", named
    return ToolRequest(functions, choice, parallel_tool_calls is not False, function, param,
                       indexes)


def _function_of(tool: Any, where: str) -> tuple[FunctionSpec, str]:
    if not isinstance(tool, dict):
        raise APIError(400, f"'{where}' must be an object", param=where)
    if tool.get("type", "function") != "function":
        raise APIError(400, f"'{where}.type' is {tool.get('type')!r}: allowed is 'function'",
                       param=f"{where}.type")
    if isinstance(tool.get("function"), dict):
        function, where = tool["function"], f"{where}.function"
    elif "name" in tool:  # the Responses API's flat form
        function = tool
    else:
        raise APIError(400, f"'{where}.function' is required: an object with 'name' and "
                       "'parameters'", param=f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise APIError(400, f"'{where}.name' is {name!r}: allowed is 1 to 64 of a-z, A-Z, 0-9, "
                       "'_' and '-'", param=f"{where}.name")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise APIError(400, f"'{where}.description' must be a string",
                       param=f"{where}.description")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = _NO_PARAMETERS
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise APIError(400, f"'{where}.parameters' must be a JSON schema of type 'object' (the "
                       "arguments are an object)", param=f"{where}.parameters")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise APIError(400, f"'{where}.strict' must be a boolean", param=f"{where}.strict")
    return FunctionSpec(name, description, parameters, strict), where


def _choice_of(choice: Any, functions: dict[str, FunctionSpec], param: str) -> str:
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in _CHOICES:
            raise APIError(400, f"'{param}' is {choice!r}: allowed is 'none', 'auto', "
                           "'required' or {\"type\": \"function\", \"function\": {\"name\": "
                           "...}}", param=param)
        return choice
    name = None
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else choice.get("name")
    if not isinstance(name, str):
        raise APIError(400, f"'{param}' must be 'none', 'auto', 'required' or "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}", param=param)
    if name not in functions:
        raise APIError(400, f"'{param}' names the function {name!r}, which is not in the "
                       f"tools: allowed is one of {', '.join(map(repr, functions))}",
                       param=param)
    return name


async def check_tool_request(request: ToolRequest, parser: ToolParser) -> None:
    """Compile-check each function's parameters schema, then the calls' grammar, on a worker
    thread (a big schema must not hold up the event loop); a 400 naming the tool that fails."""
    await asyncio.to_thread(_check_compiles, request, parser)


def _check_compiles(request: ToolRequest, parser: ToolParser) -> None:
    for spec in request.functions.values():
        where = f"{request.param}[{request.indexes.get(spec.name, 0)}]"
        try:
            validate_constraint(StructuredOutputsParams(json=spec.parameters))
        except (GrammarError, ValueError) as exc:
            raise APIError(400, f"'{where}' parameters schema of {spec.name!r} is invalid: "
                           f"{_grammar_message(exc)}", param=f"{where}.function.parameters",
                           code="invalid_value") from exc
    constraint = parser.constraint(request)
    if constraint is None:
        return
    try:
        validate_constraint(constraint)
    except (GrammarError, ValueError) as exc:
        raise APIError(400, f"the tools' call grammar cannot be compiled: "
                       f"{_grammar_message(exc)}", param=request.param,
                       code="invalid_value") from exc


def _grammar_message(exc: Exception) -> str:
    return str(exc).removeprefix("structured_outputs json is invalid: ")


# -- the history ------------------------------------------------------------------------------


def check_tool_messages(messages: Sequence[dict[str, Any]], param: str = "messages") -> None:
    """A ``tool`` message needs the ``tool_call_id`` it answers; an assistant's ``tool_calls``
    each need a function name and arguments (a JSON text, or an object)."""
    for i, message in enumerate(messages):
        where = f"{param}[{i}]"
        role = message.get("role")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise APIError(400, f"'{where}.tool_call_id' is required in a 'tool' message: "
                               "the id of the tool call it answers", param=f"{where}.tool_call_id")
        calls = message.get("tool_calls")
        if calls is None:
            continue
        if role != "assistant":
            raise APIError(400, f"'{where}.tool_calls' is only allowed in 'assistant' messages",
                           param=f"{where}.tool_calls")
        if not isinstance(calls, list):
            raise APIError(400, f"'{where}.tool_calls' must be a list", param=f"{where}.tool_calls")
        for j, call in enumerate(calls):
            _check_history_call(call, f"{where}.tool_calls[{j}]")


def _check_history_call(call: Any, where: str) -> None:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(400, f"'{where}.function.name' is required: "
                       "{\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}",
                       param=f"{where}.function.name")
    arguments = function.get("arguments")
    if not isinstance(arguments, str | dict):
        raise APIError(400, f"'{where}.function.arguments' must be a JSON text (or an object)",
                       param=f"{where}.function.arguments")


# -- rendering --------------------------------------------------------------------------------

_DEFAULT_TOOL_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


@functools.lru_cache(maxsize=8)
def template_supports_tools(template: str | None) -> bool:
    """The template reads a ``tools`` variable (so tools are rendered its own way)."""
    if not template:
        return False
    try:
        parsed = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(
            template)
    except Exception:  # the template's own errors surface when it renders
        return False
    return "tools" in meta.find_undeclared_variables(parsed)


def render_tool_chat(tokenizer: ChatTokenizer, messages: Sequence[dict[str, Any]],
                     tools: ToolRequest | None, add_generation_prompt: bool,
                     param: str = "messages") -> str:
    """The prompt of a conversation that may hold tools, tool calls and tool results."""
    offered = tools.template_tools() if tools is not None and tools.calls_allowed else None
    native = template_supports_tools(tokenizer.chat_template)
    conversation = (_native_messages(messages, param) if native
                    else _default_messages(messages, offered, param))
    try:
        return tokenizer.apply_chat_template(conversation, add_generation_prompt,
                                             tools=offered if native else None)
    except ValueError as exc:
        raise APIError(400, str(exc), param=param) from exc
    except Exception as exc:  # a template that fails on this input is the input's problem
        raise APIError(400, f"the chat template failed on these messages: {exc}",
                       param=param) from exc


def _native_messages(messages: Sequence[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    """As transformers passes them; call arguments as objects (templates ``tojson`` them)."""
    out = []
    for i, message in enumerate(messages):
        rendered: dict[str, Any] = {"role": _role(message["role"]),
                                    "content": _text(message, i, param)}
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None:
                rendered[key] = message[key]
        if message.get("tool_calls"):
            rendered["tool_calls"] = [
                {"id": c.get("id"), "type": "function", "function": {
                    "name": c["function"]["name"],
                    "arguments": _arguments_object(c["function"]["arguments"])}}
                for c in message["tool_calls"]]
        out.append(rendered)
    return out


def _default_messages(messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None,
                      param: str) -> list[dict[str, str]]:
    """Surge's default tool format (Hermes / Qwen2.5) for templates without tool support."""
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        role, text = _role(message["role"]), _text(message, i, param)
        if role == "tool":
            block = f"<tool_response>\n{text}\n</tool_response>"
            if out and out[-1].get("_tool"):  # consecutive results share one user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": "1"})
            continue
        if role == "user" and out and out[-1].get("_tool"):
            # The user's words after tool results join their turn: templates that want user
            # and assistant turns to alternate accept it, and small models answer the words
            # rather than echo the results.
            out[-1]["content"] += "\n\n" + text
            out[-1].pop("_tool")
            continue
        if message.get("tool_calls"):
            calls = [_call_block(c["function"]["name"], c["function"]["arguments"])
                     for c in message["tool_calls"]]
            text = "\n".join(([text] if text else []) + calls)
        out.append({"role": role, "content": text})
    if tools:
        prompt = _DEFAULT_TOOL_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{prompt}"
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def _call_block(name: str, arguments: str | dict[str, Any]) -> str:
    return ("<tool_call>\n" + json.dumps({"name": name, "arguments": _arguments_object(
        arguments)}, ensure_ascii=False) + "\n</tool_call>")


def _arguments_object(arguments: str | dict[str, Any]) -> Any:
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # shown as the client sent it


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def _text(message: dict[str, Any], index: int, param: str) -> str:
    content = message.get("content")
    if content is None:
        if message.get("tool_calls"):
            return ""
        raise APIError(400, f"'{param}[{index}].content' is null: allowed is a string or a "
                       "list of text parts", param=f"{param}[{index}].content")
    if isinstance(content, str):
        return content
    return "".join(part["text"] if isinstance(part, dict) else part.text for part in content)


# -- calls ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, exactly as the model wrote it

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedTools:
    content: str | None
    calls: list[ToolCall]


def finish_reason_for(finish_reason: str | None, calls: Sequence[ToolCall]) -> str | None:
    """OpenAI's: a completion that ended by itself with calls ended for ``tool_calls``."""
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolStreamer(Protocol):
    calls: list[ToolCall]

    def feed(self, text: str) -> list[dict[str, Any]]:
        """OpenAI delta dicts for this much more text."""

    def finish(self) -> list[dict[str, Any]]:
        """The deltas still held back, at the end of the output."""


class ToolParser(Protocol):
    """One model family's tool-call format."""

    name: str

    def constraint(self, request: ToolRequest) -> StructuredOutputsParams | None:
        """The grammar that keeps every call valid (None: calls are not constrained)."""

    def streamer(self, request: ToolRequest, incremental: bool) -> ToolStreamer:
        """``incremental``: the output follows ``constraint`` (so arguments may stream as they
        come); otherwise each call is held until it is complete and valid."""

    def parse(self, request: ToolRequest, text: str, incremental: bool) -> ParsedTools:
        """The whole output's content and calls (what the streamer emits, all at once)."""


@dataclass(frozen=True)
class _Registered:
    name: str
    factory: Callable[[], ToolParser]
    detect: Callable[[str | None], bool]


_PARSERS: list[_Registered] = []


def register_tool_parser(name: str, factory: Callable[[], ToolParser],
                         detect: Callable[[str | None], bool]) -> None:
    """Add a model family's parser; ``detect(chat_template)`` says whether it is the family's.
    The latest registration is tried first; "hermes" is the default."""
    _PARSERS.insert(0, _Registered(name, factory, detect))


def tool_parser_for(template: str | None, name: str | None = None) -> ToolParser:
    """The parser named ``name``, else the first whose ``detect`` accepts the chat template,
    else Hermes (Surge's default tool prompt is in its format)."""
    for entry in _PARSERS:
        if (entry.name == name) if name is not None else entry.detect(template):
            return entry.factory()
    if name is not None:
        known = ", ".join(sorted({e.name for e in _PARSERS}))
        raise ValueError(f"unknown tool-call parser {name!r}: known are {known}")
    return HermesToolParser()


# -- Hermes / Qwen: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call> ---------------

_START, _END = "<tool_call>", "</tool_call>"
# A call's head up to its arguments' first character (which must have arrived: a head matched
# on a prefix of the text is then the head of the whole text, however the text was chunked).
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
# Separators of the constrained JSON: as Python's json.dumps writes it, as Hermes models do.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class HermesToolParser:
    name = "hermes"

    def constraint(self, request: ToolRequest) -> StructuredOutputsParams | None:
        if not request.calls_allowed:
            return None
        return StructuredOutputsParams(grammar=_hermes_grammar(request))

    def streamer(self, request: ToolRequest, incremental: bool) -> ToolStreamer:
        return _TagStreamer(request, incremental)

    def parse(self, request: ToolRequest, text: str, incremental: bool) -> ParsedTools:
        streamer = _TagStreamer(request, incremental)
        deltas = streamer.feed(text) + streamer.finish()
        content = "".join(d.get("content", "") for d in deltas)
        if streamer.calls:  # the text around calls, without the lines that separated them
            return ParsedTools(content.strip() or None, streamer.calls)
        return ParsedTools(content, streamer.calls)


def _hermes_grammar(request: ToolRequest) -> str:
    """Lark (llguidance): a call's JSON names one allowed function, then its arguments under
    that function's schema. Auto: free text, where ``<tool_call>`` (a lazy lexeme: it ends the
    text the moment it appears) must start a valid call."""
    options = [{"type": "object", "properties": {"name": {"const": f.name},
                                                 "arguments": _declared_only(f.parameters)},
                "required": ["name", "arguments"], "additionalProperties": False}
               for f in request.allowed()]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    body = f'"\\n" %json {json.dumps({**schema, "x-guidance": _JSON_STYLE})} "\\n</tool_call>"'
    if request.forced:
        repeat = ' ("\\n" call)*' if request.parallel and request.function is None else ""
        return (f'%llguidance {{}}\nstart: call{repeat}\ncall: "<tool_call>" {body}\n')
    start = "call* TEXT" if request.parallel else "TEXT | call"
    return (f'%llguidance {{}}\nstart: {start}\ncall_start[lazy]: TEXT "<tool_call>"\n'
            f'call: call_start {body}\nTEXT: /(.|\\n)*/\n')


def _declared_only(schema: Any) -> Any:
    """The schema with objects that declare ``properties`` (and say nothing of others) closed
    to undeclared ones: what is generated is still valid for the original schema, but a model
    cannot ramble on in made-up keys (LangChain's and Pydantic's schemas leave objects open).
    Subschemas that share their instance with another object schema (``allOf``; ``anyOf`` and
    ``oneOf`` beside ``properties``) stay as they are: closing one would forbid the others'
    keys."""
    if isinstance(schema, list):
        return [_declared_only(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties"):
            out[key] = ({k: _declared_only(v) for k, v in value.items()}
                        if isinstance(value, dict) else value)
        elif key in ("items", "prefixItems", "additionalProperties") or (
                key in ("anyOf", "oneOf") and "properties" not in schema):
            out[key] = _declared_only(value)
        else:
            out[key] = value
    if (isinstance(out.get("properties"), dict) and "additionalProperties" not in out
            and "patternProperties" not in out and "unevaluatedProperties" not in out):
        out["additionalProperties"] = False
    return out


@dataclass
class _OpenCall:
    index: int
    id: str = field(default_factory=new_call_id)
    name: str | None = None
    head_end: int = 0  # where the arguments start in the call's text
    sent: str = ""  # argument text already emitted


class _TagStreamer:
    """Text between tags is content; each ``<tool_call>...</tool_call>`` is one call.

    With ``incremental`` (the output follows the calls' grammar) a call whose name never
    arrived (the output was cut off) is dropped rather than shown as text, and under a forced
    ``tool_choice`` the text between calls (the grammar's separators) is not content.
    """

    def __init__(self, request: ToolRequest, incremental: bool) -> None:
        self._request = request
        self._incremental = incremental
        self._quiet = incremental and request.forced
        self._buffer = ""
        self._open: _OpenCall | None = None
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buffer += text
        deltas: list[dict[str, Any]] = []
        while True:
            if self._open is None:
                start = self._buffer.find(_START)
                if start < 0:
                    keep = _partial_suffix(self._buffer, _START)
                    self._text(deltas, self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return deltas
                self._text(deltas, self._buffer[:start])
                self._buffer = self._buffer[start + len(_START):]
                self._open = _OpenCall(len(self.calls))
                continue
            end = self._buffer.find(_END)
            if end < 0:
                if self._incremental:
                    self._stream_arguments(deltas)
                return deltas
            block, self._buffer = self._buffer[:end], self._buffer[end + len(_END):]
            self._close(block, deltas, _END)

    def finish(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        if self._open is None:
            self._text(deltas, self._buffer)
        else:  # cut off (length) or the model forgot the closing tag
            self._close(self._buffer, deltas, "")
        self._buffer = ""
        return deltas

    def _stream_arguments(self, deltas: list[dict[str, Any]]) -> None:
        call = self._open
        assert call is not None
        if call.name is None:
            if not self._start_call(call, self._buffer):
                return
            deltas.append(_head_delta(call))
        self._send(call, _arguments_so_far(self._buffer[call.head_end:]), deltas)

    def _start_call(self, call: _OpenCall, text: str) -> bool:
        """Name the call from its head, if the head is there and names an offered function."""
        head = _HEAD.match(text)
        name = _json_string(head.group(1)) if head is not None else None
        if head is None or name not in self._request.functions:
            return False
        call.name, call.head_end = name, head.end()
        return True

    def _close(self, block: str, deltas: list[dict[str, Any]], end_tag: str) -> None:
        call = self._open
        assert call is not None
        self._open = None
        parsed = self._parse_block(block)
        if parsed is None and call.name is None and self._incremental:
            self._start_call(call, block)  # as if it had streamed: the same result
            if call.name is not None:
                deltas.append(_head_delta(call))
        if parsed is None and call.name is None:  # not a call after all: it was text
            if not self._incremental:
                self._text(deltas, _START + block + end_tag)
            return
        if parsed is None:  # a started call that was cut off: its arguments so far
            assert call.name is not None
            arguments = _arguments_so_far(block[call.head_end:])
            name = call.name
        else:
            name, arguments = parsed
        if call.name is None:
            call.name = name
            deltas.append(_head_delta(call))
        self._send(call, arguments, deltas)
        self.calls.append(ToolCall(call.id, name, arguments))

    def _parse_block(self, block: str) -> tuple[str, str] | None:
        """(name, arguments JSON) of a complete, valid call to an offered function."""
        try:
            value = json.loads(block)
        except ValueError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        if value["name"] not in self._request.functions:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as a JSON text
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        head = _HEAD.match(block)
        if head is not None:  # the arguments exactly as written (what streaming sends)
            raw = block[head.end():].rstrip()
            if raw.endswith("}"):
                raw = raw[:-1].rstrip()
                with contextlib.suppress(ValueError):
                    if json.loads(raw) == arguments:
                        return value["name"], raw
        return value["name"], json.dumps(arguments, ensure_ascii=False)

    def _text(self, deltas: list[dict[str, Any]], text: str) -> None:
        if text and not self._quiet:
            deltas.append({"content": text})

    @staticmethod
    def _send(call: _OpenCall, arguments: str, deltas: list[dict[str, Any]]) -> None:
        if arguments.startswith(call.sent) and len(arguments) > len(call.sent):
            deltas.append({"tool_calls": [{"index": call.index, "function": {
                "arguments": arguments[len(call.sent):]}}]})
            call.sent = arguments


def _arguments_so_far(text: str) -> str:
    """The part of a call's text after its head that surely belongs to the arguments: not a
    possible start of ``</tool_call>``, not trailing space, not the last ``}`` (which may close
    the call's object rather than the arguments)."""
    text = text[:len(text) - _partial_suffix(text, _END)].rstrip()
    if text.endswith("}"):
        text = text[:-1].rstrip()
    return text


def _head_delta(call: _OpenCall) -> dict[str, Any]:
    return {"tool_calls": [{"index": call.index, "id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": ""}}]}


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def _json_string(escaped: str) -> str | None:
    try:
        return json.loads(f'"{escaped}"')
    except ValueError:
        return None


register_tool_parser("hermes", HermesToolParser, lambda template: True)


# -- one chat request's tools -----------------------------------------------------------------


@dataclass
class ChatTools:
    """What a chat request's tools change: the prompt, the constraint and the answer's shape.

    ``incremental`` is True when the output follows the parser's grammar (then arguments
    stream as they are generated); a request's own ``response_format`` / ``guided_*``
    constraint takes precedence under ``tool_choice: auto``, and calls are then parsed from
    the free output, each held back until complete.
    """

    request: ToolRequest | None
    parser: ToolParser
    constraint: StructuredOutputsParams | None
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def renders(self) -> bool:
        """The prompt needs ``render_tool_chat`` (tools, calls or results in it)."""
        return self.request is not None or any(
            m.get("role") == "tool" or m.get("tool_calls") for m in self.messages)

    def render(self, tokenizer: ChatTokenizer, add_generation_prompt: bool) -> str:
        return render_tool_chat(tokenizer, self.messages, self.request, add_generation_prompt)

    @property
    def active(self) -> bool:
        """Calls are parsed from the output."""
        return self.request is not None and self.request.calls_allowed

    @property
    def incremental(self) -> bool:
        return self.constraint is not None

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The assistant message and finish reason of a whole output."""
        if not self.active:
            return {"role": "assistant", "content": text}, finish_reason
        assert self.request is not None
        parsed = self.parser.parse(self.request, text, self.incremental)
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if parsed.calls:
            message["tool_calls"] = [c.openai() for c in parsed.calls]
        return message, finish_reason_for(finish_reason, parsed.calls)

    def streamer(self) -> ToolStreamer | None:
        if not self.active:
            return None
        assert self.request is not None
        return self.parser.streamer(self.request, self.incremental)


async def chat_tools_of(tokenizer: ChatTokenizer, tools: Any, tool_choice: Any,
                        parallel_tool_calls: Any, messages: Sequence[dict[str, Any]],
                        user_constraint: bool, param: str = "tools") -> ChatTools:
    """Validate a request's tools and history (OpenAI message dicts); compile-check the
    calls' grammar. ``user_constraint``: the request has its own response_format / guided_*."""
    messages = list(messages)
    check_tool_messages(messages)
    request = tool_request_of(tools, tool_choice, parallel_tool_calls, param=param)
    parser = tool_parser_for(tokenizer.chat_template)
    if request is None:
        return ChatTools(None, parser, None, messages)
    if user_constraint and request.forced:
        raise APIError(400, f"'tool_choice' {request.function or request.choice!r} "
                       "constrains the output to tool "
                       "calls, so it cannot be combined with 'response_format' or guided_* "
                       "fields: allowed with them is 'auto' or 'none'", param="tool_choice")
    await check_tool_request(request, parser)
    constraint = None if user_constraint else parser.constraint(request)
    return ChatTools(request, parser, constraint, messages)


def tool_stream_choices(streamer: ToolStreamer, index: int, text: str,
                        finish_reason: str | None, stop_reason: int | str | None,
                        logprobs: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The chat-completion chunk choices of one text delta of a choice with tools: one per
    content or tool-call delta, then the finish (an empty delta, as OpenAI ends a choice).
    ``logprobs`` (of the delta's tokens) ride on the first of them."""
    deltas = streamer.feed(text)
    if finish_reason is not None:
        deltas += streamer.finish()
    choices: list[dict[str, Any]] = [{"index": index, "delta": d, "logprobs": None,
                                      "finish_reason": None} for d in deltas]
    if finish_reason is not None:
        choices.append({"index": index, "delta": {}, "logprobs": None,
                        "finish_reason": finish_reason_for(finish_reason, streamer.calls),
                        "stop_reason": stop_reason})
    elif not choices and logprobs is not None:
        choices.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": None})
    if choices:
        choices[0]["logprobs"] = logprobs
    return choices
