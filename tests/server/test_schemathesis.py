"""Schemathesis fuzzes every operation of the server's own OpenAPI schema: no answer is a 5xx,
and every answer matches what the schema documents."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.server._helpers import ServerProcess, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzzed_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[ServerProcess]:
    # A short context bounds the work any fuzzed request can ask for.
    server = start_server(model_dir, tmp_path_factory.mktemp("fuzz"), "--engine-mode",
                          "thread", "--max-model-len", "64", "--request-timeout", "20")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed_server: ServerProcess) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.timeout(240)
@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_answers_match_the_schema(case: schemathesis.Case) -> None:
    # Every default check but positive_data_acceptance: a schema cannot say that token ids
    # must be below the vocabulary size or that a request needs a prompt *or* messages, so
    # some schema-valid requests are rightly refused with 400.
    case.call_and_validate(timeout=30,
                           excluded_checks=[schemathesis.checks.positive_data_acceptance])
