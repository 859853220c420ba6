"""Schemathesis fuzzes every operation of the server's own OpenAPI schema: no answer is a 5xx,
and every answer matches what the schema documents. ``SURGE_FUZZ_EXAMPLES=1000`` fuzzes deeper
(60 examples per operation by default)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

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
