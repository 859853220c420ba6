"""Token-budget scheduler: which requests advance, and by how many tokens, in the next step.

There is no prefill or decode phase. Each step has a token budget and a seat limit; every
running request advances ``num_computed_tokens`` toward its length, so a long prompt is chunked
over several steps and prompts share steps with decoding requests. Running requests are served
first, then waiting ones by (priority, arrival). When KV blocks run out, the lowest-priority,
latest running request is preempted: its blocks are freed and it is recomputed later.

Priority also orders prompt work within a step: while a waiting request outranks a running one
that is still reading its prompt, that running request's prompt chunk is deferred until after
the waiting requests (it keeps its seat and blocks, and gets whatever budget is left). Otherwise
a long low-priority prompt, chunked over many steps, would take the whole budget of each and
make an urgent request wait for all of them. And while the engine holds a request of higher
priority (running or waiting, or did within ``LOWER_PROMPT_GRACE_SECONDS``), prompts of lower
priority get at most 1/``LOWER_PROMPT_SHARE`` of each step's token budget: where compute is
scarce (CPU) a step's time grows with its tokens, and an urgent request's next token waits for
the whole step, its first one too (it may arrive mid-step; the grace period covers clients that
send their next request right after the last one ended). The small share keeps lower-priority
prompts moving however much urgent work comes. Decode tokens are never deferred: one token
each costs little, and stalling them would only hold KV blocks longer.

That is the ``priority`` policy, the default. ``FcfsScheduler`` (``fcfs``) is the same with
every priority taken as equal: arrival order. ``FairScheduler`` (``fair``) shares the engine
between tenants by weight with virtual token counters (``surge.engine.fairness``): the next
waiting request comes from the tenant served least, priorities order each tenant's own
requests, and the KV-cache victim is the latest, lowest-priority request of the tenant served
most. Under every policy the tokens served are counted per tenant (``tenant_stats``).
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from surge.engine.fairness import TenantLedger, TenantQueues
from surge.engine.kv_cache import BlockManager
from surge.engine.protocol import TenantStats
from surge.engine.request import FinishReason, Request, RequestStatus

__all__ = ["LOWER_PROMPT_GRACE_SECONDS", "LOWER_PROMPT_SHARE", "FairScheduler", "FcfsScheduler",
           "ScheduledChunk", "Scheduler", "SchedulerOutput", "make_scheduler"]

# While a higher-priority request is in the engine (or was, within the grace period),
# lower-priority prompts get at most 1/this of a step's token budget.
LOWER_PROMPT_SHARE = 16
LOWER_PROMPT_GRACE_SECONDS = 1.0


@dataclass
class ScheduledChunk:
    """``num_tokens`` tokens of ``request`` starting at position ``start`` run this step."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the request, so its logits are sampled."""
        return self.start + self.num_tokens == self.request.num_tokens

    @property
    def is_prompt(self) -> bool:
        """Prompt work (or recomputation after preemption), as opposed to one decode token."""
        return self.num_tokens > 1 or not self.samples


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class WaitingQueue(Protocol):
    """Waiting (and preempted) requests; ``peek`` is the one the policy admits next."""

    def __len__(self) -> int: ...
    def push(self, request: Request) -> None: ...
    def peek(self) -> Request | None: ...
    def pop(self) -> Request: ...
    def remove(self, request: Request) -> None: ...


class RankedQueue:
    """A heap by a rank key: the lowest rank is admitted first."""

    def __init__(self, rank: Callable[[Request], tuple]):
        self._rank = rank
        self._heap: list[tuple[tuple, Request]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, request: Request) -> None:
        heapq.heappush(self._heap, (self._rank(request), request))

    def peek(self) -> Request | None:
        return self._heap[0][1] if self._heap else None

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[1]

    def remove(self, request: Request) -> None:
        self._heap = [entry for entry in self._heap if entry[1] is not request]
        heapq.heapify(self._heap)


