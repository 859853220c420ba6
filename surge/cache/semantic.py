"""The semantic tier: a chat request whose last user message means the same as one answered
before (cosine similarity of their embeddings at or above the threshold) gets that answer.

Entries are scoped, and a scope must match exactly: the tenant, the model and its version,
every sampling field, and every message but the last user one (the system prompt and the
earlier turns). Only the last user message is compared by meaning. Vectors come from an
embedding model this server serves, through the same dynamic batcher as /v1/embeddings.

Mean-pooled sentence embeddings barely see word order, so "convert a string to an integer"
and "convert an integer to a string" score 0.996 with all-MiniLM-L6-v2. A match above the
threshold is therefore also refused when the two texts name the same two things on either
side of a directional word ("to", "from", "than", ...) in opposite order (``roles_swapped``).

With Redis, each scope's vectors are one Redis list (shared by every replica, searched here);
without it, an in-process index bounded per scope and by the TTL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from surge.cache.shared import RedisTier

__all__ = ["SCOPES", "SemanticIndex", "SemanticSettings", "compared_text", "roles_swapped",
           "scope_of"]

# What is compared by meaning: the last user message (every earlier message must match
# exactly), or the whole conversation (only the system and developer messages must match).
SCOPES = ("last", "conversation")
_INSTRUCTIONS = ("system", "developer")

Embed = Callable[[str], Awaitable[np.ndarray | None]]


@dataclass(frozen=True)
class SemanticSettings:
    model: str = "all-minilm-l6-v2"
    threshold: float = 0.9
    max_entries_per_scope: int = 1000
    max_local_scopes: int = 10_000  # without Redis: the oldest scope goes past this many
    compare: str = "last"

    def __post_init__(self) -> None:
        if self.compare not in SCOPES:
            raise ValueError(f"--semantic-compare={self.compare!r} is invalid: allowed is one "
                             f"of {', '.join(SCOPES)}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"--semantic-threshold={self.threshold} is invalid: allowed is a "
                             "cosine similarity in (0, 1]")


def compared_text(messages: list[dict[str, Any]] | None, compare: str = "last"
                  ) -> tuple[str, list[dict[str, Any]]] | None:
    """The text compared by meaning and the messages that must match exactly; None when the
    conversation does not end with a user's text."""
    if not messages or messages[-1].get("role") != "user" or not _text(messages[-1]).strip():
        return None
    if compare == "last":
        return _text(messages[-1]), messages[:-1]
    said = [m for m in messages if m.get("role") not in _INSTRUCTIONS]
    return ("\n".join(f"{m.get('role')}: {_text(m)}" for m in said),
            [m for m in messages if m.get("role") in _INSTRUCTIONS])


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def scope_of(tenant: str, exact_material: dict[str, Any],
             earlier: list[dict[str, Any]]) -> str:
    """What must match exactly for two requests to share answers by meaning."""
    material = {"tenant": tenant, "exact": exact_material, "earlier": earlier}
    encoded = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


# Words that give the things on their two sides different roles: swapping those things
# changes the question ("Celsius to Fahrenheit", "faster than Java"). Symmetric words
# ("and", "or", "between") are not here, and neither are places ("in", "on", "with"):
# "in Python, how do I sort a list" is still the same question.
_DIRECTIONAL = frozenset({"to", "into", "onto", "from", "than", "before", "after", "vs",
                          "versus", "towards", "toward"})
# Words that name nothing: skipped when looking for the things a directional word relates.
_FUNCTION_WORDS = frozenset({
    "a", "an", "the", "i", "me", "my", "we", "our", "you", "your", "it", "its", "this", "that",
    "these", "those", "is", "are", "was", "were", "be", "been", "do", "does", "did", "can",
    "could", "should", "would", "will", "how", "what", "why", "when", "where", "which", "who",
    "of", "and", "or", "as", "some", "any", "way", "best", "there", "here", "not", "no"})
# Where the things a directional word relates end: punctuation, and words that open a phrase
# of setting rather than of role ("... to a string in Python", "In Linux, copy ... to ...").
_BOUNDARIES = frozenset({",", ";", ":", "?", "!", ".", "(", ")", "in", "on", "at", "for",
                         "with", "using", "by", "via", "within", "inside", "without"})
_TOKEN = re.compile(r"[a-z0-9+#]+(?:[.'][a-z0-9+#]+)*|[,;:?!.()]")


