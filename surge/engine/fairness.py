"""Per-tenant accounting and the waiting queue of the fair policy (Virtual Token Counter).

VTC, from "Fairness in Serving Large Language Models" (Sheng et al., OSDI 2024): every tenant has
a counter of the service it received, in weighted tokens divided by its weight
(``PROMPT_TOKEN_COST`` per prompt token, ``OUTPUT_TOKEN_COST`` per output token, as in the
paper). The next waiting request comes from the tenant with the smallest counter, so
backlogged tenants receive service in proportion to their weights, whatever rate each sends
at. A tenant with nothing waiting when a request arrives has its counter lifted to the
smallest counter among the backlogged tenants (or, when none is, to the counter of the tenant
that was backlogged last), less a bounded burst credit: time spent idle is not credit to spend
later, beyond that one burst. Counters never decrease.

The burst credit is Surge's addition to the paper. Under the paper's rule a light tenant comes
back level with the flood, so a burst of its requests queues behind the flood's for seats even
though it is served far less than its share; with the credit it may borrow seats (preempting a
request of a tenant served more) until its counter reaches the level it returned to. What one
return can take ahead of the backlogged tenants is bounded by the credit (plus the requests it
admitted while borrowing); a tenant that stays backlogged is never lifted, so it never borrows.

``TenantLedger`` keeps the counters and the tokens served per tenant (under every policy: the
server exports them as metrics). ``TenantQueues`` holds waiting requests, one heap per tenant
ordered by (priority, arrival), and hands out the head of the tenant whose counter, plus what
it was given so far in the step being scheduled, is the smallest.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

from surge.config import check_tenant_weights
from surge.engine.protocol import TenantStats
from surge.engine.request import Request

__all__ = ["IDLE_TENANTS_IN_STATS", "MAX_IDLE_TENANTS", "OUTPUT_TOKEN_COST", "PROMPT_TOKEN_COST",
           "TenantLedger", "TenantQueues"]

# Weighted cost of a token served (the paper's w_p = 1, w_q = 2): an output token holds its
# seat and KV blocks for a whole step, a prompt token shares a step with many others.
PROMPT_TOKEN_COST = 1.0
OUTPUT_TOKEN_COST = 2.0
# Idle tenants remembered (their stats and counters); beyond this the longest idle is dropped.
# Dropping a counter never gives credit (a returning tenant is lifted anyway); at most it
# forgives a tenant served ahead of the others before it went idle.
MAX_IDLE_TENANTS = 1024
# Stats go out with every step: they name the tenants with requests in the engine and only
# the most recently idle (whose last tokens the reader must still see), not every one known.
IDLE_TENANTS_IN_STATS = 64


class _Account:
    __slots__ = ("credit_until", "num_requests", "served_output_tokens",
                 "served_prompt_tokens", "virtual_tokens")

    def __init__(self) -> None:
        self.virtual_tokens = 0.0
        self.served_prompt_tokens = 0
        self.served_output_tokens = 0
        self.num_requests = 0  # in the engine: waiting, running or preempted
        # The counter below which the tenant may borrow seats (the level of its last lift).
        self.credit_until = float("-inf")


class TenantLedger:
    """Virtual token counters, weights and tokens served, per tenant."""

    def __init__(self, weights: Mapping[str, float] | None = None):
        self.weights: dict[str, float] = check_tenant_weights(weights or {})
        self._accounts: dict[str, _Account] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # longest idle first

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Replace the weights (tenants not named weigh 1). Counters keep what they hold;
        service from now on is charged at the new weights."""
        self.weights = check_tenant_weights(weights)

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def virtual_tokens(self, tenant: str) -> float:
        account = self._accounts.get(tenant)
        return account.virtual_tokens if account is not None else 0.0

    def cost(self, tenant: str, prompt_tokens: int, output_tokens: int) -> float:
        """What serving these tokens adds to the tenant's counter."""
        weighted = prompt_tokens * PROMPT_TOKEN_COST + output_tokens * OUTPUT_TOKEN_COST
        return weighted / self.weight(tenant)

    def charge(self, tenant: str, prompt_tokens: int, output_tokens: int) -> None:
        account = self._account(tenant)
        account.virtual_tokens += self.cost(tenant, prompt_tokens, output_tokens)
        account.served_prompt_tokens += prompt_tokens
        account.served_output_tokens += output_tokens

    def lift(self, tenant: str, level: float, credit: float = 0.0) -> None:
        """Raise the tenant's counter to ``level`` less ``credit`` weighted tokens (never
        lowers it); until the counter is back at ``level`` the tenant has credit."""
        account = self._account(tenant)
        account.virtual_tokens = max(account.virtual_tokens, level - credit / self.weight(tenant))
        account.credit_until = level

    def credit_until(self, tenant: str) -> float:
        """The counter below which the tenant has burst credit (-inf: none)."""
        account = self._accounts.get(tenant)
        return account.credit_until if account is not None else float("-inf")

    def request_added(self, tenant: str) -> None:
        self._account(tenant).num_requests += 1
        self._idle.pop(tenant, None)

    def request_finished(self, tenant: str) -> None:
        account = self._accounts[tenant]
        account.num_requests -= 1
        if account.num_requests == 0:
            self._idle[tenant] = None
            if len(self._idle) > MAX_IDLE_TENANTS:
                forgotten, _ = self._idle.popitem(last=False)
                del self._accounts[forgotten]

    def stats(self, running: Iterable[Request]) -> dict[str, TenantStats]:
        """Tenants with requests in the engine, and the ``IDLE_TENANTS_IN_STATS`` most
        recently idle; ``running`` are the engine's running requests."""
        recent_idle = itertools.islice(reversed(self._idle), IDLE_TENANTS_IN_STATS)
        active = (t for t, account in self._accounts.items() if account.num_requests)
        stats = {tenant: self._tenant_stats(tenant) for tenant in (*active, *recent_idle)}
        for request in running:
            stats[request.tenant].num_running += 1
            stats[request.tenant].num_waiting -= 1
        return stats

    def _tenant_stats(self, tenant: str) -> TenantStats:
        account = self._accounts[tenant]
        return TenantStats(self.weight(tenant), account.virtual_tokens,
                           account.served_prompt_tokens, account.served_output_tokens,
                           num_waiting=account.num_requests)

    def _account(self, tenant: str) -> _Account:
        account = self._accounts.get(tenant)
        if account is None:
            account = self._accounts[tenant] = _Account()
        return account


