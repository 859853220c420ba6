"""The built-in intent router (``--stage intent-router:{...}``): the user's message is embedded
by an embedding model this server serves (through the same dynamic batcher as
/v1/embeddings), compared with labelled examples, and the nearest example's intent decides
what happens: answer with a canned answer (FAQ), send the request to another served model
(a smaller one for easy questions), refuse it, or go on unchanged.

Examples are a JSONL file, one ``{"text": ..., "intent": ..., "answer": ...}`` a line
(``answer`` optional: an FAQ entry's reply). Options:

    examples   the JSONL file (required)
    model      the served embedding model (default all-minilm-l6-v2; add
               --extra-model all-minilm-l6-v2)
    threshold  least cosine similarity to the nearest example (default 0.5; measure
               yours: with MiniLM, paraphrases score 0.4-0.8, unrelated text under 0.35);
               below it the message has no intent and goes on unchanged
    routes     {intent: action}; action "answer" (the nearest example's answer), {"answer":
               TEXT}, {"model": NAME} or "refuse"; intents without a route go on unchanged

The examples are embedded on first use (the embedding model may still be loading when the
server starts); while the model cannot answer, requests go on unchanged (decision
``unavailable``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surge.stages.api import Answer, Continue, Refuse, Route, StageHost, StageRequest

__all__ = ["Example", "IntentIndex", "IntentRouter", "load_examples"]

logger = logging.getLogger("surge.stages.intent")

Embed = Callable[[Sequence[str]], Awaitable[list[np.ndarray]]]


@dataclass(frozen=True)
class Example:
    text: str
    intent: str
    answer: str | None = None


def load_examples(path: str | Path) -> list[Example]:
    examples = []
    lines = Path(path).expanduser().read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            example = Example(entry["text"], entry["intent"], entry.get("answer"))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"examples {path} line {number}: allowed is a JSON object with "
                             f"'text' and 'intent' strings and an optional 'answer' "
                             f"({type(exc).__name__}: {exc})") from exc
        if not all(isinstance(v, str) and v.strip() for v in (example.text, example.intent)):
            raise ValueError(f"examples {path} line {number}: 'text' and 'intent' must be "
                             "non-empty strings")
        examples.append(example)
    if not examples:
        raise ValueError(f"examples {path}: no examples (one JSON object a line)")
    return examples


def _unit_rows(vectors: Sequence[np.ndarray]) -> np.ndarray:
    matrix = np.stack([np.asarray(v, dtype=np.float32) for v in vectors])
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


class IntentIndex:
    """Nearest labelled example by cosine similarity; embeds its examples once."""

    def __init__(self, examples: Sequence[Example], embed: Embed) -> None:
        self.examples = list(examples)
        self.embed = embed
        self._matrix: np.ndarray | None = None
        self._lock = asyncio.Lock()

    async def nearest(self, text: str) -> tuple[Example, float]:
        matrix = await self._example_matrix()
        [query] = _unit_rows(await self.embed([text]))
        similarities = matrix @ query
        best = int(np.argmax(similarities))
        return self.examples[best], float(similarities[best])

    async def _example_matrix(self) -> np.ndarray:
        if self._matrix is None:
            async with self._lock:
                if self._matrix is None:
                    self._matrix = _unit_rows(await self.embed([e.text for e in self.examples]))
        return self._matrix


_ACTIONS = "'answer', {'answer': TEXT}, {'model': NAME} or 'refuse'"


class IntentRouter:
    """A pre-stage; see the module's docstring for its options."""

    def __init__(self, examples: str, model: str = "all-minilm-l6-v2",
                 threshold: float = 0.5, routes: dict[str, Any] | None = None) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold={threshold} is invalid: allowed is a cosine "
                             "similarity in (0, 1]")
        self.model = model
        self.threshold = threshold
        self.examples = load_examples(examples)
        self.routes = {intent: _check_action(intent, action, self.examples)
                       for intent, action in (routes or {}).items()}
        intents = {e.intent for e in self.examples}
        unknown = sorted(set(self.routes) - intents)
        if unknown:
            raise ValueError(f"routes name intents no example has: {unknown} (the examples' "
                             f"intents: {sorted(intents)})")
        self.index: IntentIndex | None = None

    def setup(self, host: StageHost) -> None:
        if self.model not in host.served_models("embed"):
            served = ", ".join(host.served_models("embed")) or "none"
            raise ValueError(f"model={self.model!r} is not an embedding model this server "
                             f"serves (it serves: {served}): add --extra-model {self.model}")
        generators = host.served_models("generate")
        for intent, action in self.routes.items():
            if isinstance(action, dict) and "model" in action \
                    and action["model"] not in generators:
                raise ValueError(f"routes[{intent!r}] sends to model {action['model']!r}, "
                                 f"which this server does not serve (text-generation models: "
                                 f"{', '.join(generators) or 'none'})")

        async def embed(texts: Sequence[str]) -> list[np.ndarray]:
            return await host.embed(self.model, texts)

        self.index = IntentIndex(self.examples, embed)

    async def classify(self, text: str) -> tuple[str | None, float, Example]:
        """The intent of ``text`` (None below the threshold), its similarity, the example."""
        if self.index is None:
            raise RuntimeError("IntentRouter.setup was not called")
        example, similarity = await self.index.nearest(text)
        return (example.intent if similarity >= self.threshold else None), similarity, example

    async def before(self, request: StageRequest) -> Answer | Route | Refuse | Continue | None:
        text = request.last_user_text()
        if not text or not text.strip():
            return None
        if self.index is None:
            raise RuntimeError("IntentRouter.setup was not called")
        try:
            intent, similarity, example = await self.classify(text)
        except Exception as exc:  # the embedding model loading or busy: route nothing
            logger.debug("intent router: no vector (%s: %s)", type(exc).__name__, exc)
            return Continue("unavailable")
        request.state["intent"] = intent
        request.state["intent_similarity"] = similarity
        action = self.routes.get(intent) if intent is not None else None
        if action is None:
            return Continue("no_intent" if intent is None else "unrouted")
        if action == "answer":
            return Answer(example.answer or "")
        if action == "refuse":
            return Refuse(f"requests of intent {intent!r} are not served here",
                          code="intent_refused")
        if "answer" in action:
            return Answer(action["answer"])
        return Route(action["model"])


def _check_action(intent: str, action: Any, examples: Sequence[Example]) -> Any:
    if action == "answer":
        missing = [e.text for e in examples if e.intent == intent and not e.answer]
        if missing:
            raise ValueError(f"routes[{intent!r}] is 'answer' but examples of it have no "
                             f"'answer': {missing[:3]}")
        return action
    if action == "refuse":
        return action
    if isinstance(action, dict) and len(action) == 1:
        [(key, value)] = action.items()
        if key in ("answer", "model") and isinstance(value, str) and value:
            return action
    raise ValueError(f"routes[{intent!r}]={action!r} is invalid: allowed is {_ACTIONS}")
