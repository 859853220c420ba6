"""Embedding and image-classification models in the HTTP server: ``/v1/embeddings`` and
``/v1/classify``, each model behind its own dynamic batcher.

These models answer in one forward pass, so they do not go through the LLM engine: each gets a
``DynamicBatcher`` whose worker thread runs the network while the event loop keeps serving.
Every input of a request (each string of an embeddings list, each image) is one batcher item,
so one large request batches together with many small ones.

A request passes the same gates as generation: API key and body size (the app's middleware),
the per-key rate limit, the drain refusal, then the batcher's bounded queue (429 with
Retry-After), ``--request-timeout`` (504) and a client that hangs up (its items leave the
queue). Preprocessing that costs CPU (tokenizing long texts, decoding and resizing images) runs
on worker threads, never on the event loop.

A server may serve only such models: then ``NoGenerationEngine`` stands in for the LLM engine,
and the generation routes say which models the server has and what they do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec
import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.responses import Response

from surge.batching import (
    BatcherClosed,
    BatcherConfig,
    BatcherFull,
    BatchMetrics,
    BatchTimeout,
    DynamicBatcher,
)
from surge.engine.client import EngineClient, EngineInfo
from surge.engine.protocol import AddRequest, EngineCoreOutput, EngineStats
from surge.http.auth import RateLimited
from surge.http.errors import APIError, validation_message
from surge.http.openapi import error_responses
from surge.models.tasks import Task
from surge.server.images import ImageLimits, decode_base64_image, decode_image

if TYPE_CHECKING:
    import torch

    from surge.models.pooling_models import ImageClassifier, PoolModel, TextEmbedder
    from surge.server.serving import OpenAIServing

__all__ = [
    "ClassifyRequest",
    "EmbeddingRequest",
    "ModelPools",
    "NoGenerationEngine",
    "PoolModelSpec",
    "PoolSettings",
    "add_pooling_routes",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
TASK_WORDS = {"generate": "text-generation", "embed": "embedding",
              "classify": "image-classification"}
ENDPOINT_OF = {"generate": "/v1/completions and /v1/chat/completions",
               "embed": "/v1/embeddings", "classify": "/v1/classify"}
# As OpenAI: at most this many inputs in one embeddings request.
MAX_EMBEDDING_INPUTS = 2048
MAX_IMAGES_PER_REQUEST = 256
# Texts longer than this (in total) are tokenized on a worker thread.
_INLINE_TOKENIZE_CHARS = 20_000
# JSON bodies larger than this are parsed on a worker thread (base64 images).
_INLINE_PARSE_BYTES = 1 << 20
_encode = msgspec.json.encode


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolModelSpec:
    """One model to serve: the name clients send, where it is, and what it does."""

    name: str
    model_dir: Path
    task: Task


@dataclass(frozen=True)
class PoolSettings:
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    dtype: str = "auto"
    device: str = "cpu"


# -- request bodies --------------------------------------------------------------------------


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, plus vLLM's ``truncate_prompt_tokens``."""

    model: str | None = None
    input: Any = Field(..., description="a string, a list of strings, a list of token ids, or "
                       "a list of token-id lists", json_schema_extra={"anyOf": [
                           {"type": "string"}, {"type": "array", "items": {"type": "string"}},
                           {"type": "array", "items": {"type": "integer"}},
                           {"type": "array", "items": {"type": "array",
                                                       "items": {"type": "integer"}}}]})
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=1, description="keep only this many "
                                               "tokens of a longer input (else: 400)")


class ClassifyRequest(BaseModel):
    """``POST /v1/classify`` as JSON: base64 images (or data URLs)."""

    model: str | None = None
    image: str | list[str] = Field(..., description="base64 image bytes or a data:image/...;"
                                   "base64, URL, or a list of them")
    top_k: int = Field(5, description="labels per image, highest probability first")


