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

These models plug into the server as a feature (``PoolingFeature``): they register in the
served-models authority (so ``/v1/models``, ``/health`` and the "which model?" errors know them),
add their two routes, and load and run as a background service. A server may serve only such
models: then it has no engine at all.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

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
from surge.http.errors import APIError, validation_message
from surge.http.openapi import error_responses
from surge.http.responses import json_response
from surge.models.tasks import Task
from surge.server.images import ImageLimits, decode_base64_image, decode_image
from surge.server.models import TASK_WORDS, ServedModel, ServedModels
from surge.server.response_cache import (
    NO_CACHE,
    NOT_CACHED,
    CacheLookup,
    CacheQuery,
    cached_response,
    with_cache_header,
)

if TYPE_CHECKING:
    import torch

    from surge.models.pooling_models import ImageClassifier, PoolModel, TextEmbedder
    from surge.server.context import RequestContext
    from surge.server.features import ServerHost

__all__ = [
    "ClassifyRequest",
    "EmbeddingRequest",
    "ModelPools",
    "PoolModelSpec",
    "PoolSettings",
    "PoolingFeature",
]

logger = logging.getLogger(__name__)

# As OpenAI: at most this many inputs in one embeddings request.
MAX_EMBEDDING_INPUTS = 2048
MAX_IMAGES_PER_REQUEST = 256
# Texts longer than this (in total) are tokenized on a worker thread.
_INLINE_TOKENIZE_CHARS = 20_000
# JSON bodies larger than this are parsed on a worker thread (base64 images).
_INLINE_PARSE_BYTES = 1 << 20


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


class _PooledModel:
    """One pool model: loaded in the background, then served by its batcher."""

    def __init__(self, spec: PoolModelSpec) -> None:
        self.spec = spec
        self.model: PoolModel | None = None
        self.batcher: DynamicBatcher[Any, np.ndarray] | None = None

    @property
    def ready(self) -> bool:
        return self.batcher is not None

    async def embed_texts(self, texts: list[str], deadline: float | None) -> list[np.ndarray]:
        """Vectors of ``texts``, each cut to the model's input length, through the same
        batcher as /v1/embeddings: for features (the semantic response cache)."""
        embedder: TextEmbedder = self.model  # type: ignore[assignment]
        if self.batcher is None or embedder is None:
            raise APIError(503, f"the model {self.spec.name!r} is still loading",
                           code="model_loading")
        ids = [embedder.truncate(t, embedder.max_tokens) for t in embedder.tokenize(texts)]
        return await self.batcher.submit_many(ids, deadline)


class ModelPools:
    """Every embedding and classification model of the server, by name."""

    def __init__(self, specs: Sequence[PoolModelSpec], settings: PoolSettings | None = None,
                 loader: Callable[[Path, str, str], PoolModel] | None = None) -> None:
        self.settings = settings or PoolSettings()
        self.specs = list(specs)  # as given: the served-models authority refuses a name twice
        self.models = {spec.name: _PooledModel(spec) for spec in specs}
        self._loader = loader
        self._metrics: BatchMetrics | None = None
        self.failure: str | None = None

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

    def _start_batcher(self, served: _PooledModel) -> None:
        model = served.model
        assert model is not None and self._metrics is not None
        run = model.embed_batch if model.task == "embed" else model.classify_batch
        batcher: DynamicBatcher[Any, np.ndarray] = DynamicBatcher(
            served.spec.name, run, self.settings.batcher,
            self._metrics.observer(served.spec.name))
        batcher.start()
        served.batcher = batcher


def _max_len(served: _PooledModel) -> int | None:
    return getattr(served.model, "max_tokens", None)


def _describe(model: PoolModel | None) -> str:
    if model is None:
        return "?"
    if model.task == "embed":
        return f"{model.dim} dimensions, up to {model.max_tokens} tokens, {model.pooling.mode} " \
               f"pooling{', normalized' if model.pooling.normalize else ''}"
    return f"{model.architecture}, {model.num_labels} labels"


# -- routes ----------------------------------------------------------------------------------


class PoolingFeature:
    """The embedding and classification models of a server, as a feature of it."""

    def __init__(self, pools: ModelPools) -> None:
        self.pools = pools

    def mount(self, app: FastAPI, host: ServerHost) -> None:
        for spec in self.pools.specs:
            pooled = self.pools.models[spec.name]
            host.models.add(ServedModel(spec.name, spec.task, pooled,
                                        root=functools.partial(str, spec.model_dir),
                                        max_model_len=functools.partial(_max_len, pooled)))
        host.models.add_readiness(self.pools.check_ready)
        host.services.add(lambda: self.pools.serve(host.metrics.registry,
                                                   host.control.request_exit))
        _add_routes(app, _PoolingHandler(host.models, host.context, self.pools))


