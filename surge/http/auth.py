"""API keys and per-key rate limits.

``ApiKeyAuth`` checks ``Authorization: Bearer <key>`` against the configured keys in constant
time and names the caller by a key id (``key0``, ``key1``, ... in the order given), never by the
key itself, so ids can go into logs and metrics. ``RateLimiter`` gives each key id two token
buckets, one counting requests and one counting tokens, each refilled continuously up to one
minute's allowance.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ApiKeyAuth", "AuthError", "RateLimited", "RateLimiter"]

_BEARER = "bearer"
# Buckets kept at most; the least recently used beyond this is dropped (it would be refilled by
# now anyway, or nearly). Key ids come from the configured keys, so this is only a safety net.
MAX_TRACKED_KEYS = 10_000


class AuthError(Exception):
    """Missing or wrong API key: answer 401 with this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ApiKeyAuth:
    """Accepts a request whose bearer token equals one of ``keys``; with no keys, accepts all."""

    def __init__(self, keys: list[str]) -> None:
        for index, key in enumerate(keys):
            if not isinstance(key, str) or not key.strip():
                raise ValueError(f"API key #{index} is empty; pass a non-empty --api-key value")
        # Compare fixed-length digests, not the keys: compare_digest on unequal lengths returns
        # early, which would reveal a key's length.
        self._key_digests = [_digest(key) for key in keys]
        # Who owns stored things (batch files, batches): stable across restarts and replicas,
        # unlike the key id (its position in --api-key), and not the key itself.
        self._owners = [hashlib.sha256(b"surge-owner\0" + key.encode()).hexdigest()[:32]
                        for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._key_digests)

    def authenticate(self, authorization: str | None) -> str | None:
        """The key id for an ``Authorization`` header value; None when auth is off."""
        if not self._key_digests:
            return None
        token = _bearer_token(authorization)
        offered = _digest(token)
        matched: int | None = None
        # Look at every key even after a match, so the time taken does not say which one.
        for index, digest in enumerate(self._key_digests):
            if hmac.compare_digest(offered, digest) and matched is None:
                matched = index
        if matched is None:
            raise AuthError("Incorrect API key provided.")
        return f"key{matched}"


    def owner(self, key_id: str | None) -> str:
        """The owner name of what the caller with ``key_id`` stores; ``""`` when auth is off
        (one namespace for everyone)."""
        if key_id is None:
            return ""
        return self._owners[int(key_id.removeprefix("key"))]


class RateLimited(Exception):
    """A key used up its requests or tokens per minute: answer 429 with Retry-After."""

    def __init__(self, limit: str, retry_after: int, message: str) -> None:
        super().__init__(message)
        self.limit = limit  # "requests" or "tokens"
        self.retry_after = retry_after
        self.message = message


@dataclass
class _Bucket:
    """Holds up to ``capacity`` units, refilled at ``capacity`` per minute."""

    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        elapsed = max(now - self.updated, 0.0)
        self.level = min(self.capacity, self.level + elapsed * self.capacity / 60.0)
        self.updated = now

    def seconds_until(self, amount: float) -> float:
        return max(amount - self.level, 0.0) * 60.0 / self.capacity


class RateLimiter:
    """Token buckets per key id, for requests per minute and tokens per minute.

    A request is charged 1 request and ``num_tokens`` tokens (prompt plus max_tokens) up front,
    and only if both buckets can pay: a refused request costs nothing.
    """

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        *,
        time_fn: Callable[[], float] = time.monotonic,
    ) -> None:
        _require_positive_or_none("requests_per_minute", requests_per_minute)
        _require_positive_or_none("tokens_per_minute", tokens_per_minute)
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._time_fn = time_fn
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str | None, tuple[_Bucket | None, _Bucket | None]] = (
            OrderedDict())

    @property
    def enabled(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    def check(self, key_id: str | None, num_tokens: int) -> None:
        """Charge one request of ``num_tokens`` tokens to ``key_id``, or raise RateLimited."""
        if not self.enabled:
            return
        who = "this server" if key_id is None else f"API key {key_id}"
        self._refuse_impossible(who, num_tokens)
        with self._lock:
            now = self._time_fn()
            requests, tokens = self._buckets_for(key_id, now)
            for bucket in (requests, tokens):
                if bucket is not None:
                    bucket.refill(now)
            self._require(requests, 1, "requests", who)
            self._require(tokens, num_tokens, "tokens", who)
            if requests is not None:
                requests.level -= 1
            if tokens is not None:
                tokens.level -= num_tokens

    def _refuse_impossible(self, who: str, num_tokens: int) -> None:
        # A request larger than a full minute's allowance could never pass; say so rather than
        # have the client retry forever.
        limit = self.tokens_per_minute
        if limit is not None and num_tokens > limit:
            raise RateLimited(
                "tokens", 60,
                f"Request needs {num_tokens} tokens (prompt + max_tokens) but {who} is limited "
                f"to {limit} tokens per minute; lower max_tokens or shorten the prompt.")

    def _require(self, bucket: _Bucket | None, amount: int, limit: str, who: str) -> None:
        if bucket is None or bucket.level >= amount:
            return
        retry_after = max(1, math.ceil(bucket.seconds_until(amount)))
        raise RateLimited(
            limit, retry_after,
            f"Rate limit reached for {who}: {int(bucket.capacity)} {limit} per minute. "
            f"Retry after {retry_after} s.")

    def _buckets_for(
        self, key_id: str | None, now: float
    ) -> tuple[_Bucket | None, _Bucket | None]:
        buckets = self._buckets.get(key_id)
        if buckets is None:
            buckets = (_new_bucket(self.requests_per_minute, now),
                       _new_bucket(self.tokens_per_minute, now))
            self._buckets[key_id] = buckets
            if len(self._buckets) > MAX_TRACKED_KEYS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key_id)
        return buckets


def _bearer_token(authorization: str | None) -> str:
    if not authorization or not authorization.strip():
        raise AuthError(
            "Missing API key: send the header 'Authorization: Bearer <your key>' "
            "(the openai client does this with api_key=...).")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != _BEARER or not token.strip():
        raise AuthError(
            "Malformed Authorization header: expected 'Authorization: Bearer <your key>'.")
    return token.strip()


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _new_bucket(per_minute: int | None, now: float) -> _Bucket | None:
    # Buckets start full: a new key may spend a whole minute's allowance at once.
    return None if per_minute is None else _Bucket(per_minute, per_minute, now)


def _require_positive_or_none(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1 or None (no limit), got {value!r}")
