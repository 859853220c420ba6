"""One `surge serve` for the stage tests: the tiny LLM under two names (so a stage can route
between them), the real MiniLM for the intent router, the test stages of
``sample_stages`` (each acts only on its marker) and the three built-ins."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.server._helpers import ServerProcess, start_server

FAQ_HOURS = "We are open 9 to 5, Monday to Friday."
EXAMPLES = [
    {"text": "What are your opening hours?", "intent": "faq_hours", "answer": FAQ_HOURS},
    {"text": "When are you open?", "intent": "faq_hours", "answer": FAQ_HOURS},
    {"text": "How do I reset my password?", "intent": "faq_password",
     "answer": "Use the 'Forgot password' link on the sign-in page."},
    {"text": "Write a poem about the sea", "intent": "creative"},
    {"text": "Tell me a short story about a dragon", "intent": "creative"},
]
SCRIPT = "mail me at john.doe@example.com or 555-123-4567, darn it, more text"


@pytest.fixture(scope="session")
def stage_server(tiny_checkpoint: Callable[[str], Path],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("stages")
    examples = folder / "examples.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    router = {"examples": str(examples), "threshold": 0.7,
              "routes": {"faq_hours": "answer", "faq_password": "answer",
                         "creative": {"model": "tiny-small"}}}
    sample = "tests.stages.sample_stages"
    proc = start_server(
        tiny_checkpoint("tiny-llama"), folder, "--served-model-name", "tiny", "tiny-small",
        "--extra-model", "all-minilm-l6-v2",
        "--stage", f"{sample}:Scripted", "--stage", f"{sample}:Sleepy",
        "--stage", f"intent-router:{json.dumps(router)}",
        "--stage", "pii-redactor",
        "--stage", f"{sample}:Script:{json.dumps({'text': SCRIPT})}",
        "--stage", "pii-redactor",
        "--stage", 'output-filter:{"words": ["darn it"]}',
        "--stage", f"{sample}:Stopper")
    yield proc
    proc.stop()
