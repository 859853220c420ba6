"""The batch service inside ``surge serve``: files, batches, the queue and the worker, together.

It owns the life of a batch::

    validating -> in_progress -> finalizing -> completed
         \\             |   \\-> (window over) finalizing -> expired (partial results kept)
          \\-> cancelling (in-flight lines finish) -> finalizing -> cancelled

and every step is written to the store before the next starts, so a server killed anywhere
resumes where it was: ``validating`` batches are enqueued (again), ``in_progress`` ones go on
(the SQLite queue is refilled with the lines that have no result; RabbitMQ keeps its own),
``finalizing`` ones write their output files again (same ids, atomic writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel

from surge.batch.config import BatchSettings
from surge.batch.queue import AmqpQueue, BatchQueue, LineTask, SqliteQueue, open_queue
from surge.batch.store import (
    BATCH_STATUSES,
    RUNNABLE_STATUSES,
    TERMINAL_STATUSES,
    BatchRecord,
    BatchStore,
    FileRecord,
    LineResult,
    new_id,
)
from surge.batch.validate import BATCH_URLS, BatchFileError, parse_lines, validate_batch_file
from surge.batch.worker import BATCH_PRIORITY, BatchWorker
from surge.http.errors import APIError
from surge.http.unicode import safe_text
from surge.server.features import ServerHost

__all__ = ["BatchService", "parse_completion_window"]

logger = logging.getLogger(__name__)

MONITOR_SECONDS = 1.0
MAX_WINDOW_SECONDS = 7 * 24 * 3600
MAX_METADATA_KEYS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512
# ASCII only: \d would also take other scripts' digits ("١h").
_WINDOW = re.compile(r"^\s*(\d+)\s*([hms])\s*$", re.ASCII)
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1}
_EXPIRED_ERROR = {"code": "batch_expired",
                  "message": "This request could not be executed before the completion window "
                             "expired."}


def parse_completion_window(text: object) -> float:
    """'24h' (OpenAI's only value) and, for shorter jobs and tests, any '<n>h|m|s'."""
    match = _WINDOW.match(text) if isinstance(text, str) else None
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)] if match else 0
    if not 0 < seconds <= MAX_WINDOW_SECONDS:
        raise APIError(400, f"completion_window={text!r} is invalid: allowed is '24h' or a "
                            "duration like '2h', '30m', '90s' (at most 168h)",
                       param="completion_window", code="invalid_value")
    return float(seconds)


