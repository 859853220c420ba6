"""Lone UTF-16 surrogates: valid JSON (``"a\\ud800"``), not valid Unicode text.

Python's ``json`` turns such an escape into a ``str`` that cannot be encoded as UTF-8, so it
fails wherever text leaves the process: SQLite, the tokenizer, a JSON response that echoes it.
Requests are refused up front (400 naming the field), and every error message is made safe to
encode, so no echo of a bad value can turn a 400 into a 500.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["find_lone_surrogate", "json_lone_surrogate", "safe_text", "surrogate_problem"]

# A JSON escape of a surrogate (high D800-DBFF or low DC00-DFFF); a body without one cannot
# hold a lone surrogate, so most bodies are never parsed here.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def safe_text(text: str) -> str:
    """``text`` with every lone surrogate written as its escape (``\\ud800``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def find_lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path (``messages[0].content``, ``''`` for the value itself) of the first string,
    key or value, that holds a lone surrogate; None when all text is valid Unicode."""
    if isinstance(value, str):
        return None if _encodable(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{safe_text(str(key))}" if path else safe_text(str(key))
            if isinstance(key, str) and not _encodable(key):
                return here
            found = find_lone_surrogate(item, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = find_lone_surrogate(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def surrogate_problem(path: str) -> str:
    """The sentence said about a field that holds a lone surrogate."""
    where = f"'{path}'" if path else "the value"
    return (f"{where} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape): "
            "strings must be valid Unicode text")


def json_lone_surrogate(body: bytes) -> str | None:
    """The field path of a lone surrogate in a JSON body, or None (also for bodies that are
    not JSON: their parser says what is wrong with them)."""
    if _SURROGATE_ESCAPE.search(body) is None:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return find_lone_surrogate(data)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