_ERRORS = error_responses({
    400: "invalid request (the message names the field and what is allowed)",
    401: "missing or wrong API key", 404: "unknown model",
    413: "request body, image bytes or image pixels over the limit",
    415: "not an image in an allowed format",
    429: "rate limited or the model's queue is full (Retry-After)",
    503: "model loading or server shutting down", 504: "over --request-timeout"})


# -- serving state ---------------------------------------------------------------------------


class _ServedModel:
    """One pool model: loaded in the background, then served by its batcher."""

    def __init__(self, spec: PoolModelSpec) -> None:
        self.spec = spec
        self.model: PoolModel | None = None
        self.batcher: DynamicBatcher[Any, np.ndarray] | None = None

    @property
    def ready(self) -> bool:
        return self.batcher is not None


class ModelPools:
    """Every embedding and classification model of the server, by name."""

    def __init__(self, specs: Sequence[PoolModelSpec], settings: PoolSettings | None = None,
                 loader: Callable[[Path, str, str], PoolModel] | None = None) -> None:
        names = [spec.name for spec in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names {duplicates} are used twice: give each model its own "
                             "name (--extra-model NAME=PATH)")
        self.settings = settings or PoolSettings()
        self.models = {spec.name: _ServedModel(spec) for spec in specs}
        self._loader = loader
        self._metrics: BatchMetrics | None = None
        self.created = int(time.time())
        self.failure: str | None = None

    def tasks(self) -> dict[str, Task]:
        return {name: served.spec.task for name, served in self.models.items()}

    def cards(self) -> list[dict[str, Any]]:
        """/v1/models entries."""
        return [{"id": name, "object": "model", "created": self.created, "owned_by": "surge",
                 "root": str(served.spec.model_dir), "max_model_len": _max_len(served),
                 "task": served.spec.task} for name, served in self.models.items()]

    def check_ready(self) -> None:
        """503 unless every model is loaded (``/health``)."""
        if self.failure is not None:
            raise APIError(503, self.failure, code="model_failed")
        loading = [name for name, served in self.models.items() if not served.ready]
        if loading:
            raise APIError(503, f"models {loading} are still loading: retry when GET /health "
                           "answers 200", code="model_loading", headers={"Retry-After": "1"})

    @contextlib.asynccontextmanager
    async def serve(self, registry: Any, on_failure: Callable[[int], None]
                    ) -> AsyncIterator[None]:
        """Load every model in the background, then run its batcher; close them on exit."""
        self._metrics = BatchMetrics(registry) if self._metrics is None else self._metrics
        task = asyncio.create_task(self._load_all(on_failure), name="load-pool-models")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for served in self.models.values():
                if served.batcher is not None:
                    await served.batcher.close()

    async def _load_all(self, on_failure: Callable[[int], None]) -> None:
        for served in self.models.values():
            started = time.perf_counter()
            try:
                served.model = await asyncio.to_thread(self._load, served.spec)
            except Exception as exc:
                logger.error("model %r (%s) could not be loaded: %s", served.spec.name,
                             served.spec.model_dir, exc)
                self.failure = f"the model {served.spec.name!r} could not be loaded: {exc}"
                on_failure(1)  # a server that can never become ready helps no one
                return
            self._start_batcher(served)
            logger.info("model %r ready in %.1f s: %s (%s, %s)", served.spec.name,
                        time.perf_counter() - started, served.spec.model_dir,
                        TASK_WORDS[served.spec.task], _describe(served.model))

    def _load(self, spec: PoolModelSpec) -> PoolModel:
        if self._loader is not None:
            return self._loader(spec.model_dir, self.settings.dtype, self.settings.device)
        from surge.models.pooling_models import load_pool_model, warm_up

        model = load_pool_model(spec.model_dir, self.settings.dtype, self.settings.device)
        warm_up(model)  # the first call pays for kernel set-up: not a client's request
        return model

    def _start_batcher(self, served: _ServedModel) -> None:
        model = served.model
        assert model is not None and self._metrics is not None
        run = model.embed_batch if model.task == "embed" else model.classify_batch
        batcher: DynamicBatcher[Any, np.ndarray] = DynamicBatcher(
            served.spec.name, run, self.settings.batcher,
            self._metrics.observer(served.spec.name))
        batcher.start()
        served.batcher = batcher


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _max_len(served: _ServedModel) -> int | None:
    return getattr(served.model, "max_tokens", None)


