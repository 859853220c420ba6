"""The one authority on what a server serves: model name -> task and what runs it (the LLM
engine, or an embedding or classification pool), after vLLM's ``OpenAIServingModels``.

Endpoint families and features register their models here; ``/v1/models``, ``/health`` and
every route's "which model?" read it. ``resolve`` is the one place that says "model not
served" (404) or "that model does another task" (400).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from surge.http.errors import APIError
from surge.models.tasks import Task

__all__ = ["ENDPOINT_OF", "TASK_WORDS", "ServedModel", "ServedModels"]

TASK_WORDS: dict[str, str] = {"generate": "text-generation", "embed": "embedding",
                              "classify": "image-classification"}
ENDPOINT_OF: dict[str, str] = {"generate": "/v1/completions and /v1/chat/completions",
                               "embed": "/v1/embeddings", "classify": "/v1/classify"}


@dataclass(frozen=True)
class ServedModel:
    """One name clients may send as ``model``.

    ``target`` is what runs it (the engine client, a pool's model); ``root`` and
    ``max_model_len`` fill its ``/v1/models`` card (None until known: the model loads)."""

    name: str
    task: Task
    target: Any
    root: Callable[[], str | None]
    max_model_len: Callable[[], int | None]


class ServedModels:
    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self._readiness: list[Callable[[], None]] = []
        self.created = int(time.time())

    def add(self, model: ServedModel) -> None:
        if model.name in self._models:
            raise ValueError(f"the model name {model.name!r} is used twice: give each model "
                             "its own name (--served-model-name, --extra-model NAME=PATH)")
        self._models[model.name] = model

    def add_readiness(self, check: Callable[[], None]) -> None:
        """``check`` raises an APIError (503) while its models cannot answer."""
        self._readiness.append(check)

    def check_ready(self) -> None:
        """503 unless every served model can answer now (``/health``)."""
        for check in self._readiness:
            check()

    def can(self, task: Task) -> bool:
        return any(model.task == task for model in self._models.values())

    def names(self, task: Task | None = None) -> list[str]:
        return [name for name, model in self._models.items()
                if task is None or model.task == task]

    def cards(self) -> list[dict[str, Any]]:
        """``GET /v1/models`` entries."""
        return [{"id": model.name, "object": "model", "created": self.created,
                 "owned_by": "surge", "root": model.root() or model.name,
                 "max_model_len": model.max_model_len(), "task": model.task}
                for model in self._models.values()]

    def resolve(self, name: str | None, task: Task) -> ServedModel:
        """The model a request for ``task`` names (None: the first of that task), or the
        error that says what this server serves instead."""
        word = TASK_WORDS[task]
        if name is None:
            for model in self._models.values():
                if model.task == task:
                    return model
            raise APIError(404, f"this server serves no {word} model; it serves "
                           f"{self._served_list()}", param="model", code="model_not_found")
        model = self._models.get(name)
        if model is None:
            raise APIError(404, f"The model '{name}' does not exist: this server serves "
                           f"{self._served_list()} (GET /v1/models)", param="model",
                           code="model_not_found")
        if model.task != task:
            suitable = ", ".join(repr(n) for n in self.names(task)) or "none on this server"
            other = TASK_WORDS[model.task]
            raise APIError(400, f"the model '{name}' is {_a(other)} model (use "
                           f"{ENDPOINT_OF[model.task]}); models that can: {suitable}",
                           param="model", code="model_not_supported")
        return model

    def _served_list(self) -> str:
        return ", ".join(f"'{name}' ({TASK_WORDS[model.task]})"
                         for name, model in self._models.items()) or "no models"


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"
