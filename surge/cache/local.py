"""The in-process tier: an LRU of answers bounded by their encoded bytes, each with a
deadline after which it is gone."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from surge.server.response_cache import CachedAnswer

__all__ = ["LocalLRU"]


@dataclass
class _Entry:
    answer: CachedAnswer
    size: int
    expires_at: float


class LocalLRU:
    """``on_evict(reason)`` hears each entry that left before being replaced or flushed:
    ``size`` (pushed out by newer ones) or ``expired``."""

    def __init__(self, max_bytes: int, on_evict: Callable[[str], None] = lambda reason: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes={max_bytes} is invalid: allowed is an integer >= 1")
        self.max_bytes = max_bytes
        self._on_evict = on_evict
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._remove(key)
            self._on_evict("expired")
            return None
        self._entries.move_to_end(key)
        return entry.answer

    def put(self, key: str, answer: CachedAnswer, size: int, ttl: float) -> bool:
        """False when the answer alone is larger than the whole cache (not kept)."""
        if size > self.max_bytes or ttl <= 0:
            return False
        if key in self._entries:
            self._remove(key)
        self._entries[key] = _Entry(answer, size, self._clock() + ttl)
        self._bytes += size
        while self._bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self._on_evict("size")
        return True

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        self._bytes = 0
        return count

    def _remove(self, key: str) -> None:
        self._bytes -= self._entries.pop(key).size