def _describe(model: PoolModel | None) -> str:
    if model is None:
        return "?"
    if model.task == "embed":
        return f"{model.dim} dimensions, up to {model.max_tokens} tokens, {model.pooling.mode} " \
               f"pooling{', normalized' if model.pooling.normalize else ''}"
    return f"{model.architecture}, {model.num_labels} labels"


# -- the stand-in engine ---------------------------------------------------------------------


class NoGenerationEngine(EngineClient):
    """The engine of a server with no text-generation model: always ready, never generates.

    It lets the app's engine lifecycle, health and metrics run unchanged; the generation routes
    refuse earlier (``OpenAIServing.check_model``) with a message naming the served models.
    """

    async def start(self) -> None:
        self._info = EngineInfo(model_dir="(no text-generation model)", max_model_len=0,
                                vocab_size=0, eos_token_ids=[], dtype="none", device="none",
                                num_blocks=0, block_size=0)

    @property
    def is_healthy(self) -> bool:
        return True

    def generate(self, request: AddRequest) -> AsyncIterator[EngineCoreOutput]:
        raise ValueError("this server serves no text-generation model")

    async def abort(self, request_ids: list[str]) -> None:
        return None

    def stats(self) -> EngineStats:
        return EngineStats()

    async def shutdown(self) -> None:
        return None


# -- routes ----------------------------------------------------------------------------------


def add_pooling_routes(app: FastAPI, serving: OpenAIServing, pools: ModelPools) -> None:
    """``/v1/embeddings`` and ``/v1/classify``; the pools load and run with the app."""
    app.state.pools = pools
    serving.other_models = {name: TASK_WORDS[task] for name, task in pools.tasks().items()}
    handler = _PoolingHandler(serving, pools)
    lifecycle = app.state.lifecycle
    lifecycle.services.add(
        lambda: pools.serve(serving.metrics.registry, lifecycle.request_exit))

    @app.post("/v1/embeddings", tags=["openai"], response_model=None,
              responses={200: {"description": "OpenAI's embeddings list"}, **_ERRORS})
    async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await handler.embeddings(body, request)

    @app.post("/v1/classify", tags=["surge"], response_model=None,
              openapi_extra={"requestBody": _CLASSIFY_BODY},
              responses={200: {"description": "top-k labels per image"}, **_ERRORS})
    async def classify(request: Request) -> Response:
        """Top-k labels of one or more images: JSON with base64 images, or multipart/form-data
        with ``file`` parts (and optional ``model`` and ``top_k`` fields)."""
        return await handler.classify(request)


