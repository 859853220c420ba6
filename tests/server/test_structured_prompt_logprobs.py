"""Prompt logprobs over HTTP, as lm-evaluation-harness's local-completions asks for them
(``echo`` + ``logprobs`` + ``max_tokens`` 0 or 1) and as vLLM returns ``prompt_logprobs``;
the loglikelihoods equal the offline engine's."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from surge import LLM, SamplingParams

PROMPT = "The capital of France is Paris"


def _tokens(client: httpx.Client, text: str) -> list[int]:
    return client.post("/tokenize", json={"model": "tiny", "prompt": text}).json()["tokens"]


@pytest.mark.timeout(120)
def test_echo_logprobs_max_tokens_0_scores_the_prompt_like_the_offline_engine(
        client: httpx.Client, model_dir: Path) -> None:
    body = {"model": "tiny", "prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0,
            "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    ids = _tokens(client, PROMPT)
    logprobs = choice["logprobs"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] == 0
    assert len(logprobs["tokens"]) == len(ids) and logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None and len(logprobs["top_logprobs"][1]) <= 2
    offline = LLM(model_dir).generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1),
                                      use_tqdm=False)[0].prompt_logprobs
    assert logprobs["token_logprobs"][1:] == pytest.approx(
        [entry.logprob for entry in offline[1:]], abs=1e-3)


@pytest.mark.timeout(60)
def test_echo_logprobs_max_tokens_1_adds_the_generated_token(client: httpx.Client) -> None:
    body = {"model": "tiny", "prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 1,
            "temperature": 0}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    num_prompt = len(_tokens(client, PROMPT))
    assert len(choice["logprobs"]["token_logprobs"]) == num_prompt + 1
    assert all(lp <= 0 for lp in choice["logprobs"]["token_logprobs"][1:])
    assert choice["text"].startswith(PROMPT)


@pytest.mark.timeout(60)
def test_vllm_prompt_logprobs(client: httpx.Client) -> None:
    body = {"model": "tiny", "prompt": PROMPT, "prompt_logprobs": 2, "max_tokens": 2}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    ids = _tokens(client, PROMPT)
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for token_id, entry in zip(ids[1:], entries[1:], strict=True):
        assert str(token_id) in entry and 2 <= len(entry) <= 3
        assert {e["rank"] for e in entry.values()} >= {1, 2}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra, param", [
    ({"echo": True, "logprobs": 1, "stream": True}, "stream"),
    ({"echo": True, "max_tokens": 0, "stream": True}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_unsupported_combinations_are_400(client: httpx.Client, extra: dict,
                                          param: str) -> None:
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", **extra})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


@pytest.mark.timeout(60)
def test_chat_refuses_prompt_logprobs_by_name(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
        "prompt_logprobs": 1})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt_logprobs"
