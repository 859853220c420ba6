"""The one logging set-up of Surge's long-running commands (server, router, batch worker).

``--log-format text`` (default) writes the classic ``time LEVEL logger: message`` lines;
``--log-format json`` writes one JSON object per line (``ts``, ``level``, ``logger``, ``msg``,
and the fields a record carries in ``extra={"surge": {...}}``, such as the per-request line
of ``surge.request``), for log pipelines that parse lines (ELK, Loki).
"""

from __future__ import annotations

import logging
from typing import Any

from surge.procs import JsonFormatter

__all__ = ["LOG_FORMAT", "LOG_FORMATS", "JsonFormatter", "configure_logging",
           "uvicorn_log_config"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")


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
