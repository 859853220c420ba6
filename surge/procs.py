"""Small helpers about child processes, shared by the engine client and the router's replicas."""

from __future__ import annotations

import contextlib
import signal

__all__ = ["describe_exit"]


def describe_exit(code: int | None) -> str:
    """A child process's exit status in words (`exit code -9, killed by SIGKILL`)."""
    if code is None:
        return "exit code unknown"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exit code {code}, killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
