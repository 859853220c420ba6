"""`surge batch`: submit a JSONL file of requests, watch it, fetch its results; run workers.

Client commands talk to any server with the Batches API over HTTP (``--url``,
``--api-key``)::

    surge batch submit requests.jsonl --wait          # upload, start, progress bar
    surge batch status batch_abc                      # status and counts
    surge batch results batch_abc -o out.jsonl        # output (and errors next to it)
    surge batch cancel batch_abc
    surge batch list

``surge batch worker --queue-url amqp://... --upstream http://server:8000`` runs lines from a
RabbitMQ queue against an upstream server and hands results back through the broker: add
machines to go faster; kill one and its unacknowledged lines go to the others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

__all__ = ["add_parser"]

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "SURGE_API_KEY"
TERMINAL = ("completed", "failed", "expired", "cancelled")
# How long the remote worker trusts what it last heard about a batch's status.
STATUS_CACHE_SECONDS = 1.0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch", help="batch jobs: submit a JSONL of requests, follow it, fetch results")
    commands = parser.add_subparsers(title="batch commands", metavar="COMMAND")
    submit = _command(commands, "submit", "upload FILE and start a batch over it", _submit)
    submit.add_argument("file", type=Path, help="JSONL: one {custom_id, method, url, body} "
                                                "per line")
    submit.add_argument("--endpoint", default=None,
                        help="the lines' url (default: the first line's)")
    submit.add_argument("--completion-window", default="24h",
                        help="'24h' (default) or e.g. '30m': unfinished lines then expire")
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--wait", action="store_true",
                        help="show a progress bar until the batch is done")
    submit.add_argument("-o", "--output", type=Path, default=None,
                        help="with --wait: also write the results here")
    status = _command(commands, "status", "a batch's status and counts", _status)
    status.add_argument("batch_id")
    status.add_argument("--wait", action="store_true", help="progress bar until done")
    results = _command(commands, "results", "download a finished batch's results", _results)
    results.add_argument("batch_id")
    results.add_argument("-o", "--output", type=Path, required=True,
                         help="output JSONL; errors go to OUTPUT with .errors.jsonl")
    cancel = _command(commands, "cancel", "stop a batch (in-flight lines finish)", _cancel)
    cancel.add_argument("batch_id")
    listing = _command(commands, "list", "the newest batches", _list)
    listing.add_argument("--limit", type=int, default=20)
    worker = commands.add_parser("worker", help="run lines from a RabbitMQ queue against an "
                                                "upstream server")
    worker.add_argument("--queue-url", required=True,
                        help="amqp://user:pass@host:5672/?queue=NAME (the server's "
                             "--batch-queue-url)")
    worker.add_argument("--upstream", default=DEFAULT_URL, help="the server to send lines to")
    worker.add_argument("--concurrency", type=int, default=4)
    worker.add_argument("--api-key", default=os.environ.get(API_KEY_ENV))
    worker.set_defaults(handler=_worker)


def _command(commands: argparse._SubParsersAction, name: str, help_text: str,
             handler: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text)
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server (default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"bearer key (default ${API_KEY_ENV})")
    parser.set_defaults(handler=handler)
    return parser


# -- client commands -------------------------------------------------------------------------


class _Api:
    """The server's /v1 batch routes; errors become ValueError with the server's message."""

    def __init__(self, args: argparse.Namespace) -> None:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.http = httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=120.0)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ValueError(f"cannot reach {self.http.base_url}: {exc} (is `surge serve` "
                             "running? --url)") from exc
        if response.status_code >= 400:
            raise ValueError(f"{method} {path} -> {response.status_code}: "
                             f"{_error_message(response)}")
        return response

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/batches/{batch_id}").json()


def _submit(args: argparse.Namespace) -> int:
    content = args.file.read_bytes()
    endpoint = args.endpoint or _first_url(content, args.file)
    api = _Api(args)
    uploaded = api.call("POST", "/v1/files", data={"purpose": "batch"},
                        files={"file": (args.file.name, content, "application/jsonl")}).json()
    metadata = dict(_key_value(item) for item in args.metadata) or None
    batch = api.call("POST", "/v1/batches", json={
        "input_file_id": uploaded["id"], "endpoint": endpoint,
        "completion_window": args.completion_window, "metadata": metadata}).json()
    print(f"{batch['id']}: {batch['request_counts']['total']} requests to {endpoint} "
          f"({batch['status']})")
    if not args.wait:
        return 0
    batch = _follow(api, batch["id"])
    if args.output is not None:
        _download(api, batch, args.output)
    return 0 if batch["status"] == "completed" else 1


def _status(args: argparse.Namespace) -> int:
    api = _Api(args)
    batch = _follow(api, args.batch_id) if args.wait else api.batch(args.batch_id)
    counts = batch["request_counts"]
    print(f"{batch['id']}: {batch['status']} ({counts['completed']} completed, "
          f"{counts['failed']} failed of {counts['total']}); output "
          f"{batch['output_file_id']}, errors {batch['error_file_id']}")
    return 0


def _results(args: argparse.Namespace) -> int:
    api = _Api(args)
    batch = api.batch(args.batch_id)
    if batch["status"] not in TERMINAL:
        raise ValueError(f"batch {args.batch_id} is {batch['status']}: results are ready when "
                         f"it ends (surge batch status {args.batch_id} --wait)")
    _download(api, batch, args.output)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    batch = _Api(args).call("POST", f"/v1/batches/{args.batch_id}/cancel").json()
    print(f"{batch['id']}: {batch['status']}")
    return 0


def _list(args: argparse.Namespace) -> int:
    page = _Api(args).call("GET", "/v1/batches", params={"limit": args.limit}).json()
    for batch in page["data"]:
        counts = batch["request_counts"]
        print(f"{batch['id']}  {batch['status']:<11} {counts['completed'] + counts['failed']:>6}"
              f"/{counts['total']:<6} {batch['endpoint']}")
    return 0


def _follow(api: _Api, batch_id: str, poll_seconds: float = 1.0) -> dict[str, Any]:
    """A progress bar of lines done until the batch ends; the final batch object."""
    from tqdm import tqdm

    batch = api.batch(batch_id)
    with tqdm(total=batch["request_counts"]["total"], unit="line", desc=batch_id,
              file=sys.stderr) as bar:
        while True:
            counts = batch["request_counts"]
            bar.update(counts["completed"] + counts["failed"] - bar.n)
            bar.set_postfix(status=batch["status"], failed=counts["failed"])
            if batch["status"] in TERMINAL:
                return batch
            time.sleep(poll_seconds)  # polling the server's progress
            batch = api.batch(batch_id)


def _download(api: _Api, batch: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(_content(api, batch["output_file_id"]))
    written = [str(output)]
    if batch["error_file_id"]:
        errors = output.with_name(output.name.removesuffix(".jsonl") + ".errors.jsonl")
        errors.write_bytes(_content(api, batch["error_file_id"]))
        written.append(str(errors))
    counts = batch["request_counts"]
    print(f"{batch['id']} ({batch['status']}): {counts['completed']} results, "
          f"{counts['failed']} errors -> {', '.join(written)}")


def _content(api: _Api, file_id: str | None) -> bytes:
    return b"" if file_id is None else api.call("GET", f"/v1/files/{file_id}/content").content


def _first_url(content: bytes, path: Path) -> str:
    for line in content.decode("utf-8", "replace").splitlines():
        if line.strip():
            try:
                return str(json.loads(line)["url"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}: the first line has no 'url'; pass --endpoint") from exc
    raise ValueError(f"{path} has no requests: one JSON object per line is expected")


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--metadata {item!r} is invalid: use KEY=VALUE")
    return key, value


def _error_message(response: httpx.Response) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(response.json()["error"]["message"])
    return response.text[:500]


# -- the remote worker -----------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> int:
    if not args.queue_url.startswith(("amqp://", "amqps://")):
        raise ValueError(f"--queue-url {args.queue_url!r} is invalid: `surge batch worker` "
                         "needs a RabbitMQ URL, amqp://user:pass@host:5672/?queue=NAME (with "
                         "SQLite the server runs its lines itself)")
    if args.concurrency < 1:
        raise ValueError(f"--concurrency={args.concurrency} is invalid: allowed is >= 1")
    import logging

    from surge.http.logs import configure_logging

    configure_logging("info")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    asyncio.run(_run_worker(args))
    return 0


async def _run_worker(args: argparse.Namespace) -> None:
    from surge.batch.queue import AmqpQueue
    from surge.batch.worker import BatchWorker

    queue = AmqpQueue(args.queue_url)
    await queue.start(prefetch=args.concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with httpx.AsyncClient(base_url=args.upstream.rstrip("/"), timeout=None) as client:
        statuses = _BatchStatuses(client, headers)
        worker = BatchWorker(queue, client, concurrency=args.concurrency, headers=headers,
                             is_active=statuses.is_active, keep=queue.publish_result)
        print(f"worker: {args.concurrency} lines at a time from {queue.queue_name!r} to "
              f"{args.upstream}", file=sys.stderr, flush=True)
        work = asyncio.create_task(worker.run())
        await asyncio.wait({work, asyncio.create_task(stop.wait())},
                           return_when=asyncio.FIRST_COMPLETED)
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
    await queue.close()


class _BatchStatuses:
    """Whether a batch still runs, asked of the upstream server (cached for a second), so a
    worker skips the lines of cancelled and expired batches."""

    def __init__(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        self.client = client
        self.headers = headers
        self._seen: dict[str, tuple[float, bool]] = {}

    async def is_active(self, batch_id: str) -> bool:
        cached = self._seen.get(batch_id)
        if cached is not None and time.monotonic() - cached[0] < STATUS_CACHE_SECONDS:
            return cached[1]
        active = await self._ask(batch_id)
        self._seen[batch_id] = (time.monotonic(), active)
        return active

    async def _ask(self, batch_id: str) -> bool:
        delay = 0.1
        while True:
            try:
                response = await self.client.get(f"/v1/batches/{batch_id}",
                                                 headers=self.headers)
                if response.status_code == 404:
                    return False
                if response.status_code == 200:
                    # Lines are published while the batch is still "validating".
                    return response.json()["status"] in ("validating", "in_progress")
            except httpx.TransportError:
                pass  # the server is restarting: ask again
            await asyncio.sleep(delay)  # back-off while the upstream is unavailable
            delay = min(delay * 2, 5.0)
