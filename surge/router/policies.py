"""Load-balancing policies: which of the routable replicas gets the next request.

Each policy is a small object whose ``choose(candidates, request)`` looks only at the replicas'
state (in-flight count, latency average, weight, name) and the request's routing facts; none
touches the network, so each is unit-tested on plain ``Replica`` objects. ``candidates`` is
never empty and holds only replicas that may take work right now (healthy, not draining, not
ejected, not already tried for this request).

- ``round_robin``: in turn.
- ``weighted``: smooth weighted round robin (nginx's): proportions exact over any window.
- ``least_outstanding`` (default): power of two choices: the less loaded of two random
  replicas. Nearly as good as "least loaded of all" without herding every request onto the
  one replica that just became free.
- ``latency``: power of two choices on ``ewma_latency * (in_flight + 1)``, the expected wait.
- ``consistent_hash``: rendezvous hashing of a session key (``X-Session-ID`` or the body's
  ``user``): a key stays on its replica; when one of N replicas joins or leaves, only the keys
  it gains or loses (about 1/N) move. No key: least outstanding.
- ``prefix_affinity``: sends a prompt where its longest prefix was recently sent (that replica
  probably still holds those KV blocks in its prefix cache), unless replicas are imbalanced
  beyond a threshold, then least loaded.

With ``by_tenant`` (``--route-by-tenant``), ``consistent_hash`` keys on the request's tenant
(``surge.http.tenant``: the tenant header, else ``user``), so each tenant's requests share one
replica's prefix cache and one fair scheduler sees all of its load; ``least_outstanding``
spreads each tenant over the replicas: of two random replicas, the one that got fewer of this
tenant's requests in the last ``TENANT_WINDOW_SECONDS``, then the less loaded, so a flooding
tenant lands on every replica evenly instead of filling the ones its bursts happened to hit.
"""

from __future__ import annotations

import hashlib
import random
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from surge.http.tenant import ANONYMOUS_TENANT
from surge.router.replicas import Replica

__all__ = [
    "POLICIES",
    "ConsistentHash",
    "LatencyAware",
    "LeastOutstanding",
    "Policy",
    "PrefixAffinity",
    "RequestFacts",
    "RoundRobin",
    "Weighted",
    "make_policy",
    "prompt_chunks",
]


@dataclass(frozen=True)
class RequestFacts:
    """What a policy may know about a request: read from headers, or from the JSON body only
    when the policy asks for it (``needs_body``)."""

    session_key: str | None = None
    prompt: str | list[int] | None = None
    tenant: str | None = None  # set when the policy routes by tenant
    tier: str | None = None  # the replica tier it wants, when the router has tiers (tiers.py)


class Policy(Protocol):
    name: ClassVar[str]
    needs_body: bool
    # Route by tenant (``RequestFacts.tenant``), named by this header (or the body's user).
    by_tenant: bool
    tenant_header: str | None

    def choose(self, candidates: Sequence[Replica], request: RequestFacts) -> Replica: ...


class RoundRobin:
    name = "round_robin"
    needs_body = False
    by_tenant = False
    tenant_header: str | None = None

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[Replica], request: RequestFacts) -> Replica:
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen


class Weighted:
    """nginx's smooth weighted round robin: each pick raises every candidate's score by its
    weight and takes the highest, which then pays the total back. Weights 5:1:1 give
    a a b a c a a, not a a a a a b c."""

    name = "weighted"
    needs_body = False
    by_tenant = False
    tenant_header: str | None = None

    def __init__(self) -> None:
        self._score: weakref.WeakKeyDictionary[Replica, float] = weakref.WeakKeyDictionary()

    def choose(self, candidates: Sequence[Replica], request: RequestFacts) -> Replica:
        total = 0.0
        best, best_score = candidates[0], float("-inf")
        for replica in candidates:
            score = self._score.get(replica, 0.0) + replica.weight
            self._score[replica] = score
            total += replica.weight
            if score > best_score:
                best, best_score = replica, score
        self._score[best] = best_score - total
        return best


# How long a tenant's request counts against the replica it was sent to, for
# least_outstanding by tenant (the router does not see a request end per tenant; a request's
# recent placement is what spreads a burst).
TENANT_WINDOW_SECONDS = 10.0


