"""`POST /v1/embeddings` on a real `surge serve`: the official openai client (float and base64),
OpenAI's input forms, batching across requests, clear 4xx for bad input, several models in one
server, the queue bound (429) and a client hanging up (its items leave the queue)."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from surge.hub import resolve_model
from surge.models.pooling_models import TextEmbedder
from tests.server._helpers import ServerProcess, metric_value, start_server

MINILM = "all-minilm-l6-v2"
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "The stock market fell sharply on Tuesday.", "hi"]


@pytest.fixture(scope="module")
def local_minilm() -> TextEmbedder:
    return TextEmbedder(resolve_model(MINILM))


@pytest.fixture
def http(pool_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pool_server.url, timeout=60.0) as client:
        yield client


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_openai_client_float_and_base64(pool_server: ServerProcess,
                                        local_minilm: TextEmbedder) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{pool_server.url}/v1", api_key="unused", timeout=60)
    as_float = client.embeddings.create(model=MINILM, input=SENTENCES, encoding_format="float")
    # Without encoding_format the client asks for base64 and decodes it itself.
    decoded = client.embeddings.create(model=MINILM, input=SENTENCES)
    expected = np.stack(local_minilm.embed_batch(local_minilm.tokenize(SENTENCES)))
    assert [d.index for d in as_float.data] == [0, 1, 2, 3]
    np.testing.assert_allclose(np.array([d.embedding for d in as_float.data]), expected,
                               atol=1e-5)
    np.testing.assert_allclose(np.array([d.embedding for d in decoded.data]), expected,
                               atol=1e-5)
    assert as_float.model == MINILM
    num_tokens = sum(len(ids) for ids in local_minilm.tokenize(SENTENCES))
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == num_tokens


def test_base64_is_little_endian_float32(http: httpx.Client) -> None:
    as_float = http.post("/v1/embeddings", json={"input": "hello"}).json()
    raw = http.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (384,)
    np.testing.assert_array_equal(vector, np.float32(as_float["data"][0]["embedding"]))


def test_paraphrases_are_closer_than_unrelated_sentences(http: httpx.Client) -> None:
    data = http.post("/v1/embeddings", json={"input": SENTENCES[:3]}).json()["data"]
    a, b, c = (np.array(d["embedding"]) for d in data)
    assert a @ b > a @ c + 0.3


def test_concurrent_requests_are_batched_and_equal_single_results(
        pool_server: ServerProcess, local_minilm: TextEmbedder) -> None:
    texts = [f"sentence number {i} about serving models" for i in range(32)]
    before = httpx.get(f"{pool_server.url}/metrics", timeout=10).text

    async def send_all() -> list[list[float]]:
        async with httpx.AsyncClient(base_url=pool_server.url, timeout=60) as client:
            responses = await asyncio.gather(*(
                client.post("/v1/embeddings", json={"input": t, "model": MINILM})
                for t in texts))
        return [r.json()["data"][0]["embedding"] for r in responses]

    got = np.array(asyncio.run(send_all()))
    expected = np.stack([local_minilm.embed_batch([ids])[0]
                         for ids in local_minilm.tokenize(texts)])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    after = httpx.get(f"{pool_server.url}/metrics", timeout=10).text

    def gained(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    batches = gained("surge:batch_size_count", model_name=MINILM)
    assert gained("surge:batch_size_sum", model_name=MINILM) == 32
    assert batches < 32  # some requests shared a model call
    assert gained("surge:batch_queue_time_seconds_count", model_name=MINILM) == 32
    assert gained("surge:batch_compute_time_seconds_count", model_name=MINILM) == batches


def test_token_id_inputs_and_truncation(http: httpx.Client,
                                        local_minilm: TextEmbedder) -> None:
    ids = local_minilm.tokenize(["hello world"])[0]
    by_ids = http.post("/v1/embeddings", json={"input": [ids, ids]}).json()
    by_text = http.post("/v1/embeddings", json={"input": "hello world"}).json()
    np.testing.assert_allclose(by_ids["data"][1]["embedding"], by_text["data"][0]["embedding"],
                               atol=1e-6)
    long_text = "word " * 400
    cut = http.post("/v1/embeddings", json={"input": long_text, "truncate_prompt_tokens": 16})
    assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == 16


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"input": "word " * 400}, 400, "maximum input length is 256 tokens"),
    ({"input": "hi", "truncate_prompt_tokens": 1000}, 400, "allowed is 1 to 256"),
    ({"input": "hi", "dimensions": 64}, 400, "384-dimensional"),
    ({"input": []}, 400, "empty list"),
    ({"input": ["ok", ""]}, 400, "'input[1]' is an empty string"),
    ({"input": ["ok", 3]}, 400, "not mixed"),
    ({"input": [[1, 2], [99999999]]}, 400, "unknown token ids"),
    ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
    ({}, 400, "'input' is required"),
    ({"input": "hi", "model": "nope"}, 404, "'nope' does not exist"),
    ({"input": "hi", "model": "resnet"}, 400, "is an image-classification model"),
])
def test_bad_requests_get_clear_errors(http: httpx.Client, body: dict, status: int,
                                       fragment: str) -> None:
    assert fragment in _error(http.post("/v1/embeddings", json=body), status)["message"]


def test_several_models_are_listed_and_chosen_by_name(http: httpx.Client) -> None:
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert {name: c["task"] for name, c in cards.items()} == {
        MINILM: "embed", "tiny-bert": "embed", "resnet": "classify", "vit": "classify"}
    assert cards[MINILM]["max_model_len"] == 256
    tiny = http.post("/v1/embeddings", json={"input": "hello", "model": "tiny-bert"}).json()
    assert tiny["model"] == "tiny-bert" and len(tiny["data"][0]["embedding"]) == 64
    default = http.post("/v1/embeddings", json={"input": "hello"}).json()
    assert default["model"] == MINILM  # the first embedding model when none is named


def test_generation_routes_say_what_this_server_serves(http: httpx.Client) -> None:
    message = _error(http.post("/v1/completions", json={"prompt": "hi", "model": MINILM}),
                     400)["message"]
    assert "embedding model" in message and "none on this server" in message
    message = _error(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}]}), 404)["message"]
    assert "serves no text-generation model" in message and "'resnet'" in message
    assert http.post("/tokenize", json={"prompt": "hi"}).status_code == 404
    assert http.get("/health").status_code == 200


@pytest.fixture(scope="module")
def slow_window_server(tiny_checkpoint: Callable[[str], Path],
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Batches wait 2 s for company and at most 2 inputs may wait: queues stay observable."""
    proc = start_server(tiny_checkpoint("tiny-bert"), tmp_path_factory.mktemp("slow_window"),
                        "--served-model-name", "bert", "--max-batch-wait-ms", "2000",
                        "--max-batch-queue", "2")
    yield proc
    proc.stop()