class TenantQueues:
    """Waiting requests, one heap per tenant by (priority, arrival); the next one is the head
    of the tenant with the smallest ``counter(tenant)`` (ties: the earliest head), tenants
    for which ``may_take_seat`` holds (a seat given to them stays theirs) first."""

    def __init__(self, counter: Callable[[str], float],
                 may_take_seat: Callable[[str], bool] = lambda tenant: True):
        self._counter = counter
        self._may_take_seat = may_take_seat
        self._heaps: dict[str, list[tuple[tuple[int, float, int], Request]]] = {}
        self._size = 0
        # The tenant whose queue emptied last: a tenant returning while none waits is lifted
        # to its counter (the paper's rule for an empty queue).
        self.last_backlogged: str | None = None

    def __len__(self) -> int:
        return self._size

    def tenants(self) -> list[str]:
        """Tenants with a waiting request."""
        return list(self._heaps)

    def num_waiting_of(self, tenant: str) -> int:
        return len(self._heaps.get(tenant, ()))

    def push(self, request: Request) -> None:
        heapq.heappush(self._heaps.setdefault(request.tenant, []),
                       (request.sort_key, request))
        self._size += 1

    def peek(self) -> Request | None:
        tenant = self._next_tenant()
        return None if tenant is None else self._heaps[tenant][0][1]

    def pop(self) -> Request:
        tenant = self._next_tenant()
        if tenant is None:
            raise IndexError("pop from an empty waiting queue")
        _, request = heapq.heappop(self._heaps[tenant])
        self._size -= 1
        self._drop_if_empty(tenant)
        return request

    def remove(self, request: Request) -> None:
        heap = self._heaps[request.tenant]
        heap[:] = [entry for entry in heap if entry[1] is not request]
        heapq.heapify(heap)
        self._size -= 1
        self._drop_if_empty(request.tenant)

    def lift_level(self) -> float | None:
        """The counter a returning tenant is lifted to: the smallest among backlogged
        tenants, else that of the tenant backlogged last; None before anyone waited."""
        if self._heaps:
            return min(self._counter(tenant) for tenant in self._heaps)
        if self.last_backlogged is not None:
            return self._counter(self.last_backlogged)
        return None

    def _next_tenant(self) -> str | None:
        if not self._heaps:
            return None
        # Least served first; asking whether a seat stays costs a pass over the waiting
        # tenants, so it is asked in that order and usually of the first one only.
        order = sorted(self._heaps, key=lambda t: (self._counter(t), self._heaps[t][0][0][1:]))
        return next((tenant for tenant in order if self._may_take_seat(tenant)), order[0])

    def _drop_if_empty(self, tenant: str) -> None:
        if not self._heaps[tenant]:
            del self._heaps[tenant]
            self.last_backlogged = tenant