class _TenantPlacements:
    """Per tenant, where its requests went in the last ``window`` seconds."""

    def __init__(self, window: float, clock: Callable[[], float]) -> None:
        self.window, self.clock = window, clock
        self._sent: dict[str, deque[tuple[float, str]]] = {}

    def count(self, tenant: str, replica: Replica) -> int:
        return sum(1 for _, name in self._recent(tenant) if name == replica.name)

    def add(self, tenant: str, replica: Replica) -> None:
        self._recent(tenant).append((self.clock(), replica.name))

    def _recent(self, tenant: str) -> deque[tuple[float, str]]:
        sent = self._sent.get(tenant)
        if sent is None:
            if len(self._sent) >= 10_000:  # forget the tenants with nothing recent
                for stale in [t for t, q in self._sent.items() if not q]:
                    del self._sent[stale]
            sent = self._sent[tenant] = deque()
        since = self.clock() - self.window
        while sent and sent[0][0] < since:
            sent.popleft()
        return sent


class LeastOutstanding:
    name = "least_outstanding"

    def __init__(self, rng: random.Random | None = None, *, by_tenant: bool = False,
                 tenant_header: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rng = rng or random.Random()
        self.by_tenant, self.tenant_header = by_tenant, tenant_header
        # By tenant, the body is read for its ``user`` (when no header names the tenant).
        self.needs_body = by_tenant
        self._placements = _TenantPlacements(TENANT_WINDOW_SECONDS, clock)

    def choose(self, candidates: Sequence[Replica], request: RequestFacts) -> Replica:
        if len(candidates) == 1:
            chosen = candidates[0]
        else:
            a, b = self.rng.sample(candidates, 2)  # random order: ties do not favour the first
            chosen = a if self._key(a, request) <= self._key(b, request) else b
        if self.by_tenant and request.tenant is not None:
            self._placements.add(request.tenant, chosen)
        return chosen

    def _key(self, replica: Replica, request: RequestFacts) -> tuple[float, float]:
        mine = (self._placements.count(request.tenant, replica)
                if self.by_tenant and request.tenant is not None else 0)
        return (mine, self.cost(replica))

    @staticmethod
    def cost(replica: Replica) -> float:
        return replica.in_flight


class LatencyAware(LeastOutstanding):
    """Power of two choices on the expected wait: a slow replica gets fewer requests, a new
    one (no latency yet, cost 0) is tried at once."""

    name = "latency"

    @staticmethod
    def cost(replica: Replica) -> float:
        return replica.ewma_latency * (replica.in_flight + 1)


class ConsistentHash:
    """Rendezvous (highest random weight) hashing: each replica scores the key, the highest
    routable score wins. A replica that leaves only loses its own keys (each goes to its
    second-best), one that joins only takes the keys it now scores highest on."""

    name = "consistent_hash"
    needs_body = True  # for the `user` field when there is no X-Session-ID header

    def __init__(self, fallback: Policy | None = None, *, by_tenant: bool = False,
                 tenant_header: str | None = None) -> None:
        self.fallback = fallback or LeastOutstanding()
        self.by_tenant, self.tenant_header = by_tenant, tenant_header

    def choose(self, candidates: Sequence[Replica], request: RequestFacts) -> Replica:
        # By tenant the tenant is the key; "anonymous" is everyone, so not a key.
        key_text = request.session_key
        if self.by_tenant and request.tenant not in (None, ANONYMOUS_TENANT):
            key_text = request.tenant
        if key_text is None:
            return self.fallback.choose(candidates, request)
        key = key_text.encode()
        return max(candidates, key=lambda r: _score(key, r.name))


def _score(key: bytes, replica_name: str) -> bytes:
    return hashlib.blake2b(replica_name.encode() + b"\0" + key, digest_size=8).digest()


# -- prefix affinity ---------------------------------------------------------------------------

# Chunk sizes for prefix hashing: token ids in blocks of 16 (the KV cache's default block), text
# in blocks of 64 characters (roughly 16 tokens of English).
TOKEN_CHUNK = 16
CHAR_CHUNK = 64


def prompt_chunks(prompt: str | list[int]) -> list[int]:
    """Chained hashes of the prompt's leading full chunks: hash k covers chunks 0..k, so two
    prompts share hash k exactly when they share their first k+1 chunks (as the KV cache's
    block hashes do)."""
    size = TOKEN_CHUNK if isinstance(prompt, list) else CHAR_CHUNK
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(prompt) - size + 1, size):
        parent = hash((parent, tuple(prompt[start:start + size]) if isinstance(prompt, list)
                       else prompt[start:start + size]))
        hashes.append(parent)
    return hashes


