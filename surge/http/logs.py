"""The one logging set-up of Surge's long-running commands (server, router, batch worker)."""

from __future__ import annotations

import logging

__all__ = ["LOG_FORMAT", "configure_logging"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """``level`` is a name as the --log-level flags take it (``info``, ``debug``, ...)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
