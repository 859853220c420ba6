"""What an app and the server that runs it tell each other, before that server exists: the
address it bound (known once it listens), an exit with a status (a dependency died for good),
and, from the server, that a drain begins (SIGTERM).

The app is built first and the uvicorn server around it, so features get a ``ServerControl``
at construction and the server binds it (``DrainingServer(..., control=...)``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["ServerControl"]

logger = logging.getLogger(__name__)


class ServerControl:
    def __init__(self) -> None:
        self._exit: Callable[[int], None] | None = None
        self._drain_hooks: list[Callable[[], None]] = []
        self.address: tuple[str, int] | None = None

    def on_drain(self, hook: Callable[[], None]) -> None:
        """``hook`` runs when the server is told to stop (from a signal handler: it must
        only hand work to the event loop)."""
        self._drain_hooks.append(hook)

    def begin_drain(self) -> None:
        """Called by the server that runs the app."""
        for hook in self._drain_hooks:
            hook()

    def bind(self, request_exit: Callable[[int], None]) -> None:
        """Called by the server that runs the app."""
        self._exit = request_exit

    def started(self, host: str, port: int) -> None:
        self.address = (host, port)

    def request_exit(self, code: int) -> None:
        """Stop the server (after its drain) and exit with ``code``."""
        if self._exit is None:  # in-process tests run the app without a server
            logger.error("exit with status %d requested, but no server runs this app", code)
            return
        self._exit(code)
