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

Per tenant (``admit(..., tenant=, quota=)``): each tenant has its own slice of the queue, so a
flood from one tenant is answered with its own 429s while the others are still admitted. A
tenant is refused past its ``quota`` (its own ``max_queued_requests`` and ``max_in_flight``),
and, when the shared queue is full, unless it holds less than its weighted share of the
queue (``max_queued_requests * weight / sum of the weights of the tenants waiting``). A
tenant under its share is let in past the shared bound, so the queue holds at most twice
``max_queued_requests`` (the shares sum to the bound). Retry-After is the tenant's own: its
queue depth times the time between its own departures.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import NoReturn

from surge.engine.request import ANONYMOUS_TENANT

__all__ = ["AdmissionController", "AdmissionRejected", "TenantQuota", "Ticket"]

# Retry-After bounds in seconds: HTTP wants whole seconds, and a minute is as long as a client
# should be asked to wait before trying again.
MIN_RETRY_AFTER = 1
MAX_RETRY_AFTER = 60
# Weight of the newest interval between departures in the moving average: about the last ten
# departures matter, so the estimate follows a change of load within a few requests.
EWMA_ALPHA = 0.2


class AdmissionRejected(Exception):
    """The waiting queue (or the tenant's slice of it) is full; answer 429 with
    ``Retry-After: retry_after``."""

    def __init__(self, reason: str, retry_after: int, message: str,
                 tenant: str = ANONYMOUS_TENANT) -> None:
        super().__init__(message)
        # queue_full_requests, queue_full_tokens, tenant_queue_full or tenant_in_flight_full
        self.reason = reason
        self.retry_after = retry_after
        self.message = message
        self.tenant = tenant


@dataclass(frozen=True)
class TenantQuota:
    """A tenant's weight in the shared queue and its own bounds (None: none of its own)."""

    weight: float = 1.0
    max_queued_requests: int | None = None
    max_in_flight: int | None = None


_NO_QUOTA = TenantQuota()


class _Departures:
    """Queue depth and the moving average of the time between departures (Retry-After)."""

    __slots__ = ("last_progress", "mean_interval", "num_queued", "queued_tokens")

    def __init__(self, now: float) -> None:
        self.num_queued = 0
        self.queued_tokens = 0
        # When the queue last made progress (a departure, or it became non-empty): a stalled
        # queue must raise the estimate even though no new departure updates the average.
        self.last_progress = now
        self.mean_interval: float | None = None

    def arrive(self, num_prompt_tokens: int, now: float) -> None:
        if self.num_queued == 0:
            self.last_progress = now
        self.num_queued += 1
        self.queued_tokens += num_prompt_tokens

    def leave(self, num_prompt_tokens: int, now: float) -> None:
        self.num_queued -= 1
        self.queued_tokens -= num_prompt_tokens
        interval = max(now - self.last_progress, 0.0)
        self.last_progress = now
        previous = self.mean_interval
        self.mean_interval = (interval if previous is None
                              else EWMA_ALPHA * interval + (1 - EWMA_ALPHA) * previous)

    def retry_after(self, now: float) -> int:
        """Whole seconds until the requests now waiting have likely started, in [1, 60]."""
        mean_interval = self.mean_interval or 0.0
        stalled_for = max(now - self.last_progress, 0.0) if self.num_queued else 0.0
        seconds = math.ceil(max(self.num_queued * mean_interval, stalled_for))
        return min(max(seconds, MIN_RETRY_AFTER), MAX_RETRY_AFTER)


class _TenantState(_Departures):
    __slots__ = ("in_flight", "weight")

    def __init__(self, now: float) -> None:
        super().__init__(now)
        self.in_flight = 0
        self.weight = 1.0


