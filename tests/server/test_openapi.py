"""What `/openapi.json` promises: every error a route documents is OpenAI's error body, nothing
documents FastAPI's 422 (the server answers 400), the batch and web-app routes document the
statuses they answer, and a wrong method gets 405 naming every method the path serves.

In-process (no model, no lifespan): the schema and the 405 come from the routes alone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from surge.apps import AppsSettings, mount_apps
from surge.batch.config import BatchSettings
from surge.batch.routes import BatchFeature
from surge.server.app import ServerSettings, build_app

ERROR_REF = "#/components/schemas/ErrorResponse"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    root = tmp_path_factory.mktemp("openapi")
    built = build_app(ServerSettings(),
                      features=[BatchFeature(BatchSettings(data_dir=str(root)))])
    mount_apps(built, AppsSettings(database_url=f"sqlite:///{root / 'apps.db'}"))
    return built


@pytest.fixture(scope="module")
def schema(app: FastAPI) -> dict[str, Any]:
    return TestClient(app).get("/openapi.json").json()


def _operations(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{method.upper()} {path}": operation
            for path, item in schema["paths"].items() for method, operation in item.items()}


def test_no_route_documents_422_and_every_error_is_openai_shaped(schema: dict[str, Any]
                                                                   ) -> None:
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for name, operation in _operations(schema).items():
        assert "422" not in operation["responses"], name
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                body = response["content"]["application/json"]["schema"]
                assert body == {"$ref": ERROR_REF}, f"{name} {status}"


def test_a_route_that_validates_input_documents_400(schema: dict[str, Any]) -> None:
    operations = _operations(schema)
    for name in ("POST /v1/files", "POST /v1/batches", "GET /v1/batches",
                 "POST /api/apps/chat/sessions", "GET /api/apps/chat/sessions/{session_id}"):
        assert "400" in operations[name]["responses"], name
    # A free-text path parameter cannot be invalid: no 400 is promised for it.
    assert "400" not in operations["GET /v1/files/{file_id}"]["responses"]


@pytest.mark.parametrize(("operation", "statuses"), [
    ("POST /v1/files", {"200", "400", "401", "413"}),
    ("DELETE /v1/files/{file_id}", {"200", "401", "404", "409"}),
    ("GET /v1/files/{file_id}/content", {"200", "401", "404"}),
    ("POST /v1/batches/{batch_id}/cancel", {"200", "401", "404", "409"}),
    ("POST /api/apps/chat/sessions/{session_id}/messages",
     {"200", "400", "401", "404", "409", "413", "429", "502", "503", "504"}),
    ("GET /api/apps/config", {"200", "400"}),
])
def test_routes_document_what_they_answer(schema: dict[str, Any], operation: str,
                                          statuses: set[str]) -> None:
    assert statuses <= set(_operations(schema)[operation]["responses"])


def test_streams_document_one_event_per_item(schema: dict[str, Any]) -> None:
    operations = _operations(schema)
    for name in ("POST /v1/chat/completions",
                 "POST /api/apps/chat/sessions/{session_id}/messages"):
        stream = operations[name]["responses"]["200"]["content"]["text/event-stream"]
        assert stream["schema"]["required"] == ["data"], name


def test_file_content_is_documented_as_json_lines(schema: dict[str, Any]) -> None:
    content = _operations(schema)["GET /v1/files/{file_id}/content"]["responses"]["200"]
    assert list(content["content"]) == ["application/jsonl"]


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", "/v1/files/file-1", "DELETE, GET"),
    ("PATCH", "/v1/files", "GET, POST"),
    ("GET", "/v1/chat/completions", "POST"),
    ("POST", "/api/apps/chat/sessions/abc", "DELETE, GET"),
])
def test_405_names_every_method_of_the_path(app: FastAPI, method: str, path: str,
                                            allowed: str) -> None:
    response = TestClient(app).request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    assert response.json()["error"]["message"] == (
        f"{method} is not allowed on {path}: allowed is {allowed}")


def test_the_schema_is_built_once(app: FastAPI) -> None:
    assert app.openapi() is app.openapi()


def test_tests_keep_their_data_in_a_temporary_folder(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # tests/conftest.py points SURGE_DATA_DIR there, so no test writes to ~/.local/share/surge.
    data_dir = Path(os.environ["SURGE_DATA_DIR"])
    assert data_dir.is_relative_to(tmp_path_factory.getbasetemp())