_CLASSIFY_BODY = {"required": True, "content": {
    "application/json": {"schema": ClassifyRequest.model_json_schema()},
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["file"], "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "model": {"type": "string"}, "top_k": {"type": "integer"}}}}}}


class _PoolingHandler:
    def __init__(self, serving: OpenAIServing, pools: ModelPools) -> None:
        self.serving = serving
        self.pools = pools

    # -- embeddings --------------------------------------------------------------------------

    async def embeddings(self, body: EmbeddingRequest, request: Request) -> Response:
        served = self._model(body.model, "embed")
        embedder: TextEmbedder = served.model  # type: ignore[assignment]
        _check_dimensions(body.dimensions, embedder.dim)
        token_ids = await self._token_ids(embedder, _embedding_inputs(body.input))
        token_ids = _fit_lengths(token_ids, embedder, body.truncate_prompt_tokens)
        num_tokens = sum(len(ids) for ids in token_ids)
        self._charge(request, num_tokens)
        vectors = await self._run(served, token_ids, request)
        encode = _base64_vector if body.encoding_format == "base64" else _float_vector
        data = [{"object": "embedding", "index": i, "embedding": encode(v)}
                for i, v in enumerate(vectors)]
        return _json({"object": "list", "data": data, "model": served.spec.name,
                      "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}})

    async def _token_ids(self, embedder: TextEmbedder, inputs: list[str] | list[list[int]]
                         ) -> list[list[int]]:
        if not isinstance(inputs[0], str):
            _check_token_ids(inputs, embedder.vocab_size)  # type: ignore[arg-type]
            return inputs  # type: ignore[return-value]
        texts: list[str] = inputs  # type: ignore[assignment]
        try:
            if sum(len(t) for t in texts) <= _INLINE_TOKENIZE_CHARS:
                return embedder.tokenize(texts)
            return await asyncio.to_thread(embedder.tokenize, texts)
        except Exception as exc:  # the Rust tokenizer refuses e.g. lone surrogates
            raise APIError(400, f"the input cannot be tokenized: {exc}", param="input") from exc

    # -- classification ----------------------------------------------------------------------

    async def classify(self, request: Request) -> Response:
        model_name, images, top_k, param = await self._classify_inputs(request)
        served = self._model(model_name, "classify")
        classifier: ImageClassifier = served.model  # type: ignore[assignment]
        if not 1 <= top_k <= classifier.num_labels:
            raise APIError(400, f"'top_k'={top_k} is invalid: allowed is 1 to "
                           f"{classifier.num_labels} (the model's number of labels)",
                           param="top_k")
        self._charge(request, len(images))
        limits = self.pools.settings.image_limits
        pixels = await asyncio.gather(*(
            asyncio.to_thread(_prepare_image, classifier, image, f"{param}[{i}]"
                              if len(images) > 1 else param, limits)
            for i, image in enumerate(images)))
        probabilities = await self._run(served, list(pixels), request)
        data = [{"index": i, "labels": _top_labels(p, classifier.labels, top_k)}
                for i, p in enumerate(probabilities)]
        return _json({"id": f"classify-{uuid.uuid4().hex}", "object": "classification",
                      "created": int(time.time()), "model": served.spec.name, "data": data,
                      "usage": {"images": len(images)}})

    async def _classify_inputs(self, request: Request
                               ) -> tuple[str | None, list[str | bytes], int, str]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            return await _multipart_inputs(request)
        if content_type in ("application/json", ""):
            body = await request.body()
            try:
                parsed = (ClassifyRequest.model_validate_json(body)
                          if len(body) <= _INLINE_PARSE_BYTES
                          else await asyncio.to_thread(ClassifyRequest.model_validate_json, body))
            except ValidationError as exc:
                message, param = validation_message(exc.errors())
                raise APIError(400, message, param=param, code="invalid_value") from None
            images = [parsed.image] if isinstance(parsed.image, str) else list(parsed.image)
            _check_image_count(len(images), "image")
            return parsed.model, list(images), parsed.top_k, "image"
        raise APIError(415, f"Content-Type {content_type!r} is not supported: send "
                       "application/json (base64 images) or multipart/form-data (file parts)",
                       code="unsupported_media_type")

    # -- shared ------------------------------------------------------------------------------

    def _model(self, name: str | None, task: Task) -> _ServedModel:
        """The served model for this request, or the error that says why not."""
        if self.serving.refusal is not None:  # draining
            raise self.serving.refusal
        served = self._find(name, task)
        if self.pools.failure is not None:
            raise APIError(503, self.pools.failure, code="model_failed")
        if not served.ready:
            raise APIError(503, f"the model {served.spec.name!r} is still loading: retry when "
                           "GET /health answers 200", code="model_loading",
                           headers={"Retry-After": "1"})
        return served

    def _find(self, name: str | None, task: Task) -> _ServedModel:
        pools, word = self.pools.models, TASK_WORDS[task]
        if name is None:
            for served in pools.values():
                if served.spec.task == task:
                    return served
            raise APIError(404, f"this server serves no {word} model; it serves "
                           f"{self._served_list()}", param="model", code="model_not_found")
        served = pools.get(name)
        if served is not None and served.spec.task == task:
            return served
        other_task = served.spec.task if served is not None else (
            "generate" if self.serving.can_generate and name in self.serving.model_names
            else None)
        if other_task is None:
            raise APIError(404, f"The model '{name}' does not exist: this server serves "
                           f"{self._served_list()} (GET /v1/models)", param="model",
                           code="model_not_found")
        suitable = [n for n, s in pools.items() if s.spec.task == task]
        raise APIError(400, f"the model '{name}' is {_a(TASK_WORDS[other_task])} model (use "
                       f"{ENDPOINT_OF[other_task]}); {word} models here: "
                       f"{', '.join(repr(n) for n in suitable) or 'none'}", param="model",
                       code="model_not_supported")

    def _served_list(self) -> str:
        served = [f"'{n}' ({TASK_WORDS[t]})" for n, t in self.pools.tasks().items()]
        if self.serving.can_generate:
            served = [f"'{n}' (text-generation)" for n in self.serving.model_names] + served
        return ", ".join(served) or "no models"

    def _charge(self, request: Request, amount: int) -> None:
        """The per-key rate limit, as generation charges it (inputs' tokens, or images)."""
        key_id = request.scope.get("state", {}).get("surge_key_id")
        try:
            self.serving.rate_limiter.check(key_id, amount)
        except RateLimited as exc:
            self.serving.metrics.record_rejected(f"rate_limit_{exc.limit}")
            raise APIError(429, exc.message, code="rate_limit_exceeded",
                           headers={"Retry-After": str(exc.retry_after)}) from exc

    async def _run(self, served: _ServedModel, items: list[Any], request: Request
                   ) -> list[np.ndarray]:
        """The batcher's results, ending early (items dropped) if the client hangs up."""
        batcher = served.batcher
        assert batcher is not None
        timeout = self.serving.limits.request_timeout
        deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        try:
            return await _unless_disconnected(request, batcher.submit_many(items, deadline))
        except BatcherFull as exc:
            raise APIError(429, exc.message, code="queue_full",
                           headers={"Retry-After": str(exc.retry_after)}) from exc
        except BatchTimeout:
            raise APIError(504, f"the request did not finish within the server's "
                           f"--request-timeout of {timeout:g} s", code="request_timeout"
                           ) from None
        except BatcherClosed as exc:
            raise APIError(503, f"the server is shutting down: {exc}",
                           code="server_shutdown") from exc


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise APIError(499, "the client closed the connection", code="client_closed")
        return task.result()
    finally:
        task.cancel()
        gone.cancel()
        with contextlib.suppress(BaseException):
            await task  # the batcher drops the items that did not run


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body was read, so nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- embeddings helpers ----------------------------------------------------------------------


def _embedding_inputs(value: Any) -> list[str] | list[list[int]]:
    """OpenAI's input forms -> a list of texts or a list of token-id lists (400 otherwise)."""
    allowed = ("allowed is a string, a list of strings, a list of token ids or a list of "
               "token-id lists")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise APIError(400, f"'input' is {'an empty list' if value == [] else 'invalid'}: "
                       f"{allowed}", param="input")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise APIError(400, f"'input' has {len(value)} items: allowed is at most "
                       f"{MAX_EMBEDDING_INPUTS} per request", param="input")
    if all(_is_token_id(v) for v in value):
        return [list(value)]
    if all(isinstance(v, str) for v in value):
        for i, text in enumerate(value):
            if not text:
                raise APIError(400, f"'input[{i}]' is an empty string: allowed is a non-empty "
                               "string", param=f"input[{i}]")
        return list(value)
    if all(isinstance(v, list) and v and all(_is_token_id(t) for t in v) for v in value):
        return [list(v) for v in value]
    raise APIError(400, f"'input' is invalid: {allowed} (not mixed, none empty)", param="input")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_token_ids(inputs: list[list[int]], vocab_size: int) -> None:
    for i, ids in enumerate(inputs):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"'input[{i}]' has unknown token ids {bad[:5]}: allowed is "
                           f"[0, {vocab_size - 1}]", param="input")


def _fit_lengths(token_ids: list[list[int]], embedder: TextEmbedder,
                 truncate: int | None) -> list[list[int]]:
    limit = embedder.max_tokens
    if truncate is not None:
        if truncate > limit:
            raise APIError(400, f"'truncate_prompt_tokens'={truncate} is invalid: allowed is "
                           f"1 to {limit} (this model's maximum input length)",
                           param="truncate_prompt_tokens")
        return [embedder.truncate(ids, truncate) for ids in token_ids]
    for i, ids in enumerate(token_ids):
        if len(ids) > limit:
            raise APIError(400, f"input {i} has {len(ids)} tokens: this model's maximum input "
                           f"length is {limit} tokens. Shorten it, or set "
                           f"'truncate_prompt_tokens' to at most {limit} to keep only the "
                           "start", param="input", code="context_length_exceeded")
    return token_ids


def _check_dimensions(dimensions: int | None, dim: int) -> None:
    if dimensions is not None and dimensions != dim:
        raise APIError(400, f"'dimensions'={dimensions} is not supported: this model makes "
                       f"{dim}-dimensional embeddings and cannot shorten them (leave "
                       f"'dimensions' out, or set it to {dim})", param="dimensions")


def _float_vector(vector: np.ndarray) -> list[float]:
    return vector.tolist()


def _base64_vector(vector: np.ndarray) -> str:
    # As OpenAI: the float32 values' little-endian bytes.
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


# -- classification helpers ------------------------------------------------------------------


async def _multipart_inputs(request: Request) -> tuple[str | None, list[str | bytes], int, str]:
    try:
        form = await request.form(max_files=MAX_IMAGES_PER_REQUEST, max_fields=16)
    except Exception as exc:  # malformed multipart, too many parts
        raise APIError(400, f"the multipart/form-data body cannot be read: {exc}") from None
    files = form.getlist("file")
    if not files:
        raise APIError(400, "'file' is required: send one or more image files as 'file' parts",
                       param="file")
    _check_image_count(len(files), "file")
    images: list[str | bytes] = []
    for i, part in enumerate(files):
        if not isinstance(part, UploadFile):
            raise APIError(400, f"'file' part {i} is a text field: send it as a file (with a "
                           "filename)", param="file")
        images.append(await part.read())
    model = form.get("model")
    return (model if isinstance(model, str) and model else None, images,
            _form_int(form.get("top_k"), "top_k", 5), "file")


def _form_int(value: Any, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(str(value))
    except ValueError:
        raise APIError(400, f"'{name}'={str(value)[:40]!r} is invalid: allowed is an integer",
                       param=name) from None


def _check_image_count(count: int, param: str) -> None:
    if count == 0:
        raise APIError(400, f"'{param}' is an empty list: send at least one image", param=param)
    if count > MAX_IMAGES_PER_REQUEST:
        raise APIError(400, f"'{param}' has {count} images: allowed is at most "
                       f"{MAX_IMAGES_PER_REQUEST} per request", param=param)


def _prepare_image(classifier: ImageClassifier, image: str | bytes, param: str,
                   limits: ImageLimits) -> torch.Tensor:
    """base64 or bytes -> checked, decoded, preprocessed pixels (on a worker thread)."""
    data = decode_base64_image(image, param, limits) if isinstance(image, str) else image
    with decode_image(data, param, limits) as decoded:
        return classifier.preprocess(decoded)


def _top_labels(probabilities: np.ndarray, labels: list[str], k: int) -> list[dict[str, Any]]:
    top = np.argpartition(-probabilities, k - 1)[:k] if k < len(probabilities) else np.arange(
        len(probabilities))
    top = top[np.argsort(-probabilities[top], kind="stable")]
    return [{"label": labels[i], "class_id": int(i), "probability": float(probabilities[i])}
            for i in top]


def _json(payload: dict[str, Any]) -> Response:
    return Response(_encode(payload), media_type="application/json")