class BatchApiMetrics:
    """``surge:batch_api_queue_depth``, ``surge:batch_api_batches{status}``,
    ``surge:batch_api_lines_total{result}`` (named apart from the dynamic batcher's metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.queue_depth = Gauge("surge:batch_api_queue_depth",
                                 "Batch lines waiting in the queue for a worker.",
                                 registry=registry)
        self.batches = Gauge("surge:batch_api_batches", "Batches by status.", ["status"],
                             registry=registry)
        self.lines = Counter("surge:batch_api_lines", "Batch lines answered and stored, by result "
                             "(rate() gives lines per second).", ["result"], registry=registry)
        for status in BATCH_STATUSES:
            self.batches.labels(status).set(0)
        for result in ("completed", "failed"):
            self.lines.labels(result)


class BatchService:
    """Everything behind the batch routes; ``running`` is the app's lifecycle service."""

    def __init__(self, app: FastAPI, settings: BatchSettings, host: ServerHost) -> None:
        self.app = app
        self.settings = settings
        self.load = host.load
        self.models = host.models
        api_keys = host.settings.api_keys
        self.store = BatchStore(settings.resolved_data_dir())
        self.queue: BatchQueue = open_queue(settings.resolved_queue_url())
        self.metrics = BatchApiMetrics(host.metrics.registry)
        self.headers = {"Authorization": f"Bearer {api_keys[0]}"} if api_keys else {}
        self.worker: BatchWorker | None = None
        # One thread for the store: SQLite commits (fsync) never block the event loop, and
        # this process's store calls run in order.
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="surge-batch-store")

    # -- lifecycle ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self, app: FastAPI) -> AsyncIterator[None]:
        # The in-process client would log every batch line at INFO.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        await self.queue.start(prefetch=max(self.settings.concurrency, 1))
        background: list[asyncio.Task[Any]] = []
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                   base_url="http://surge.internal", timeout=None)
        try:
            await self._recover()
            background.append(asyncio.create_task(self._monitor()))
            if self.settings.concurrency > 0:
                self.worker = self._make_worker(client)
                background.append(asyncio.create_task(self.worker.run()))
            if isinstance(self.queue, AmqpQueue):
                await self.queue.consume_results(self.keep_result)
            logger.info("batch API on (queue %s, data %s, concurrency %d)",
                        _describe(self.queue), self.store.data_dir, self.settings.concurrency)
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await client.aclose()
            await self.queue.close()
            await self._db(self.store.close)
            self._db_thread.shutdown(wait=True)

    def _make_worker(self, client: httpx.AsyncClient) -> BatchWorker:
        def interactive_load() -> int:
            batch_in_flight = self.worker.num_in_flight if self.worker else 0
            return self.load.num_in_flight() - batch_in_flight

        def interactive_waiting() -> int:
            return self.load.num_waiting_for_first_token(more_urgent_than=BATCH_PRIORITY)

        return BatchWorker(self.queue, client, concurrency=self.settings.concurrency,
                           headers=self.headers, is_active=self.is_active,
                           keep=self.keep_result, interactive_load=interactive_load,
                           interactive_waiting=interactive_waiting, can_run=self.load.can_run)

    async def _recover(self) -> None:
        """Pick up where a previous run (or a crash) left every unfinished batch."""
        await self._recover_each("validating", self._enqueue)
        if isinstance(self.queue, SqliteQueue):
            # The queue file could have lost rows the store still owes (or been replaced);
            # re-adding lines without a result is harmless: a line keeps one row.
            await self._recover_each("in_progress", self._requeue_unanswered)
        await self._recover_each(
            "finalizing", lambda batch: self._finalize(batch.id, _finalizing_target(batch)))

    async def _recover_each(self, status: str,
                            resume: Callable[[BatchRecord], Awaitable[Any]]) -> None:
        """One batch that cannot resume (its input file was removed from disk, or holds
        text no store accepts, from before uploads were checked for it) is marked failed; it
        must not keep the server, and every other batch, from starting."""
        for batch in await self._db(self.store.batches_with_status, status):
            try:
                await resume(batch)
            except FileNotFoundError as exc:
                logger.error("batch %s cannot resume, its input file is gone (%s): marked "
                             "failed", batch.id, exc)
                await self._fail(batch, status)
            except Exception:
                logger.exception("batch %s cannot resume: marked failed", batch.id)
                await self._fail(batch, status)

    async def _fail(self, batch: BatchRecord, status: str) -> None:
        with contextlib.suppress(Exception):  # what is queued may be what cannot be read
            await self.queue.drop_batch(batch.id)
        await self._db(self.store.set_status, batch.id, "failed", only_from=(status,))

    async def _requeue_unanswered(self, batch: BatchRecord) -> None:
        await self.queue.put(await self._unanswered_tasks(batch))

    async def _monitor(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:
                logger.exception("batch monitor step failed (will retry)")
            await asyncio.sleep(MONITOR_SECONDS)  # periodic upkeep, not synchronization

    async def _tick(self) -> None:
        now = time.time()
        for batch in await self._db(self.store.batches_with_status, "validating",
                                    "in_progress", "cancelling"):
            if batch.status == "cancelling":
                if await self.queue.num_in_flight(batch.id) == 0:
                    await self._finalize(batch.id, "cancelled")
            elif now >= batch.expires_at:
                await self.queue.drop_batch(batch.id)
                await self._finalize(batch.id, "expired")
            elif batch.status == "in_progress" and batch.num_done >= batch.total:
                await self._finalize(batch.id, "completed")
        await self._update_gauges()

    async def _update_gauges(self) -> None:
        for status, count in (await self._db(self.store.count_by_status)).items():
            self.metrics.batches.labels(status).set(count)
        with contextlib.suppress(Exception):  # a broker hiccup must not stop the monitor
            self.metrics.queue_depth.set(await self.queue.depth())

    # -- what workers call -------------------------------------------------------------------

    async def is_active(self, batch_id: str) -> bool:
        batch = await self._db(self.store.get_batch, batch_id)
        return batch is not None and batch.status in RUNNABLE_STATUSES

    async def keep_result(self, result: LineResult) -> None:
        """Store a line's answer (once); finish the batch if it was the last line."""
        if not await self._db(self.store.add_result, result):
            return
        self.metrics.lines.labels("completed" if result.succeeded else "failed").inc()
        batch = await self._db(self.store.get_batch, result.batch_id)
        if batch is not None and batch.status == "in_progress" and batch.num_done >= batch.total:
            await self._finalize(batch.id, "completed")

    # -- what routes call --------------------------------------------------------------------

    # Every route-facing call takes ``owner`` (``surge.http.gate.key_owner``): an API key sees
    # only its own files and batches, as OpenAI scopes them by organization; another key's
    # ids are "not found", never "forbidden" (which would confirm they exist).

    async def upload_file(self, filename: str, purpose: str, content: bytes,
                          owner: str = "") -> FileRecord:
        if purpose != "batch":
            raise APIError(400, f"purpose={purpose!r} is not supported: allowed is 'batch'",
                           param="purpose", code="invalid_value")
        schemas = self.endpoint_schemas()
        served = self.served_models()
        try:
            validated = await asyncio.to_thread(validate_batch_file, content, schemas=schemas,
                                                served_models=served)
        except BatchFileError as exc:
            raise APIError(400, exc.message, param="file", code="invalid_batch_file") from exc
        return await self._db(self.store.add_file, filename or "batch.jsonl", purpose, content,
                              num_lines=len(validated.lines), urls=validated.urls, owner=owner)

    async def create_batch(self, input_file_id: str, endpoint: str, completion_window: str,
                           metadata: dict[str, str] | None, owner: str = "") -> BatchRecord:
        window = parse_completion_window(completion_window)
        _check_metadata(metadata)
        if endpoint not in self.endpoint_schemas():
            served = ", ".join(u for u in BATCH_URLS if u in self.endpoint_schemas())
            raise APIError(400, f"endpoint={endpoint!r} is not supported: allowed is one of "
                                f"{served}", param="endpoint", code="invalid_value")
        source = await self.get_file(input_file_id, owner)
        if source.purpose != "batch":
            raise APIError(400, f"file {input_file_id} has purpose {source.purpose!r}: a "
                                "batch needs a file uploaded with purpose 'batch'",
                           param="input_file_id", code="invalid_value")
        # Reads and parses the whole input file: on the store thread, not the event loop.
        await self._db(self._check_one_endpoint, source, endpoint)
        batch = await self._db(self.store.add_batch, endpoint, source.id, completion_window,
                               window, source.num_lines, metadata, owner)
        try:
            return await self._enqueue(batch)
        except Exception as exc:
            # A file stored before its text was checked may hold what the queue refuses: the
            # batch fails now rather than staying `validating` (and failing every restart).
            logger.exception("batch %s could not be queued: marked failed", batch.id)
            await self._fail(batch, "validating")
            reason = f"{type(exc).__name__}: {safe_text(str(exc))}"
            raise APIError(400, f"file {input_file_id} cannot be run as a batch ({reason}); "
                                f"batch {batch.id} is marked failed: upload the file again",
                           param="input_file_id", code="invalid_batch_file") from exc

    async def get_batch(self, batch_id: str, owner: str = "") -> BatchRecord:
        batch = await self._db(self.store.get_batch, batch_id, owner)
        if batch is None:
            raise APIError(404, f"No batch found with id '{batch_id}' (GET /v1/batches lists "
                                "them)", param="batch_id", code="batch_not_found")
        return batch

    async def list_batches(self, limit: int, after: str | None,
                           owner: str = "") -> tuple[list[BatchRecord], bool]:
        if after is not None:
            await self.get_batch(after, owner)  # an unknown cursor is an error, not empty
        return await self._db(self.store.list_batches, limit, after, owner)

    async def cancel_batch(self, batch_id: str, owner: str = "") -> BatchRecord:
        batch = await self.get_batch(batch_id, owner)
        if batch.status in ("cancelling", "cancelled"):
            return batch
        moved = await self._db(self.store.set_status, batch_id, "cancelling",
                               only_from=("validating", "in_progress"))
        if not moved:
            raise APIError(409, f"batch {batch_id} is {batch.status}: only validating or "
                                "in_progress batches can be cancelled",
                           code="batch_not_cancellable")
        await self.queue.drop_batch(batch_id)
        return await self.get_batch(batch_id, owner)

    async def get_file(self, file_id: str, owner: str = "") -> FileRecord:
        record = await self._db(self.store.get_file, file_id, owner)
        if record is None:
            raise APIError(404, f"No file found with id '{file_id}'", param="file_id",
                           code="file_not_found")
        return record

    async def file_content(self, file_id: str, owner: str = "") -> bytes:
        await self.get_file(file_id, owner)
        return await self._db(self.store.read_file, file_id)

    async def list_files(self, purpose: str | None, owner: str = "") -> list[FileRecord]:
        return await self._db(self.store.list_files, purpose, owner)

    async def delete_file(self, file_id: str, owner: str = "") -> None:
        await self.get_file(file_id, owner)
        await self._db(self.store.delete_file, file_id)

    def endpoint_schemas(self) -> dict[str, type[BaseModel]]:
        """The batchable URLs this app serves, each with the body model its route validates
        (so embeddings lines are checked by whatever model that route declares)."""
        schemas: dict[str, type[BaseModel]] = {}
        for route in self.app.routes:
            if (isinstance(route, APIRoute) and route.path in BATCH_URLS
                    and "POST" in route.methods and route.body_field is not None):
                model = route.body_field.field_info.annotation
                if isinstance(model, type) and issubclass(model, BaseModel):
                    schemas[route.path] = model
        return schemas

    def served_models(self) -> set[str]:
        """The model names ``GET /v1/models`` lists (every model of a multi-model server)."""
        return set(self.models.names())

    # -- internals ---------------------------------------------------------------------------

    def _check_one_endpoint(self, source: FileRecord, endpoint: str) -> None:
        others = [url for url in source.urls if url != endpoint]
        if not others:
            return
        lines = [line for line in parse_lines(self.store.read_file(source.id))
                 if line.url != endpoint]
        raise APIError(400, f"the batch endpoint is {endpoint} but line {lines[0].line_no} "
                            f"(and {len(lines) - 1} more) asks for {lines[0].url}: every line's "
                            "url must equal the batch's endpoint", param="input_file_id",
                       code="mismatched_endpoint")

    async def _enqueue(self, batch: BatchRecord) -> BatchRecord:
        """validating -> in_progress, once every line is durably in the queue."""
        await self.queue.put(await self._unanswered_tasks(batch))
        await self._db(self.store.set_status, batch.id, "in_progress", only_from=("validating",))
        return await self.get_batch(batch.id, batch.owner)

    async def _unanswered_tasks(self, batch: BatchRecord) -> list[LineTask]:
        content = await self._db(self.store.read_file, batch.input_file_id)
        answered = await self._db(self.store.answered_custom_ids, batch.id)
        return [LineTask(batch.id, line.line_no, line.custom_id, line.url, line.body)
                for line in parse_lines(content) if line.custom_id not in answered]

    async def _finalize(self, batch_id: str, target: str) -> None:
        await self._db(self._finalize_in_store, batch_id, target)

    def _finalize_in_store(self, batch_id: str, target: str) -> None:
        """Stop taking results, write the output and error files, then say where they are.
        Runs again from the start after a crash: file ids and contents are the same."""
        store = self.store
        batch = store.get_batch(batch_id)
        if batch is None or batch.status in TERMINAL_STATUSES:
            return
        if batch.status != "finalizing":
            previous = {"completed": ("in_progress",), "expired": ("in_progress", "validating"),
                        "cancelled": ("cancelling",)}[target]
            stamp = "expired" if target == "expired" else None
            if not store.set_status(batch_id, "finalizing", only_from=previous,
                                    also_stamp=stamp):
                return
        output, errors = _result_lines(store, batch_id)
        if target == "expired":
            errors += _expired_lines(store, store.get_batch(batch_id))
        suffix = batch_id.removeprefix("batch_")
        output_id = _write_result_file(store, f"file-{suffix}out", batch, "output", output)
        error_id = _write_result_file(store, f"file-{suffix}err", batch, "error", errors)
        store.set_output(batch_id, target, output_id, error_id)
        logger.info("batch %s %s: %d answered, %d errors", batch_id, target, len(output),
                    len(errors))

    async def _db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_thread, lambda: fn(*args, **kwargs))