class _PrefixMemory:
    """The chunk hashes recently sent to one replica, least recently used first, bounded."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._hashes: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hashes)

    def match(self, hashes: list[int]) -> int:
        """How many leading chunks this replica has seen."""
        count = 0
        for h in hashes:
            if h not in self._hashes:
                break
            count += 1
        return count

    def remember(self, hashes: list[int]) -> None:
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > self.capacity:
            self._hashes.popitem(last=False)


class PrefixAffinity:
    """Longest recently-sent prefix wins, as SGLang's cache-aware router does, with its
    load guard: when the busiest candidate has more than ``balance_abs`` requests more than
    the idlest *and* more than ``balance_rel`` times as many, the least loaded one gets it.
    Prompts matching less than ``min_match`` of their chunks anywhere also go to the least
    loaded (ties: the replica remembering the fewest prefixes, to spread new prefixes)."""

    name = "prefix_affinity"
    needs_body = True
    by_tenant = False
    tenant_header: str | None = None

    def __init__(self, balance_abs: int = 4, balance_rel: float = 1.5,
                 min_match: float = 0.25, capacity: int = 65536) -> None:
        self.balance_abs, self.balance_rel = balance_abs, balance_rel
        self.min_match = min_match
        self.capacity = capacity
        self._memory: weakref.WeakKeyDictionary[Replica, _PrefixMemory] = \
            weakref.WeakKeyDictionary()

    def choose(self, candidates: Sequence[Replica], request: RequestFacts) -> Replica:
        hashes = prompt_chunks(request.prompt) if request.prompt else []
        choice = self._least_loaded(candidates)
        if hashes and not self._imbalanced(candidates):
            memories = [(self._memory_of(r).match(hashes), r) for r in candidates]
            matched, best = max(memories, key=lambda m: (m[0], -m[1].in_flight))
            if matched >= self.min_match * len(hashes) and matched > 0:
                choice = best
        if hashes:
            self._memory_of(choice).remember(hashes)
        return choice

    def _imbalanced(self, candidates: Sequence[Replica]) -> bool:
        loads = [r.in_flight for r in candidates]
        low, high = min(loads), max(loads)
        return high - low > self.balance_abs and high > self.balance_rel * low

    def _least_loaded(self, candidates: Sequence[Replica]) -> Replica:
        return min(candidates, key=lambda r: (r.in_flight, len(self._memory_of(r))))

    def _memory_of(self, replica: Replica) -> _PrefixMemory:
        memory = self._memory.get(replica)
        if memory is None:
            memory = self._memory[replica] = _PrefixMemory(self.capacity)
        return memory


POLICIES: dict[str, type[Any]] = {p.name: p for p in (
    RoundRobin, Weighted, LeastOutstanding, LatencyAware, ConsistentHash, PrefixAffinity)}


TENANT_POLICIES = ("consistent_hash", "least_outstanding")


def make_policy(name: str, *, by_tenant: bool = False,
                tenant_header: str | None = None) -> Policy:
    """``by_tenant``: route by the request's tenant (the policies in ``TENANT_POLICIES``)."""
    if name not in POLICIES:
        raise ValueError(f"policy={name!r} is unknown: allowed is one of "
                         f"{', '.join(sorted(POLICIES))}")
    if by_tenant:
        if name not in TENANT_POLICIES:
            raise ValueError(f"--route-by-tenant applies to --policy "
                             f"{' or '.join(TENANT_POLICIES)}, not {name}")
        tenant_policy: Policy = POLICIES[name](by_tenant=True, tenant_header=tenant_header)
        return tenant_policy
    policy: Policy = POLICIES[name]()
    return policy
