"""`POST /v1/classify` on a real `surge serve`: base64 JSON and multipart uploads, top-k labels
that match the model run directly, several classifiers chosen by name, and clear 4xx for
non-images, other formats, broken files, oversized files and decompression bombs."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from surge.models.pooling_models import ImageClassifier
from tests.server._helpers import ServerProcess
from tests.server._images import declared_only_png, encoded, png_bomb


@pytest.fixture
def http(pool_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pool_server.url, timeout=60.0) as client:
        yield client


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_json_base64_returns_top_k_labels_matching_the_model(
        http: httpx.Client, tiny_checkpoint: Callable[[str], Path]) -> None:
    images = [encoded("PNG", seed=s) for s in range(3)]
    response = http.post("/v1/classify", json={"model": "resnet", "top_k": 3,
                                               "image": [_b64(i) for i in images]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "classification" and body["id"].startswith("classify-")
    assert body["model"] == "resnet" and body["usage"] == {"images": 3}
    local = ImageClassifier(tiny_checkpoint("tiny-resnet"))
    for entry, data in zip(body["data"], images, strict=True):
        probabilities = local.classify_batch([local.preprocess(Image.open(io.BytesIO(data)))])[0]
        expected = np.argsort(-probabilities)[:3]
        assert [label["class_id"] for label in entry["labels"]] == expected.tolist()
        assert [label["label"] for label in entry["labels"]] == [local.labels[i]
                                                                 for i in expected]
        np.testing.assert_allclose([label["probability"] for label in entry["labels"]],
                                   probabilities[expected], atol=1e-5)
    assert [entry["index"] for entry in body["data"]] == [0, 1, 2]


def test_a_data_url_and_the_default_top_k(http: httpx.Client) -> None:
    url = f"data:image/jpeg;base64,{_b64(encoded('JPEG'))}"
    body = http.post("/v1/classify", json={"image": url, "model": "vit"}).json()
    labels = body["data"][0]["labels"]
    assert len(labels) == 5 and body["model"] == "vit"
    probabilities = [label["probability"] for label in labels]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001


def test_multipart_upload_of_several_files(http: httpx.Client) -> None:
    files = [("file", (f"{i}.png", encoded("PNG", seed=i), "image/png")) for i in range(2)]
    files.append(("file", ("x.webp", encoded("WEBP"), "image/webp")))
    response = http.post("/v1/classify", files=files, data={"model": "resnet", "top_k": "2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == 3 and all(len(d["labels"]) == 2 for d in body["data"])
    json_body = http.post("/v1/classify", json={"model": "resnet", "top_k": 2,
                                                "image": _b64(encoded("PNG", seed=0))}).json()
    multipart, alone = body["data"][0]["labels"], json_body["data"][0]["labels"]
    assert [x["class_id"] for x in multipart] == [x["class_id"] for x in alone]
    # Batched with two other images or alone: the same within float tolerance.
    np.testing.assert_allclose([x["probability"] for x in multipart],
                               [x["probability"] for x in alone], atol=1e-5)


def test_without_a_model_the_first_classifier_answers(http: httpx.Client) -> None:
    body = http.post("/v1/classify", json={"image": _b64(encoded("GIF"))}).json()
    assert body["model"] == "resnet"


@pytest.mark.parametrize(("data", "status", "fragment"), [
    (b"just some text, not an image", 415, "allowed formats are JPEG, PNG, WebP, GIF, BMP"),
    (encoded("TIFF"), 415, "a TIFF file"),
    (encoded("PNG", (300, 300))[:2000], 400, "truncated or corrupt"),
    (encoded("BMP", (1024, 400)), 413, "--max-image-bytes"),
    (png_bomb(3000, 3000), 413, "3000x3000 = 9000000 pixels"),
    (declared_only_png(200_000, 200_000), 413, ""),
])
def test_bad_images_are_refused_in_json_and_multipart(http: httpx.Client, data: bytes,
                                                      status: int, fragment: str) -> None:
    as_json = _error(http.post("/v1/classify", json={"image": [_b64(encoded("PNG")),
                                                               _b64(data)]}), status)
    assert fragment in as_json["message"] and as_json["param"] == "image[1]"
    as_file = _error(http.post("/v1/classify", files=[("file", ("f", data, "image/png"))]),
                     status)
    assert fragment in as_file["message"] and as_file["param"] == "file"


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"image": "not base64!"}, 400, "not valid base64"),
    ({"image": []}, 400, "empty list"),
    ({"top_k": 3}, 400, "'image' is required"),
    ({"image": "x", "top_k": 0}, 400, "allowed is 1 to 10"),
    ({"image": "x", "top_k": 11}, 400, "allowed is 1 to 10"),
    ({"image": "x", "model": "all-minilm-l6-v2"}, 400, "is an embedding model"),
    ({"image": "x", "model": "nope"}, 404, "'nope' does not exist"),
])
def test_bad_requests_get_clear_errors(http: httpx.Client, body: dict, status: int,
                                       fragment: str) -> None:
    assert fragment in _error(http.post("/v1/classify", json=body), status)["message"]


def test_bad_multipart_and_content_types(http: httpx.Client) -> None:
    assert "'file' is required" in _error(http.post(
        "/v1/classify", files=[("other", ("a.png", encoded("PNG"), "image/png"))]), 400)["message"]
    assert "text field" in _error(http.post(
        "/v1/classify", data={"file": "abc"}, files=[("x", ("a", b"1"))]), 400)["message"]
    assert "allowed is an integer" in _error(http.post(
        "/v1/classify", files=[("file", ("a.png", encoded("PNG"), "image/png"))],
        data={"top_k": "many"}), 400)["message"]
    assert "multipart/form-data" in _error(http.post(
        "/v1/classify", content=b"abc", headers={"content-type": "text/plain"}), 415)["message"]


def test_the_server_stays_healthy_after_bad_images(http: httpx.Client) -> None:
    http.post("/v1/classify", json={"image": _b64(png_bomb(3000, 3000))})
    assert http.get("/health").status_code == 200
    ok = http.post("/v1/classify", json={"image": _b64(encoded("PNG"))})
    assert ok.status_code == 200