class Scheduler:
    """The ``priority`` policy; subclasses change the rank and outrank rules (hooks below)."""

    policy = "priority"

    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, *, clock: Callable[[], float] = time.monotonic,
                 tenant_weights: Mapping[str, float] | None = None):
        self.kv = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_lower_prompt_tokens = max(max_num_batched_tokens // LOWER_PROMPT_SHARE, 1)
        self.ledger = TenantLedger(tenant_weights)
        self.running: list[Request] = []  # sorted by _rank
        self._waiting: WaitingQueue = self._new_waiting_queue()
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.clock = clock
        # The most urgent priority seen lately and when (for the lower-prompt share).
        self._recent_urgent: tuple[int, float] | None = None
        self._step_urgent: int | None = None  # that priority, for the step being scheduled

    # -- requests in and out -----------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        # Refuse what could never finish: alone in the cache it would preempt itself forever.
        # The last sampled token is never fed back, so it needs no KV slot.
        max_kv_tokens = request.num_prompt_tokens + max(request.max_output_tokens, 1) - 1
        if self.kv.blocks_needed(max_kv_tokens) > self.kv.num_blocks:
            raise ValueError(
                f"prompt of {request.num_prompt_tokens} tokens plus up to "
                f"{request.max_output_tokens} output tokens cannot fit the KV cache "
                f"({self.kv.num_blocks} blocks of {self.kv.block_size} tokens); "
                "lower max_tokens, send a shorter prompt, or give the cache more memory")
        self.requests[request.request_id] = request
        self.ledger.request_added(request.tenant)
        self._push_waiting(request)

    def finish_requests(self, request_ids: Iterable[str], reason: FinishReason,
                        stop_reason: int | str | None = None) -> list[Request]:
        """End requests (abort, stop string): free their blocks now. Unknown ids are ignored."""
        finished = []
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request.status is RequestStatus.RUNNING:
                self._leave_running(request)
            else:
                self._waiting.remove(request)
            self._finish(request, reason, stop_reason)
            finished.append(request)
        return finished

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def tenant_stats(self) -> dict[str, TenantStats]:
        return self.ledger.stats(self.running)

    def set_tenant_weights(self, weights: Mapping[str, float]) -> None:
        self.ledger.set_weights(weights)

    # -- policy hooks ------------------------------------------------------------------------

    def _new_waiting_queue(self) -> WaitingQueue:
        return RankedQueue(self._rank)

    def _rank(self, request: Request) -> tuple:
        """Running requests are served, and the last one preempted, in this order."""
        return request.sort_key

    def _outranks(self, waiting: Request, running: Request) -> bool:
        """Whether a waiting request's prompt goes before a running request's prompt chunk."""
        return waiting.priority < running.priority

    def _may_displace(self, waiting: Request, running: Request) -> bool:
        """Whether a waiting request may preempt a running one for its seat or blocks."""
        return waiting.priority < running.priority

    def _displacement_victim(self, waiting: Request) -> Request | None:
        """The running request a waiting one may preempt for its seat or blocks, if any:
        the lowest-ranked one."""
        if self.running and self._may_displace(waiting, self.running[-1]):
            return self.running[-1]
        return None

    # -- one step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self._step_urgent = self._most_urgent_priority()
        budget, deferred = self._schedule_running(output, budget)
        if not output.preempted:
            budget = self._schedule_waiting(output, budget)
            self._schedule_deferred(output, budget, deferred)
        return output

    def _schedule_running(self, output: SchedulerOutput,
                          budget: int) -> tuple[int, list[Request]]:
        """Advance running requests in rank order; return the budget left and the prompt
        chunks deferred because a waiting request outranks them or their share is spent."""
        deferred: list[Request] = []
        best_waiting = self._waiting.peek()
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            index += 1
            num_remaining = request.num_tokens - request.num_computed_tokens
            room = self._prompt_room(request, budget, output) if num_remaining > 1 else budget
            outranked = best_waiting is not None and self._outranks(best_waiting, request)
            if num_remaining > 1 and (outranked or room == 0):
                deferred.append(request)  # every later request is outranked too
                continue
            num_new = min(num_remaining, room)
            if not self._allocate_or_preempt(request, num_new, output):
                break  # the request itself was preempted; everyone after it already was
            self._add_chunk(output, request, request.num_computed_tokens, num_new)
            budget -= num_new
        return budget, deferred

    def _schedule_deferred(self, output: SchedulerOutput, budget: int,
                           deferred: list[Request]) -> None:
        """Deferred prompt chunks get the budget the waiting requests left over. They preempt
        nobody: everything else in this step outranks them."""
        for request in deferred:
            room = self._prompt_room(request, budget, output)
            if room <= 0:
                return  # deferred requests are in rank order: later ones get no room either
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted for a waiting request in this step
            num_new = min(request.num_tokens - request.num_computed_tokens, room)
            if not self.kv.allocate_slots(request, num_new):
                return
            self._add_chunk(output, request, request.num_computed_tokens, num_new)
            budget -= num_new

    def _prompt_room(self, request: Request, budget: int, output: SchedulerOutput) -> int:
        """Prompt tokens ``request`` may take in this step: the budget left, or, while a
        request of higher priority is in the engine, what is left of the lower-priority share."""
        urgent = self._step_urgent
        if urgent is None or request.priority <= urgent:
            return budget
        lower = sum(chunk.num_tokens for chunk in output.chunks
                    if chunk.is_prompt and chunk.request.priority > urgent)
        return max(min(budget, self.max_lower_prompt_tokens - lower), 0)

    def _most_urgent_priority(self) -> int | None:
        """The lowest priority value in the engine now or within the grace period."""
        now = self.clock()
        present = [self.running[0].priority] if self.running else []  # running is sorted
        if self._waiting:
            present.append(self._waiting.peek().priority)
        recent = self._recent_urgent
        if recent is not None and now - recent[1] > LOWER_PROMPT_GRACE_SECONDS:
            recent = None
        if present and (recent is None or min(present) <= recent[0]):
            recent = (min(present), now)
        self._recent_urgent = recent
        return recent[0] if recent is not None else None

    def _allocate_or_preempt(self, request: Request, num_new: int,
                             output: SchedulerOutput) -> bool:
        while not self.kv.allocate_slots(request, num_new):
            victim = self.running[-1]
            self._preempt(victim, output)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> int:
        while self._waiting and budget > 0:
            request = self._waiting.peek()
            room = self._prompt_room(request, budget, output)
            if room == 0 or request in output.preempted:
                break  # the rest ranks lower still; one preempted now waits a step at least
            if len(self.running) >= self.max_num_seqs:
                victim = self._displacement_victim(request)
                if victim is None:
                    break
                budget += self._preempt_for_seat(victim, output)
                continue
            cached = self.kv.find_cached_prefix(request)
            num_cached = len(cached) * self.kv.block_size
            num_new = min(request.num_tokens - num_cached, room)
            if not self.kv.allocate_slots(request, num_new, cached):
                # Undo the lookup's counters: the same request is looked up again next step.
                self.kv.prefix_cache_queries -= request.num_tokens
                self.kv.prefix_cache_hits -= num_cached
                victim = self._displacement_victim(request)
                if victim is None:
                    break
                budget += self._preempt_for_seat(victim, output)
                continue
            self._waiting.pop()
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            request.num_cached_tokens = max(request.num_cached_tokens, num_cached)
            self._admit(request)
            self._add_chunk(output, request, num_cached, num_new)
            budget -= num_new
        return budget

    def _admit(self, request: Request) -> None:
        bisect.insort(self.running, request, key=self._rank)

    def _add_chunk(self, output: SchedulerOutput, request: Request, start: int,
                   num_tokens: int) -> None:
        output.chunks.append(ScheduledChunk(request, start, num_tokens))

    def _preempt_for_seat(self, victim: Request, output: SchedulerOutput) -> int:
        """Preempt a running request for a waiting one; return the budget its chunk held."""
        freed = sum(c.num_tokens for c in output.chunks if c.request is victim)
        output.chunks = [c for c in output.chunks if c.request is not victim]
        self._preempt(victim, output)
        return freed

    def _preempt(self, request: Request, output: SchedulerOutput) -> None:
        self._leave_running(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        output.preempted.append(request)
        self._push_waiting(request)

    # -- after the model ran -----------------------------------------------------------------

    def update_from_output(self, output: SchedulerOutput,
                           sampled: dict[str, int]) -> list[Request]:
        """Advance computed tokens, append sampled tokens, finish what is done.

        Returns the requests that finished in this step (blocks already freed).
        """
        finished = []
        for chunk in output.chunks:
            request = chunk.request
            if request.is_finished or request.status is not RequestStatus.RUNNING:
                continue  # aborted between schedule() and now
            request.num_computed_tokens += chunk.num_tokens
            self.kv.cache_full_blocks(request)
            token = sampled.get(request.request_id)
            self._charge(chunk, int(token is not None))
            if token is None:
                continue  # a prompt chunk that does not reach the end yet
            request.token_ids.append(token)
            reason, stop_reason = self._check_stop(request, token)
            if reason is not None:
                self.finish_requests([request.request_id], reason, stop_reason)
                finished.append(request)
        return finished

    @staticmethod
    def _check_stop(request: Request, token: int) -> tuple[FinishReason | None, int | None]:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                return FinishReason.STOP, token
            if not params.ignore_eos and token in request.eos_token_ids:
                return FinishReason.STOP, None
        if request.num_output_tokens >= request.max_output_tokens:
            return FinishReason.LENGTH, None
        return None, None

    def _charge(self, chunk: ScheduledChunk, num_output_tokens: int) -> None:
        """Charge the tenant for the chunk: prompt tokens the first time they are computed
        (recomputing after a preemption is free), and the token sampled, if any."""
        request = chunk.request
        num_prompt = _new_prompt_tokens(chunk)
        request.num_charged_prompt_tokens += num_prompt
        self.ledger.charge(request.tenant, num_prompt, num_output_tokens)

    # -- internals ---------------------------------------------------------------------------

    def _leave_running(self, request: Request) -> None:
        self.running.remove(request)

    def _push_waiting(self, request: Request) -> None:
        if request.status is not RequestStatus.PREEMPTED:
            request.status = RequestStatus.WAITING
        self._waiting.push(request)

    def _finish(self, request: Request, reason: FinishReason,
                stop_reason: int | str | None) -> None:
        self.ledger.request_finished(request.tenant)
        self.kv.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason


class FcfsScheduler(Scheduler):
    """Arrival order: priorities are ignored (no deferral, no displacement, no lower share)."""

    policy = "fcfs"

    def _rank(self, request: Request) -> tuple:
        return (request.arrival_time, request.arrival_seq)

    def _outranks(self, waiting: Request, running: Request) -> bool:
        return False

    def _may_displace(self, waiting: Request, running: Request) -> bool:
        return False

    def _most_urgent_priority(self) -> int | None:
        return None


class FairScheduler(Scheduler):
    """Virtual Token Counter: tenants share the engine by weight (see surge.engine.fairness).

    Waiting requests are admitted from the tenant served least, counting what it was given
    earlier in the same step; running requests are served tenant by tenant from the least
    served, and under KV pressure the victim is the latest, lowest-priority request of the
    most served. Seats (``max_num_seqs``) are shared by weight among the tenants running or
    waiting: a waiting tenant takes a seat at once from the tenant holding the most seats per
    weight if that one would still hold at least as many per weight as the taker (so a light
    tenant's request starts at once under a flood instead of waiting for a flood request to
    finish), and a free seat never goes to a tenant another waiting tenant could take it
    back from. Seats only ever move toward equal seats per weight, so they cannot thrash.
    Beyond its seat share, a tenant returning with burst credit (``burst_tokens``, see
    surge.engine.fairness) borrows a seat from the tenant holding the most seats per weight
    among those served more than it, until its credit is spent: a light tenant's burst starts
    at once too. Nobody takes a seat back from a tenant while it may borrow, and a tenant
    that stays backlogged never has credit, so loans cannot thrash either; without credit
    (``burst_tokens=0``) a tenant at its share waits for a seat to free, as in the paper.
    Priorities order each tenant's requests only: the lower-priority prompt share is off,
    since one tenant's priorities must not slow another tenant down.
    """

    policy = "fair"

    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, *, clock: Callable[[], float] = time.monotonic,
                 tenant_weights: Mapping[str, float] | None = None,
                 burst_tokens: int | None = None):
        # Virtual tokens given to each tenant so far in the step being scheduled.
        self._pending: dict[str, float] = {}
        # Weighted tokens a returning tenant may be served ahead of the backlogged ones: by
        # default two full steps' budget. bench_fairness's simulated 10x flood (8 seats, HTTP
        # workloads, seeds 0-5, 75 ms steps) kept the light tenants' TTFT p99 within 1.3x alone
        # with it; one step's budget let two seeds' bursts of 6-7 requests wait (1.9x, 3.5x).
        self.burst_tokens = (BURST_STEPS * max_num_batched_tokens if burst_tokens is None
                             else burst_tokens)
        # Running requests admitted while their tenant had credit: their seats are not counted
        # in its share, nor taken back, so the seats a burst borrowed stay with it to the end.
        self._borrowed: set[str] = set()
        # Seats per weight, recounted only when a request enters or leaves the running set.
        self._seats: dict[str, float] | None = None
        super().__init__(block_manager, max_num_seqs, max_num_batched_tokens, clock=clock,
                         tenant_weights=tenant_weights)

    def add_request(self, request: Request) -> None:
        returning = self._queues.num_waiting_of(request.tenant) == 0
        level = self._queues.lift_level() if returning else None
        super().add_request(request)  # validates first: a refused request changes nothing
        if level is not None:
            self.ledger.lift(request.tenant, level, credit=self.burst_tokens)

    def schedule(self) -> SchedulerOutput:
        self.running.sort(key=self._rank)  # counters moved since the last step
        try:
            return super().schedule()
        finally:
            self._pending.clear()  # charged for real once the step ran

    def _new_waiting_queue(self) -> WaitingQueue:
        # Kept under its own type too: lifting asks it who is backlogged.
        self._queues = TenantQueues(self._counter_with_pending,
                                    may_take_seat=self._may_take_free_seat)
        return self._queues

    def set_tenant_weights(self, weights: Mapping[str, float]) -> None:
        super().set_tenant_weights(weights)
        self._seats = None  # counted per unit of the old weights

    def _counter_with_pending(self, tenant: str) -> float:
        return self.ledger.virtual_tokens(tenant) + self._pending.get(tenant, 0.0)

    def _rank(self, request: Request) -> tuple:
        # Counters only change after a step, so this order holds for a whole schedule().
        return (self.ledger.virtual_tokens(request.tenant), *request.sort_key)

    def _outranks(self, waiting: Request, running: Request) -> bool:
        if waiting.tenant == running.tenant:
            return waiting.priority < running.priority
        return self._rank(waiting)[0] < self._rank(running)[0]

    def _seats_per_weight(self) -> dict[str, float]:
        """Seats held per unit of weight, by running tenant, borrowed ones aside."""
        if self._seats is None:
            held = Counter(r.tenant for r in self.running if r.request_id not in self._borrowed)
            self._seats = {tenant: count / self.ledger.weight(tenant)
                           for tenant, count in held.items()}
        return self._seats

    def _seat_donor(self, tenant: str) -> str | None:
        """The running tenant ``tenant`` may take a seat from. With burst credit: of the
        tenants served more, the one holding the most seats per unit of weight. Else the one
        holding the most seats per weight, if after the move it still holds at least as many
        per weight as ``tenant`` then does and could not borrow the seat back. (So seats only
        move toward equal seats per weight or, on credit, one way: no thrashing.)"""
        per_weight = self._seats_per_weight()
        others = per_weight.keys() - {tenant}
        lenders = [other for other in others if self._may_borrow(tenant, other)]
        if lenders:
            return max(lenders, key=lambda other: (per_weight[other],
                                                   self._counter_with_pending(other)))
        donor = max(others, key=per_weight.__getitem__, default=None)
        if donor is None or self._may_borrow(donor, tenant):
            return None
        after = (per_weight.get(tenant, 0.0) + 1 / self.ledger.weight(tenant),
                 per_weight[donor] - 1 / self.ledger.weight(donor))
        return donor if after[0] <= after[1] else None

    def _may_borrow(self, borrower: str, lender: str) -> bool:
        """Whether ``borrower`` has burst credit left and was served less than ``lender``."""
        return (self._has_credit(borrower) and self._counter_with_pending(borrower)
                < self._counter_with_pending(lender))

    def _has_credit(self, tenant: str) -> bool:
        return self._counter_with_pending(tenant) < self.ledger.credit_until(tenant)

    def _may_take_free_seat(self, tenant: str) -> bool:
        """Whether a free seat given to ``tenant`` stays its own: no other waiting tenant
        could take it back at once, as ``_seat_donor`` allows: by borrowing it, or by seats,
        holding fewer per weight, with one more, than ``tenant`` without it."""
        per_weight = self._seats_per_weight()
        held = per_weight.get(tenant, 0.0)
        for other in self._queues.tenants():
            if other == tenant or self._may_borrow(tenant, other):
                continue
            fewer_seats = per_weight.get(other, 0.0) + 1 / self.ledger.weight(other) <= held
            if fewer_seats or self._may_borrow(other, tenant):
                return False
        return True

    def _displacement_victim(self, waiting: Request) -> Request | None:
        """The latest, lowest-priority running request of the waiting tenant's seat donor
        (one whose seat is not borrowed: those stay)."""
        donor = self._seat_donor(waiting.tenant)
        if donor is None:
            return None
        return max((r for r in self.running
                    if r.tenant == donor and r.request_id not in self._borrowed),
                   key=lambda r: r.sort_key)

    def _admit(self, request: Request) -> None:
        # On credit, whoever it displaced: the lender may have just left the running set for
        # it, and a seat counted as its own could be taken back by a tenant served less.
        if self._has_credit(request.tenant):
            self._borrowed.add(request.request_id)
        self._seats = None
        super()._admit(request)

    def _leave_running(self, request: Request) -> None:
        self._borrowed.discard(request.request_id)
        self._seats = None
        super()._leave_running(request)

    def _most_urgent_priority(self) -> int | None:
        return None

    def _add_chunk(self, output: SchedulerOutput, request: Request, start: int,
                   num_tokens: int) -> None:
        super()._add_chunk(output, request, start, num_tokens)
        chunk = output.chunks[-1]
        cost = self.ledger.cost(request.tenant, _new_prompt_tokens(chunk), int(chunk.samples))
        self._pending[request.tenant] = self._pending.get(request.tenant, 0.0) + cost


# The fair policy's default burst credit, in steps' token budgets.
BURST_STEPS = 2

_SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.policy: cls for cls in (FcfsScheduler, Scheduler, FairScheduler)}


