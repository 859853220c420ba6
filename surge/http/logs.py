"""The one logging set-up of Surge's long-running commands (server, router, batch worker).

``--log-format text`` (default) writes the classic ``time LEVEL logger: message`` lines;
``--log-format json`` writes one JSON object per line (``ts``, ``level``, ``logger``, ``msg``,
and the fields a record carries in ``extra={"surge": {...}}``, such as the per-request line
of ``surge.request``), for log pipelines that parse lines (ELK, Loki).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import msgspec

__all__ = ["LOG_FORMAT", "LOG_FORMATS", "JsonFormatter", "configure_logging",
           "uvicorn_log_config"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")
_encode = msgspec.json.Encoder(enc_hook=repr).encode


class JsonFormatter(logging.Formatter):
    """One JSON object per record; values JSON cannot hold are written as their repr."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name,
            "msg": record.getMessage()}
        fields = getattr(record, "surge", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _encode(line).decode()


def configure_logging(level: str, log_format: str = "text") -> None:
    """``level`` is a name as the --log-level flags take it (``info``, ``debug``, ...);
    ``log_format`` one of ``LOG_FORMATS``."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"--log-format={log_format!r} is invalid: allowed is one of "
                         f"{', '.join(LOG_FORMATS)}")
    if log_format == "text":
        logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def uvicorn_log_config(log_format: str) -> dict[str, Any]:
    """uvicorn's own logging set-up writes text lines; with JSON its loggers propagate to
    the root logger's JSON handler instead."""
    return {"log_config": None} if log_format == "json" else {}
