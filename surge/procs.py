"""Small helpers about child processes, shared by the engine client and the router's replicas:
how an exit status reads, and the JSON log line every Surge process writes with
``--log-format json`` (the engine process included)."""

from __future__ import annotations

import contextlib
import logging
import signal
from datetime import UTC, datetime
from typing import Any

import msgspec

__all__ = ["JsonFormatter", "describe_exit", "uses_json_logs"]

_encode = msgspec.json.Encoder(enc_hook=repr).encode


def describe_exit(code: int | None) -> str:
    """A child process's exit status in words (`exit code -9, killed by SIGKILL`)."""
    if code is None:
        return "exit code unknown"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exit code {code}, killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; values JSON cannot hold are written as their repr."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name,
            "msg": record.getMessage(), "pid": record.process}
        fields = getattr(record, "surge", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _encode(line).decode()


def uses_json_logs() -> bool:
    """Whether this process logs JSON lines (so the children it starts should too)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