def make_scheduler(policy: str, block_manager: BlockManager, max_num_seqs: int,
                   max_num_batched_tokens: int, *,
                   tenant_weights: Mapping[str, float] | None = None,
                   fair_burst_tokens: int | None = None,
                   clock: Callable[[], float] = time.monotonic) -> Scheduler:
    """The scheduler of a ``--scheduling-policy``: fcfs, priority or fair
    (``fair_burst_tokens`` is the fair policy's burst credit; None: two steps' budget)."""
    if policy not in _SCHEDULERS:
        raise ValueError(f"scheduling_policy={policy!r} is invalid: allowed is one of "
                         f"{', '.join(_SCHEDULERS)}")
    if policy == FairScheduler.policy:
        return FairScheduler(block_manager, max_num_seqs, max_num_batched_tokens, clock=clock,
                             tenant_weights=tenant_weights, burst_tokens=fair_burst_tokens)
    return _SCHEDULERS[policy](block_manager, max_num_seqs, max_num_batched_tokens,
                               clock=clock, tenant_weights=tenant_weights)


def _new_prompt_tokens(chunk: ScheduledChunk) -> int:
    """Prompt positions in the chunk beyond those already charged (prefix hits included)."""
    request = chunk.request
    end = min(chunk.start + chunk.num_tokens, request.num_prompt_tokens)
    return max(end - request.num_charged_prompt_tokens, 0)
