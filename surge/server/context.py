"""What every endpoint family applies to a request, in one place: the refusal (draining, engine
gone), the per-key rate-limit charge, the admission ticket, the deadline (504), the client
hanging up (the work is cancelled, which aborts it) and the metrics of refusals; and the
tenant a request is served for (``surge.server.tenants``), whose slice of the queue and rate
limits it is charged to.

One ``RequestContext`` per server; endpoint families and features get it as a constructor
argument, and the lifecycle tells it when new requests must be refused.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.requests import Request
from starlette.types import Scope

from surge.http.auth import RateLimited, RateLimiter
from surge.http.errors import APIError
from surge.http.gate import key_id
from surge.http.responses import unless_disconnected
from surge.server.admission import AdmissionController, AdmissionRejected, TenantQuota, Ticket
from surge.server.metrics import ServerMetrics
from surge.server.response_cache import NO_CACHE, ResponseCache
from surge.server.stages import NO_STAGES, RequestStages, StageRun
from surge.server.tenant_metrics import TenantMetrics
from surge.server.tenants import ANONYMOUS_TENANT, Tenants

__all__ = ["RequestContext"]

T = TypeVar("T")
# A JSON body with a "user" key (not a chat message's role "user", not escaped text).
_NAMES_USER = re.compile(rb'"user"\s*:')


class RequestContext:
    def __init__(self, admission: AdmissionController, rate_limiter: RateLimiter,
                 metrics: ServerMetrics, request_timeout: float | None,
                 tenants: Tenants | None = None) -> None:
        self.admission = admission
        self.tenants = tenants or Tenants()
        self.tenant_metrics = TenantMetrics(
            metrics.registry, metrics.model_name,
            weight_of=lambda tenant: self.tenants.limits(tenant).weight)
        self.tenant_metrics.reserve(self.tenants.config.tenants)
        self.rate_limiter = rate_limiter
        self.metrics = metrics
        self.request_timeout = request_timeout
        self._refusal: APIError | None = None
        self._num_in_flight = 0
        # A response-cache feature replaces it when it mounts (surge.cache).
        self.response_cache: ResponseCache = NO_CACHE
        # A stages feature replaces it when it mounts (surge.stages); observers (tracing) get
        # every stage run, whoever mounts first.
        self.stages: RequestStages = NO_STAGES
        self.stage_observers: list[Callable[[StageRun], None]] = []

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

    def tenant_of(self, request: Request, user: str | None) -> str:
        """Whom the request is served for (``surge.server.tenants.resolve_tenant``)."""
        return self.tenants.resolve(request.scope, user)

    def charge(self, request: Request, amount: int, tenant: str | None = None) -> None:
        """The caller's per-key rate limit, then its tenant's own (from the tenants file):
        one request of ``amount`` tokens (or images)."""
        try:
            self.rate_limiter.check(key_id(request.scope), amount)
            if tenant is not None:
                self.tenants.charge(tenant, amount)
        except RateLimited as exc:
            self.metrics.record_rejected(f"rate_limit_{exc.limit}")
            self.tenant_metrics.record_rejected(tenant or ANONYMOUS_TENANT,
                                                f"rate_limit_{exc.limit}")
            raise APIError(429, exc.message, code="rate_limit_exceeded",
                           headers={"Retry-After": str(exc.retry_after)}) from exc

    def quota(self, tenant: str) -> TenantQuota:
        limits = self.tenants.limits(tenant)
        return TenantQuota(limits.weight, limits.max_queued_requests, limits.max_in_flight)

    def admit(self, num_prompt_tokens: int, tenant: str = ANONYMOUS_TENANT) -> Ticket:
        """A place in the tenant's slice of the bounded waiting queue (429 when full, with
        the tenant's own Retry-After); ``release`` gives it back."""
        try:
            ticket = self.admission.admit(num_prompt_tokens, tenant, self.quota(tenant))
        except AdmissionRejected as exc:
            self.metrics.record_rejected(exc.reason)
            self.tenant_metrics.record_rejected(tenant, exc.reason)
            raise APIError(429, exc.message, code=exc.reason,
                           headers={"Retry-After": str(exc.retry_after)}) from exc
        if self.admission.num_queued_of(tenant) > 1:
            self.tenant_metrics.record_backlogged(tenant)  # it queues behind its own
        self._num_in_flight += 1
        return ticket

    def shed(self, scope: Scope, body: bytes | None = None) -> APIError | None:
        """A 429 for a generation request before its body is parsed (``body`` None: not even
        read), when its tenant could not be admitted; None otherwise. The tenant is known from
        the headers, or once the body is read and names no ``user`` (then it is what the
        headers say: anonymous without a key or tenant header)."""
        tenant = self.tenants.before_body(scope)
        if tenant is None and body is not None and not _NAMES_USER.search(body):
            tenant = self.tenants.resolve(scope, None)
        try:
            self.admission.refuse_if_full(
                tenant, self.quota(tenant) if tenant is not None else TenantQuota())
        except AdmissionRejected as exc:
            self.metrics.record_rejected(exc.reason)
            self.tenant_metrics.record_rejected(exc.tenant, exc.reason)
            return APIError(429, exc.message, code=exc.reason,
                            headers={"Retry-After": str(exc.retry_after)})
        return None

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
