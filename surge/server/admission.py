"""Admission control: a bounded waiting queue, so overload is answered with 429 at once.

Without a bound, every request a client sends waits in the engine's queue; under overload the queue
(and the server's memory) grows without limit and every client times out instead of a few being
told to come back later. The controller counts the requests admitted but not yet started (no first
token yet) and the prompt tokens they carry, and refuses a request that would push either past its
limit. It is synchronous and O(1): deciding never waits on the engine, so a 429 costs microseconds.

Usage in a request handler::

    ticket = admission.admit(len(prompt_token_ids))   # raises AdmissionRejected -> 429
    with ticket:                                       # releases on every exit path
        async for output in engine.generate(...):
            ticket.started()                           # first token: it left the queue
            ...
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import NoReturn

__all__ = ["AdmissionController", "AdmissionRejected", "Ticket"]

# Retry-After bounds in seconds: HTTP wants whole seconds, and a minute is as long as a client
# should be asked to wait before trying again.
MIN_RETRY_AFTER = 1
MAX_RETRY_AFTER = 60
# Weight of the newest interval between departures in the moving average: about the last ten
# departures matter, so the estimate follows a change of load within a few requests.
EWMA_ALPHA = 0.2


class AdmissionRejected(Exception):
    """The waiting queue is full; answer 429 with ``Retry-After: retry_after``."""

    def __init__(self, reason: str, retry_after: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "queue_full_requests" or "queue_full_tokens"
        self.retry_after = retry_after
        self.message = message


class Ticket:
    """One admitted request's place in the queue.

    ``started()`` when it leaves the queue (first token, or it finished without one);
    ``release()`` when it is done. Both are idempotent, and ``with ticket:`` releases on exit, so
    an exception or a client hanging up can never leak a queue slot.
    """

    __slots__ = ("_controller", "_queued", "num_prompt_tokens")

    def __init__(self, controller: AdmissionController, num_prompt_tokens: int) -> None:
        self._controller = controller
        self._queued = True
        self.num_prompt_tokens = num_prompt_tokens

    @property
    def queued(self) -> bool:
        return self._queued

    def started(self) -> None:
        self._leave_queue()

    def release(self) -> None:
        # A request aborted before its first token also frees its slot.
        self._leave_queue()

    def _leave_queue(self) -> None:
        if self._queued:  # checked again under the controller's lock
            self._controller._on_leave(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class AdmissionController:
    """Bounds the requests (and their prompt tokens) admitted but not yet started."""

    def __init__(
        self,
        max_queued_requests: int,
        max_queued_tokens: int,
        *,
        time_fn: Callable[[], float] = time.monotonic,
    ) -> None:
        _require_positive("max_queued_requests", max_queued_requests)
        _require_positive("max_queued_tokens", max_queued_tokens)
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self._time_fn = time_fn
        # Handlers normally run on one event loop; the lock keeps counts exact if a ticket is
        # released from another thread (an engine-output callback, a finalizer).
        self._lock = threading.Lock()
        self._num_queued = 0
        self._queued_tokens = 0
        # When the queue last made progress (a departure, or it became non-empty): a stalled
        # queue must raise the estimate even though no new departure updates the average.
        self._last_progress = time_fn()
        self._mean_departure_interval: float | None = None

    @property
    def num_queued(self) -> int:
        return self._num_queued

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def admit(self, num_prompt_tokens: int) -> Ticket:
        """Take a place in the queue, or raise AdmissionRejected at once."""
        if num_prompt_tokens < 0:
            raise ValueError(f"num_prompt_tokens must be >= 0, got {num_prompt_tokens}")
        with self._lock:
            self._check_room(num_prompt_tokens)
            if self._num_queued == 0:
                self._last_progress = self._time_fn()
            self._num_queued += 1
            self._queued_tokens += num_prompt_tokens
        return Ticket(self, num_prompt_tokens)

    def refuse_if_full(self) -> None:
        """Raise AdmissionRejected when no request, however small, would be admitted now:
        lets a server refuse before it reads and parses the request (a 429 nearly free)."""
        with self._lock:
            if self._num_queued >= self.max_queued_requests:
                self._check_room(0)

    def retry_after(self) -> int:
        """Whole seconds until the requests now waiting have likely started, in [1, 60].

        The moving average of the time between departures, times the queue depth; at least as
        long as the queue has already gone without a departure (a stalled engine).
        """
        mean_interval = self._mean_departure_interval or 0.0
        stalled_for = max(self._time_fn() - self._last_progress, 0.0) if self._num_queued else 0.0
        seconds = math.ceil(max(self._num_queued * mean_interval, stalled_for))
        return min(max(seconds, MIN_RETRY_AFTER), MAX_RETRY_AFTER)

    def _check_room(self, num_prompt_tokens: int) -> None:
        if self._num_queued >= self.max_queued_requests:
            self._reject(
                "queue_full_requests",
                f"{self._num_queued} requests are waiting "
                f"(limit --max-queued-requests={self.max_queued_requests})",
            )
        # An empty queue takes any prompt: a prompt larger than the whole token limit would
        # otherwise be refused forever, and retrying could never help. Its length is checked
        # against the model's context elsewhere.
        over_tokens = self._queued_tokens + num_prompt_tokens > self.max_queued_tokens
        if self._num_queued > 0 and over_tokens:
            self._reject(
                "queue_full_tokens",
                f"{self._queued_tokens} prompt tokens are waiting and this request adds "
                f"{num_prompt_tokens} (limit --max-queued-tokens={self.max_queued_tokens})",
            )

    def _reject(self, reason: str, detail: str) -> NoReturn:
        retry_after = self.retry_after()
        message = f"Server is busy: {detail}. Retry after {retry_after} s."
        raise AdmissionRejected(reason, retry_after, message)

    def _on_leave(self, ticket: Ticket) -> None:
        with self._lock:
            if not ticket._queued:
                return
            ticket._queued = False
            self._num_queued -= 1
            self._queued_tokens -= ticket.num_prompt_tokens
            now = self._time_fn()
            interval = max(now - self._last_progress, 0.0)
            self._last_progress = now
            previous = self._mean_departure_interval
            self._mean_departure_interval = (
                interval if previous is None
                else EWMA_ALPHA * interval + (1 - EWMA_ALPHA) * previous)


def _require_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