def _add_routes(app: FastAPI, handler: _PoolingHandler) -> None:
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
    def __init__(self, models: ServedModels, context: RequestContext,
                 pools: ModelPools) -> None:
        self.models = models
        self.context = context
        self.pools = pools

    # -- embeddings --------------------------------------------------------------------------

    async def embeddings(self, body: EmbeddingRequest, request: Request) -> Response:
        served = self._model(body.model, "embed")
        embedder: TextEmbedder = served.model  # type: ignore[assignment]
        _check_dimensions(body.dimensions, embedder.dim)
        token_ids = await self._token_ids(embedder, _embedding_inputs(body.input))
        token_ids = _fit_lengths(token_ids, embedder, body.truncate_prompt_tokens)
        cache = await self._cache_lookup(request, body, served, token_ids)
        if cache.answer is not None:  # answered without the batcher; still rate-limited
            self.context.charge(request, max(cache.answer.num_tokens, 1))
            return cached_response(cache, None)
        num_tokens = sum(len(ids) for ids in token_ids)
        # The tenant's own rate limit too (tenants file), as for completions.
        self.context.charge(request, num_tokens, self.context.tenant_of(request, body.user))
        vectors = await self._run(served, token_ids, request)
        encode = _base64_vector if body.encoding_format == "base64" else _float_vector
        data = [{"object": "embedding", "index": i, "embedding": encode(v)}
                for i, v in enumerate(vectors)]
        payload = {"object": "list", "data": data, "model": served.spec.name,
                   "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}
        await cache.store_body(payload)
        return with_cache_header(json_response(payload), cache)

    async def _cache_lookup(self, request: Request, body: EmbeddingRequest,
                            served: _PooledModel, token_ids: list[list[int]]) -> CacheLookup:
        """Embeddings are always reproducible: keyed by the inputs' token ids (after
        truncation) and the fields that shape the answer."""
        cache = self.context.response_cache
        if cache is NO_CACHE:
            return NOT_CACHED
        material = {"input_token_ids": token_ids, "encoding_format": body.encoding_format,
                    "dimensions": body.dimensions}
        return await cache.lookup(request, CacheQuery(
            "embeddings", served.spec.name, str(served.spec.model_dir),
            f"{self.pools.settings.dtype} {self.pools.settings.device}", material,
            reproducible=True, user=body.user))

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
        self.context.charge(request, len(images))
        limits = self.pools.settings.image_limits
        pixels = await asyncio.gather(*(
            asyncio.to_thread(_prepare_image, classifier, image, f"{param}[{i}]"
                              if len(images) > 1 else param, limits)
            for i, image in enumerate(images)))
        probabilities = await self._run(served, list(pixels), request)
        data = [{"index": i, "labels": _top_labels(p, classifier.labels, top_k)}
                for i, p in enumerate(probabilities)]
        return json_response({"id": f"classify-{uuid.uuid4().hex}",
                              "object": "classification", "created": int(time.time()),
                              "model": served.spec.name, "data": data,
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

    def _model(self, name: str | None, task: Task) -> _PooledModel:
        """The served model for this request, or the error that says why not."""
        self.context.check_accepting()  # draining
        served: _PooledModel = self.models.resolve(name, task).target
        if self.pools.failure is not None:
            raise APIError(503, self.pools.failure, code="model_failed")
        if not served.ready:
            raise APIError(503, f"the model {served.spec.name!r} is still loading: retry when "
                           "GET /health answers 200", code="model_loading",
                           headers={"Retry-After": "1"})
        return served

    async def _run(self, served: _PooledModel, items: list[Any], request: Request
                   ) -> list[np.ndarray]:
        """The batcher's results, ending early (items dropped) if the client hangs up."""
        batcher = served.batcher
        assert batcher is not None
        work = batcher.submit_many(items, self.context.deadline())
        try:
            # A client that hangs up cancels the work: the batcher drops its items.
            return await self.context.unless_disconnected(request, work)
        except BatcherFull as exc:
            raise APIError(429, exc.message, code="queue_full",
                           headers={"Retry-After": str(exc.retry_after)}) from exc
        except BatchTimeout:
            raise self.context.timed_out() from None
        except BatcherClosed as exc:
            raise APIError(503, f"the server is shutting down: {exc}",
                           code="server_shutdown") from exc


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
