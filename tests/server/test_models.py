"""The served-models authority: one answer to "which model?" for every endpoint family."""

from __future__ import annotations

import pytest

from surge.http.errors import APIError
from surge.server.models import ServedModel, ServedModels


def _models() -> ServedModels:
    models = ServedModels()
    for name, task in [("llm", "generate"), ("minilm", "embed"), ("resnet", "classify")]:
        models.add(ServedModel(name, task, target=f"runs {name}", root=lambda: None,
                               max_model_len=lambda: 7))
    return models


def test_a_request_gets_the_named_model_or_the_first_of_its_task() -> None:
    models = _models()
    assert models.resolve("minilm", "embed").target == "runs minilm"
    assert models.resolve(None, "classify").name == "resnet"
    assert [card["id"] for card in models.cards()] == ["llm", "minilm", "resnet"]
    assert models.cards()[0]["root"] == "llm" and models.cards()[0]["max_model_len"] == 7


@pytest.mark.parametrize(("name", "task", "status", "code", "fragment"), [
    ("nope", "generate", 404, "model_not_found", "'nope' does not exist"),
    ("minilm", "generate", 400, "model_not_supported", "is an embedding model"),
    ("llm", "classify", 400, "model_not_supported", "models that can: 'resnet'"),
])
def test_a_wrong_model_is_refused_naming_what_is_served(name: str, task: str, status: int,
                                                        code: str, fragment: str) -> None:
    with pytest.raises(APIError) as caught:
        _models().resolve(name, task)  # type: ignore[arg-type]
    error = caught.value
    assert (error.status, error.code, error.param) == (status, code, "model")
    assert fragment in error.message


def test_no_model_of_the_task_lists_what_the_server_has() -> None:
    models = ServedModels()
    models.add(ServedModel("minilm", "embed", None, root=lambda: None,
                           max_model_len=lambda: None))
    with pytest.raises(APIError) as caught:
        models.resolve(None, "generate")
    assert caught.value.status == 404
    assert "serves no text-generation model" in caught.value.message
    assert "'minilm' (embedding)" in caught.value.message


def test_a_name_used_twice_is_refused() -> None:
    models = _models()
    with pytest.raises(ValueError, match="'llm' is used twice"):
        models.add(ServedModel("llm", "embed", None, root=lambda: None,
                               max_model_len=lambda: None))