def _finalizing_target(batch: BatchRecord) -> str:
    if batch.timestamps.get("expired_at"):
        return "expired"
    if batch.timestamps.get("cancelling_at"):
        return "cancelled"
    return "completed"


def _result_lines(store: BatchStore, batch_id: str) -> tuple[list[dict[str, Any]],
                                                             list[dict[str, Any]]]:
    output, errors = [], []
    for result_id, result in store.iter_results(batch_id):
        line = {"id": result_id, "custom_id": result.custom_id,
                "response": {"status_code": result.status_code,
                             "request_id": result.body.get("id") or result_id,
                             "body": result.body},
                "error": None}
        (output if result.succeeded else errors).append(line)
    return output, errors


def _expired_lines(store: BatchStore, batch: BatchRecord | None) -> list[dict[str, Any]]:
    if batch is None:
        return []
    answered = store.answered_custom_ids(batch.id)
    return [{"id": new_id("batch_req_"), "custom_id": line.custom_id, "response": None,
             "error": _EXPIRED_ERROR}
            for line in parse_lines(store.read_file(batch.input_file_id))
            if line.custom_id not in answered]


def _write_result_file(store: BatchStore, file_id: str, batch: BatchRecord, kind: str,
                       lines: list[dict[str, Any]]) -> str | None:
    if not lines:
        return None
    import json

    content = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
    store.add_file(f"{batch.id}_{kind}.jsonl", "batch_output", content, file_id=file_id,
                   owner=batch.owner)
    return file_id


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    ok = len(metadata) <= MAX_METADATA_KEYS and all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_METADATA_KEY_CHARS
        and len(v) <= MAX_METADATA_VALUE_CHARS for k, v in metadata.items())
    if not ok:
        raise APIError(400, f"metadata is invalid: allowed is at most {MAX_METADATA_KEYS} "
                            f"string pairs, keys up to {MAX_METADATA_KEY_CHARS} characters and "
                            f"values up to {MAX_METADATA_VALUE_CHARS}", param="metadata",
                       code="invalid_value")


def _describe(queue: BatchQueue) -> str:
    if isinstance(queue, AmqpQueue):
        return f"RabbitMQ queue {queue.queue_name!r}"
    return queue.url