class Ticket:
    """One admitted request's place in the queue.

    ``started()`` when it leaves the queue (first token, or it finished without one);
    ``release()`` when it is done. Both are idempotent, and ``with ticket:`` releases on exit, so
    an exception or a client hanging up can never leak a queue slot.
    """

    __slots__ = ("_controller", "_queued", "_released", "num_prompt_tokens", "tenant")

    def __init__(self, controller: AdmissionController, num_prompt_tokens: int,
                 tenant: str = ANONYMOUS_TENANT) -> None:
        self._controller = controller
        self._queued = True
        self._released = False
        self.num_prompt_tokens = num_prompt_tokens
        self.tenant = tenant

    @property
    def queued(self) -> bool:
        return self._queued

    def started(self) -> None:
        if self._queued:  # checked again under the controller's lock
            self._controller._on_leave(self)

    def release(self) -> None:
        # A request aborted before its first token also frees its slot.
        if not self._released:
            self._controller._on_release(self)

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
    """Bounds the requests (and their prompt tokens) admitted but not yet started, in all
    and per tenant."""

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
        self._all = _Departures(time_fn())
        # Tenants with a request admitted and not released; a tenant leaves when its last
        # request does, so this holds at most one entry per request in flight.
        self._tenants: dict[str, _TenantState] = {}
        # Sum of the weights of tenants with a request waiting (their shares' denominator).
        self._waiting_weight = 0.0

    @property
    def num_queued(self) -> int:
        return self._all.num_queued

    @property
    def queued_tokens(self) -> int:
        return self._all.queued_tokens

    def is_full(self) -> bool:
        """Whether the shared queue is at its bound: only then may ``refuse_if_full``
        refuse (a tenant's own limits are checked by ``admit``)."""
        return self._all.num_queued >= self.max_queued_requests

    def num_queued_of(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return state.num_queued if state is not None else 0

    def tenant_counts(self) -> dict[str, tuple[int, int]]:
        """Tenant -> (requests waiting, requests in flight), for the tenants with any."""
        with self._lock:
            return {t: (s.num_queued, s.in_flight) for t, s in self._tenants.items()}

    def admit(self, num_prompt_tokens: int, tenant: str = ANONYMOUS_TENANT,
              quota: TenantQuota = _NO_QUOTA) -> Ticket:
        """Take a place in the queue, or raise AdmissionRejected at once."""
        if num_prompt_tokens < 0:
            raise ValueError(f"num_prompt_tokens must be >= 0, got {num_prompt_tokens}")
        with self._lock:
            now = self._time_fn()
            state = self._tenants.get(tenant)
            if state is None:
                state = _TenantState(now)
            self._check_room(tenant, state, quota, num_prompt_tokens, now)
            self._tenants[tenant] = state
            if state.num_queued == 0:
                self._waiting_weight += quota.weight
            elif state.weight != quota.weight:  # the tenants file was reloaded
                self._waiting_weight += quota.weight - state.weight
            state.weight = quota.weight
            state.arrive(num_prompt_tokens, now)
            state.in_flight += 1
            self._all.arrive(num_prompt_tokens, now)
        return Ticket(self, num_prompt_tokens, tenant)

    def refuse_if_full(self, tenant: str | None = None,
                       quota: TenantQuota = _NO_QUOTA) -> None:
        """Raise AdmissionRejected when no request, however small, would be admitted now:
        lets a server refuse before it reads and parses the request (a 429 nearly free).
        ``tenant`` None: not known yet (the body may name it), so only the hard bound."""
        with self._lock:
            if self._all.num_queued < self.max_queued_requests:
                return
            now = self._time_fn()
            if tenant is None:
                if self._all.num_queued >= 2 * self.max_queued_requests:
                    self._reject("queue_full_requests", self._queue_full_detail(),
                                 self._all.retry_after(now), ANONYMOUS_TENANT)
                return
            state = self._tenants.get(tenant) or _TenantState(now)
            self._check_room(tenant, state, quota, 0, now)

    def retry_after(self, tenant: str | None = None) -> int:
        """Whole seconds until the requests now waiting (``tenant``'s, when it has any) have
        likely started, in [1, 60]: the moving average of the time between departures times
        the queue depth, at least as long as the queue has gone without a departure."""
        with self._lock:
            state = self._tenants.get(tenant) if tenant is not None else None
            source = state if state is not None and state.num_queued else self._all
            return source.retry_after(self._time_fn())

    def _share(self, state: _TenantState, quota: TenantQuota) -> float:
        """The tenant's weighted fraction of the shared queue among the tenants waiting."""
        others = self._waiting_weight - (state.weight if state.num_queued else 0.0)
        return quota.weight / (others + quota.weight)

    def _check_room(self, tenant: str, state: _TenantState, quota: TenantQuota,
                    num_prompt_tokens: int, now: float) -> None:
        def reject(reason: str, detail: str) -> NoReturn:
            source = state if state.num_queued else self._all
            self._reject(reason, detail, source.retry_after(now), tenant)

        if quota.max_in_flight is not None and state.in_flight >= quota.max_in_flight:
            reject("tenant_in_flight_full",
                   f"tenant {tenant!r} has {state.in_flight} requests in flight "
                   f"(its limit max_in_flight={quota.max_in_flight})")
        if (quota.max_queued_requests is not None
                and state.num_queued >= quota.max_queued_requests):
            reject("tenant_queue_full",
                   f"tenant {tenant!r} has {state.num_queued} requests waiting "
                   f"(its limit max_queued_requests={quota.max_queued_requests})")
        share = self._share(state, quota)
        total = self._all
        under_share = state.num_queued < max(1.0, share * self.max_queued_requests)
        if total.num_queued >= self.max_queued_requests and (
                not under_share or total.num_queued >= 2 * self.max_queued_requests):
            reject("queue_full_requests", self._queue_full_detail(tenant, state))
        # An empty queue takes any prompt: a prompt larger than the whole token limit would
        # otherwise be refused forever, and retrying could never help. Its length is checked
        # against the model's context elsewhere.
        over_tokens = total.queued_tokens + num_prompt_tokens > self.max_queued_tokens
        under_token_share = state.queued_tokens < share * self.max_queued_tokens
        hard_tokens = total.queued_tokens + num_prompt_tokens > 2 * self.max_queued_tokens
        if total.num_queued > 0 and over_tokens and (not under_token_share or hard_tokens):
            reject("queue_full_tokens",
                   f"{total.queued_tokens} prompt tokens are waiting and this request adds "
                   f"{num_prompt_tokens} (limit --max-queued-tokens={self.max_queued_tokens})")

    def _queue_full_detail(self, tenant: str | None = None,
                           state: _TenantState | None = None) -> str:
        detail = (f"{self._all.num_queued} requests are waiting "
                  f"(limit --max-queued-requests={self.max_queued_requests})")
        if state is not None and len(self._tenants) > 1 and state.num_queued:
            detail += f", {state.num_queued} of them of tenant {tenant!r}, its share or more"
        return detail

    @staticmethod
    def _reject(reason: str, detail: str, retry_after: int, tenant: str) -> NoReturn:
        message = f"Server is busy: {detail}. Retry after {retry_after} s."
        raise AdmissionRejected(reason, retry_after, message, tenant)

    def _on_leave(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket._queued:
                self._leave_locked(ticket, self._time_fn())

    def _leave_locked(self, ticket: Ticket, now: float) -> None:
        ticket._queued = False
        state = self._tenants[ticket.tenant]
        state.leave(ticket.num_prompt_tokens, now)
        if state.num_queued == 0:
            self._waiting_weight = max(self._waiting_weight - state.weight, 0.0)
        self._all.leave(ticket.num_prompt_tokens, now)

    def _on_release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket._released:
                return
            ticket._released = True
            if ticket._queued:
                self._leave_locked(ticket, self._time_fn())
            state = self._tenants[ticket.tenant]
            state.in_flight -= 1
            if state.in_flight == 0:
                del self._tenants[ticket.tenant]


def _require_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