def roles_swapped(first: str, second: str) -> bool:
    """Whether the two texts relate the same two things in opposite directions by the same
    directional word: u before "to" before v in one text, v before "to" before u in the
    other. "From MySQL to PostgreSQL" and "to PostgreSQL from MySQL" are not swapped."""
    first_relations = _relations(first)
    if not first_relations:
        return False
    return any((v, word, u) in first_relations for u, word, v in _relations(second))


# Content words looked at on each side of a directional word: a clause's worth, which also
# bounds the work on a long text to a constant per directional word.
_RELATION_REACH = 6


def _relations(text: str) -> set[tuple[str, str, str]]:
    """(u, word, v) for content words u before and v after a directional word."""
    words = _TOKEN.findall(text.lower())
    relations: set[tuple[str, str, str]] = set()
    for at, word in enumerate(words):
        if word not in _DIRECTIONAL:
            continue
        before = _content(reversed(words[:at]))
        after = _content(words[at + 1:])
        relations.update((u, word, v) for u in before for v in after if u != v)
    return relations


def _content(words: Iterable[str]) -> list[str]:
    """The first few words that name something, in the order given, up to a boundary."""
    found: list[str] = []
    for word in words:
        if word in _BOUNDARIES:
            break
        if word not in _FUNCTION_WORDS and word not in _DIRECTIONAL:
            found.append(word)
            if len(found) == _RELATION_REACH:
                break
    return found


@dataclass
class _Item:
    vector: np.ndarray
    key: str
    expires_at: float  # wall clock, as Redis entries carry it
    text: str | None = None  # what was compared; None in entries written before it was kept


class SemanticIndex:
    def __init__(self, settings: SemanticSettings, embed: Embed, ttl: float,
                 shared: RedisTier | None = None, key_prefix: str = "") -> None:
        self.settings = settings
        self.embed = embed
        self.ttl = ttl
        self.shared = shared
        self.key_prefix = key_prefix + "sem:"
        self._local: dict[str, list[_Item]] = {}

    async def nearest(self, scope: str, vector: np.ndarray, text: str | None = None
                      ) -> tuple[str, float] | None:
        """The exact key of the most similar entry of ``scope`` at or above the threshold
        whose roles are not swapped against ``text``, and its similarity. Raises
        SharedTierDown when Redis does not answer."""
        items = [i for i in await self._items(scope) if i.vector.shape == vector.shape]
        if not items:
            return None
        similarities = np.stack([item.vector for item in items]) @ vector
        for best in np.argsort(-similarities):
            if similarities[best] < self.settings.threshold:
                return None
            item = items[int(best)]
            if text is None or item.text is None or not roles_swapped(text, item.text):
                return item.key, float(similarities[best])
        return None

    async def add(self, scope: str, vector: np.ndarray, key: str, text: str | None = None
                  ) -> None:
        item = _Item(vector, key, time.time() + self.ttl, text)
        if self.shared is None:
            items = [i for i in self._local.get(scope, []) if i.key != key]
            items.append(item)
            self._local.pop(scope, None)  # re-inserted last: the most recently written
            self._local[scope] = items[-self.settings.max_entries_per_scope:]
            while len(self._local) > self.settings.max_local_scopes:
                del self._local[next(iter(self._local))]
            return
        await self.shared.push(self.key_prefix + scope, _encode(item),
                               self.settings.max_entries_per_scope, self.ttl)

    def clear(self) -> None:
        self._local.clear()

    async def _items(self, scope: str) -> list[_Item]:
        now = time.time()
        if self.shared is None:
            items = [i for i in self._local.get(scope, []) if i.expires_at > now]
            if items:
                self._local[scope] = items
            else:
                self._local.pop(scope, None)
            return items
        raw = await self.shared.range(self.key_prefix + scope)
        return [item for item in map(_decode, raw) if item is not None and item.expires_at > now]


def unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def _encode(item: _Item) -> bytes:
    return msgspec.json.encode({"key": item.key, "exp": item.expires_at, "text": item.text,
                                "vec": base64.b64encode(item.vector.tobytes()).decode()})


def _decode(raw: bytes) -> _Item | None:
    """An entry, or None for one this version cannot read (skipped, never an error)."""
    try:
        entry = msgspec.json.decode(raw)
        vector = np.frombuffer(base64.b64decode(entry["vec"]), dtype=np.float32)
        text = entry.get("text")
        return _Item(vector, str(entry["key"]), float(entry["exp"]),
                     text if isinstance(text, str) else None)
    except (msgspec.DecodeError, KeyError, TypeError, ValueError):
        return None
