"""The intent router on a labelled set, with the real all-MiniLM-L6-v2: paraphrases of the
examples get their intent, unrelated messages get none; the router's decisions follow."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from surge.hub import resolve_model
from surge.models.pooling_models import TextEmbedder
from surge.stages.api import Answer, Continue, Refuse, Route, StageRequest
from surge.stages.intent import IntentRouter, load_examples

EXAMPLES = [
    ("What are your opening hours?", "hours"), ("When are you open?", "hours"),
    ("Are you open on weekends?", "hours"),
    ("How do I reset my password?", "password"), ("I forgot my password", "password"),
    ("I can't log in to my account", "password"),
    ("How do I get a refund?", "refund"), ("I want my money back", "refund"),
    ("Can I return an item I bought?", "refund"),
    ("Where is my package?", "shipping"), ("How long does delivery take?", "shipping"),
    ("Has my order shipped yet?", "shipping"),
    ("Write a poem about the sea", "creative"), ("Tell me a story about a dragon", "creative"),
    ("Compose song lyrics about love", "creative"),
    ("Fix this Python error: IndexError", "code"), ("How do I sort a list in JavaScript?",
                                                      "code"),
    ("Write a SQL query that joins two tables", "code"),
]
# Held-out messages, each with the intent a person would give it (None: none of these).
LABELLED = [
    ("what time do you open in the morning?", "hours"),
    ("what are the store hours on saturday", "hours"),
    ("when do you close today?", "hours"),
    ("my password doesn't work, how can I change it?", "password"),
    ("I'm locked out of my account", "password"),
    ("how can I get reimbursed for my purchase?", "refund"),
    ("I'd like to send this product back", "refund"),
    ("where's my parcel?", "shipping"),
    ("when will my order arrive?", "shipping"),
    ("track my shipment please", "shipping"),
    ("write a haiku about autumn leaves", "creative"),
    ("make up a bedtime story about a brave knight", "creative"),
    ("why does my python code raise a KeyError?", "code"),
    ("how to reverse a string in java", "code"),
    ("what is the capital of France?", None),
    ("explain quantum entanglement simply", None),
    ("what's the weather like tomorrow?", None),
    ("recommend a good pizza topping", None),
]


@pytest.fixture(scope="module")
def minilm() -> TextEmbedder:
    return TextEmbedder(resolve_model("all-minilm-l6-v2"))


class _Host:
    """The StageHost of a server serving MiniLM as 'minilm' and two generation models."""

    def __init__(self, embedder: TextEmbedder) -> None:
        self.embedder = embedder

    def served_models(self, task: str) -> list[str]:
        return {"embed": ["minilm"], "generate": ["big", "small"]}.get(task, [])

    async def embed(self, model: str, texts: Sequence[str]) -> list[np.ndarray]:
        assert model == "minilm"
        return list(self.embedder.embed_batch(self.embedder.tokenize(list(texts))))


def _examples_file(tmp_path: Path) -> Path:
    path = tmp_path / "examples.jsonl"
    answers = {"hours": "9 to 5", "password": "Use 'Forgot password'."}
    path.write_text("".join(json.dumps({"text": t, "intent": i, **(
        {"answer": answers[i]} if i in answers else {})}) + "\n" for t, i in EXAMPLES))
    return path


def _router(tmp_path: Path, minilm: TextEmbedder, **options: object) -> IntentRouter:
    router = IntentRouter(str(_examples_file(tmp_path)), model="minilm", **options)  # type: ignore[arg-type]
    router.setup(_Host(minilm))
    return router


def test_the_labelled_set(tmp_path: Path, minilm: TextEmbedder) -> None:
    router = _router(tmp_path, minilm, threshold=0.4)

    async def classify_all() -> list[tuple[str | None, float]]:
        return [(await router.classify(text))[:2] for text, _ in LABELLED]

    scored = asyncio.run(classify_all())
    print("\n".join(f"{s:.3f} {p} <- {t}" for (p, s), (t, _) in zip(scored, LABELLED,
                                                                      strict=True)))
    predicted = [p for p, _ in scored]
    right = [p == want for p, (_, want) in zip(predicted, LABELLED, strict=True)]
    wrong = [(text, want, p) for p, (text, want), ok
             in zip(predicted, LABELLED, right, strict=True) if not ok]
    assert sum(right) / len(right) >= 0.85, wrong
    in_scope = [p for p, (_, want) in zip(predicted, LABELLED, strict=True) if want]
    # A message with an intent is never given another intent (at worst none).
    assert all(p is None or p == want for p, (_, want) in zip(
        predicted, LABELLED, strict=True) if want), wrong
    assert sum(p is not None for p in in_scope) >= len(in_scope) - 2, wrong


def test_decisions(tmp_path: Path, minilm: TextEmbedder) -> None:
    router = _router(tmp_path, minilm, threshold=0.4, routes={
        "hours": "answer", "password": {"answer": "Reset it here."},
        "creative": {"model": "small"}, "code": "refuse"})

    def decide(text: str) -> object:
        request = StageRequest("chat", None, [{"role": "user", "content": text}], None, {},
                               None, {}, "r")
        return asyncio.run(router.before(request)), request.state

    decision, state = decide("what time do you open in the morning?")
    assert decision == Answer("9 to 5") and state["intent"] == "hours"  # type: ignore[index]
    assert decide("my password doesn't work, how can I change it?")[0] == Answer(
        "Reset it here.")
    assert decide("write a haiku about autumn leaves")[0] == Route("small")
    assert isinstance(decide("why does my python code raise a KeyError?")[0], Refuse)
    assert decide("where's my parcel?")[0] == Continue("unrouted")
    assert decide("what is the capital of France?")[0] == Continue("no_intent")


def test_options_are_checked(tmp_path: Path, minilm: TextEmbedder) -> None:
    path = _examples_file(tmp_path)
    with pytest.raises(ValueError, match="no example has"):
        IntentRouter(str(path), routes={"nope": "answer"})
    with pytest.raises(ValueError, match="have no 'answer'"):
        IntentRouter(str(path), routes={"creative": "answer"})
    with pytest.raises(ValueError, match="allowed is"):
        IntentRouter(str(path), routes={"hours": {"send": "x"}})
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        IntentRouter(str(path), threshold=1.5)
    router = IntentRouter(str(path), model="other", routes={"creative": {"model": "huge"}})
    with pytest.raises(ValueError, match="--extra-model other"):
        router.setup(_Host(minilm))
    router = IntentRouter(str(path), model="minilm", routes={"creative": {"model": "huge"}})
    with pytest.raises(ValueError, match="does not serve"):
        router.setup(_Host(minilm))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="line 1"):
        load_examples(bad)