def _wait_for_metric(server: ServerProcess, name: str, value: float, **labels: str) -> None:
    for _ in range(200):  # polling /metrics, bounded (about 10 s)
        text = httpx.get(f"{server.url}/metrics", timeout=5).text
        if metric_value(text, name, **labels) == value:
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"{name}{labels} never reached {value}")


def test_full_queue_answers_429_with_retry_after(slow_window_server: ServerProcess) -> None:
    url = slow_window_server.url
    first: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: first.append(httpx.post(
        f"{url}/v1/embeddings", json={"input": ["a", "b"]}, timeout=30)))
    sender.start()
    _wait_for_metric(slow_window_server, "surge:batch_queue_depth", 2, model_name="bert")
    refused = httpx.post(f"{url}/v1/embeddings", json={"input": "c"}, timeout=10)
    assert refused.status_code == 429, refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "limit 2" in refused.json()["error"]["message"]
    sender.join(30)
    assert first[0].status_code == 200  # the queued request was served after its window


def test_a_client_that_hangs_up_leaves_the_queue(slow_window_server: ServerProcess) -> None:
    url = slow_window_server.url
    before = httpx.get(f"{url}/metrics", timeout=5).text
    with pytest.raises(httpx.ReadTimeout):  # gives up long before the 2 s window ends
        httpx.post(f"{url}/v1/embeddings", json={"input": "bye"}, timeout=0.5)
    cancelled = metric_value(before, "surge:batch_items_rejected_total", model_name="bert",
                             reason="cancelled") + 1
    _wait_for_metric(slow_window_server, "surge:batch_items_rejected_total", cancelled,
                     model_name="bert", reason="cancelled")
    after = httpx.get(f"{url}/metrics", timeout=5).text
    assert metric_value(after, "surge:batch_queue_depth", model_name="bert") == 0
    # It never reached the model.
    assert (metric_value(after, "surge:batch_size_sum", model_name="bert")
            == metric_value(before, "surge:batch_size_sum", model_name="bert"))


def test_a_lone_request_waits_for_the_window(slow_window_server: ServerProcess) -> None:
    response = httpx.post(f"{slow_window_server.url}/v1/embeddings", json={"input": "x"},
                          timeout=30)
    assert response.status_code == 200
    # max_wait_ms honoured through the whole server: about 2 s, not 0 and not much more.
    assert 1.9 <= response.elapsed.total_seconds() < 5.0


@pytest.mark.slow
def test_an_llm_server_serves_extra_embedding_models(
        tiny_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = start_server(tiny_checkpoint("tiny-llama"), tmp_path_factory.mktemp("llm_pool"),
                          "--engine-mode", "thread", "--served-model-name", "tiny",
                          "--extra-model", f"bert={tiny_checkpoint('tiny-bert')}")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            tasks = {c["id"]: c["task"] for c in http.get("/v1/models").json()["data"]}
            assert tasks == {"tiny": "generate", "bert": "embed"}
            completion = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3,
                                                            "model": "tiny"})
            assert completion.status_code == 200, completion.text
            embedding = http.post("/v1/embeddings", json={"input": "hi"})
            assert embedding.status_code == 200 and embedding.json()["model"] == "bert"
            message = _error(http.post("/v1/completions", json={"prompt": "hi",
                                                                 "model": "bert"}), 400)
            assert "models that can: 'tiny'" in message["message"]
            message = _error(http.post("/v1/embeddings", json={"input": "x", "model": "tiny"}),
                             400)
            assert "text-generation model" in message["message"]
    finally:
        assert server.stop() == 0
