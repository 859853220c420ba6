"""The uvicorn server that runs ``surge serve`` and ``surge route``.

Over uvicorn's own: SIGTERM or Ctrl-C first call the app's drain hook (new requests get 503
while in-flight ones finish), a clean drain exits 0 rather than re-raising the signal, the app
can ask for an exit with a status (a dependency died for good), and whoever started the server
learns the address it bound (``--port 0`` picks one), and slow clients cannot hold its
connections (``surge.http.connections``: header timeout, connection cap). Import this module
only to run a server: it imports uvicorn, which building a command line should not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import uvicorn

from surge.http.connections import ConnectionGuard, guarded_protocol
from surge.http.control import ServerControl

__all__ = ["DrainingServer"]


class DrainingServer(uvicorn.Server):
    """``on_signal`` starts the app's drain; ``on_started(host, port)`` runs once bound;
    ``control`` (the app's view of its server) is bound to this server and told of the drain
    after ``on_signal``. ``guard`` closes slow connections (default: 10 s header timeout,
    a cap from the descriptor limit)."""

    def __init__(self, config: uvicorn.Config, *, on_signal: Callable[[], None] | None = None,
                 on_started: Callable[[str, int], None] | None = None,
                 control: ServerControl | None = None,
                 guard: ConnectionGuard | None = None) -> None:
        if not config.loaded:
            config.load()  # resolves the HTTP protocol class, which the guard wraps
        self.guard = guard or ConnectionGuard()
        config.http_protocol_class = guarded_protocol(config.http_protocol_class, self.guard)
        super().__init__(config)
        self.exit_code = 0
        self._on_signal = on_signal
        self._on_started = on_started
        self._control = control
        if control is not None:
            control.bind(self.request_exit)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._on_signal is not None:
            self._on_signal()
        if self._control is not None:
            self._control.begin_drain()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once it has shut down, which would make a clean
        # drain look like a crash (status -15); we drained, so we exit 0.
        self._captured_signals.clear()

    def request_exit(self, code: int) -> None:
        """Stop serving (after the usual drain) and exit with ``code``."""
        self.exit_code = code
        self.should_exit = True

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        if self._control is not None:
            self._control.started(host, port)
        if self._on_started is not None:
            self._on_started(host, port)
