"""Schemathesis fuzzes every operation of the server's own OpenAPI schema: no answer is a 5xx,
and every answer matches what the schema documents. ``SURGE_FUZZ_EXAMPLES=1000`` fuzzes deeper
(60 examples per operation by default)."""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.server._helpers import ServerProcess, start_server

pytestmark = pytest.mark.slow

FUZZ_EXAMPLES = int(os.environ.get("SURGE_FUZZ_EXAMPLES", "60"))  # per operation


@pytest.fixture(scope="module")
def fuzzed_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[ServerProcess]:
    # A short context bounds the work any fuzzed request can ask for. The batch API and the
    # web apps are on (as `surge serve` has them by default), their data in a temporary folder.
    root = tmp_path_factory.mktemp("fuzz")
    server = start_server(model_dir, root, "--engine-mode", "thread", "--max-model-len", "64",
                          "--request-timeout", "20", "--batch-data-dir", str(root / "batch"),
                          "--database-url", f"sqlite:///{root / 'apps.db'}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed_server: ServerProcess) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")

# One operation of each feature the fuzzer must reach: a schema without them would pass
# while testing nothing of them.
FEATURE_PATHS = ("/v1/chat/completions", "/v1/embeddings", "/v1/files", "/v1/files/{file_id}",
                 "/v1/batches", "/v1/batches/{batch_id}/cancel", "/api/apps/chat/sessions",
                 "/api/apps/writing/generations", "/api/apps/status")


def test_the_fuzzed_schema_has_every_feature(api_schema: schemathesis.BaseSchema) -> None:
    missing = [path for path in FEATURE_PATHS if path not in api_schema.raw_schema["paths"]]
    assert not missing, f"the fuzzed server does not serve {missing}"


@pytest.mark.timeout(max(240, FUZZ_EXAMPLES))  # 500 examples take ~150 s on 2 quiet cores
@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_answers_match_the_schema(case: schemathesis.Case) -> None:
    # Every default check but positive_data_acceptance: a schema cannot say that token ids
    # must be below the vocabulary size or that a request needs a prompt *or* messages, so
    # some schema-valid requests are rightly refused with 400.
    case.call_and_validate(timeout=30,
                           excluded_checks=[schemathesis.checks.positive_data_acceptance])


# -- lone surrogates ---------------------------------------------------------------------------
# Schemathesis never generates lone UTF-16 surrogates (they cannot be encoded as UTF-8), but
# JSON can carry them as escapes ("\ud800"), and a client library or an attacker sends them.
# This run puts one into a string of every generated JSON body: a 400, never a 5xx (issue 14).

SURROGATES = ("\ud800", "\udfff", "a\udc00b", "\ud83d")


def _string_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, str):
        return [path]
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _string_paths(item, (*path, key))]
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _string_paths(item, (*path, i))]
    return []


def _with_surrogate(body: Any, path: tuple[Any, ...], surrogate: str) -> Any:
    body = copy.deepcopy(body)
    if not path:
        return surrogate
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = parent[path[-1]] + surrogate
    return body


def _surrogate_bodies(context: Any, body: Any) -> st.SearchStrategy:
    paths = _string_paths(body) if isinstance(body, dict | list) else []
    if not paths:
        return st.just(body)
    return st.builds(_with_surrogate, st.just(body), st.sampled_from(paths),
                     st.sampled_from(SURROGATES))


@pytest.fixture(scope="module")
def surrogate_schema(fuzzed_server: ServerProcess) -> schemathesis.BaseSchema:
    fuzzed = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")
    fuzzed.hook("flatmap_body")(_surrogate_bodies)
    # Only generated bodies go through the hook: the schema's own examples are the other
    # test's, and would reach the server without a surrogate.
    fuzzed.config.phases.examples.enabled = False
    fuzzed.config.phases.coverage.enabled = False
    return fuzzed


surrogate_schema_tests = schemathesis.pytest.from_fixture("surrogate_schema")


@pytest.mark.timeout(max(240, FUZZ_EXAMPLES))
@surrogate_schema_tests.include(method="POST").parametrize()
@settings(max_examples=max(20, FUZZ_EXAMPLES // 2), deadline=None,
          suppress_health_check=list(HealthCheck))
def test_lone_surrogates_in_bodies_are_never_a_server_error(case: schemathesis.Case) -> None:
    if case.media_type != "application/json":
        return  # a multipart form's text cannot carry a lone surrogate at all
    if isinstance(case.body, dict | list) and _string_paths(case.body):
        assert re.search(r"\\ud[89a-f]", json.dumps(case.body)), case.body  # it was put in
    response = case.call(timeout=30)
    assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
