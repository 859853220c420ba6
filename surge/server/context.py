"""What every endpoint family applies to a request, in one place: the refusal (draining, engine
gone), the per-key rate-limit charge, the admission ticket, the deadline (504), the client
hanging up (the work is cancelled, which aborts it) and the metrics of refusals.

One ``RequestContext`` per server; endpoint families and features get it as a constructor
argument, and the lifecycle tells it when new requests must be refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from surge.http.auth import RateLimited, RateLimiter
from surge.http.errors import APIError
from surge.http.gate import key_id
from surge.http.responses import unless_disconnected
from surge.server.admission import AdmissionController, AdmissionRejected, Ticket
from surge.server.metrics import ServerMetrics
from surge.server.response_cache import NO_CACHE, ResponseCache

__all__ = ["RequestContext"]

T = TypeVar("T")


class RequestContext:
    def __init__(self, admission: AdmissionController, rate_limiter: RateLimiter,
                 metrics: ServerMetrics, request_timeout: float | None) -> None:
        self.admission = admission
        self.rate_limiter = rate_limiter
        self.metrics = metrics
        self.request_timeout = request_timeout
        self._refusal: APIError | None = None
        self._num_in_flight = 0
        # A response-cache feature replaces it when it mounts (surge.cache).
        self.response_cache: ResponseCache = NO_CACHE

    # -- refusal -----------------------------------------------------------------------------

    def refuse_new(self, error: APIError) -> None:
        """From now on, every new request gets ``error`` (draining, engine gone for good)."""
        self._refusal = error

    @property
    def accepting(self) -> bool:
        return self._refusal is None

    def check_accepting(self) -> None:
        if self._refusal is not None:
            raise self._refusal

    # -- charges -----------------------------------------------------------------------------

    def charge(self, request: Request, amount: int) -> None:
        """The caller's per-key rate limit: one request of ``amount`` tokens (or images)."""
        try:
            self.rate_limiter.check(key_id(request.scope), amount)
        except RateLimited as exc:
            self.metrics.record_rejected(f"rate_limit_{exc.limit}")
            raise APIError(429, exc.message, code="rate_limit_exceeded",
                           headers={"Retry-After": str(exc.retry_after)}) from exc

    def admit(self, num_prompt_tokens: int) -> Ticket:
        """A place in the bounded waiting queue (429 when full); ``release`` gives it back."""
        try:
            ticket = self.admission.admit(num_prompt_tokens)
        except AdmissionRejected as exc:
            self.metrics.record_rejected(exc.reason)
            raise APIError(429, exc.message, code=exc.reason,
                           headers={"Retry-After": str(exc.retry_after)}) from exc
        self._num_in_flight += 1
        return ticket

    def release(self, ticket: Ticket) -> None:
        """Call exactly once per ``admit``."""
        ticket.release()
        self._num_in_flight -= 1

    @property
    def num_in_flight(self) -> int:
        """Admitted requests not yet released."""
        return self._num_in_flight

    # -- time and the client -----------------------------------------------------------------

    def deadline(self) -> float | None:
        """The event loop's time by which a request starting now must end."""
        timeout = self.request_timeout
        return None if not timeout else asyncio.get_running_loop().time() + timeout

    def timed_out(self) -> APIError:
        return APIError(504, f"the request did not finish within the server's "
                        f"--request-timeout of {self.request_timeout:g} s",
                        code="request_timeout")

    async def unless_disconnected(self, request: Request, work: Awaitable[T]) -> T:
        """``work``'s result; cancelled (so aborted) when the client hangs up first."""
        return await unless_disconnected(request.receive, work)
