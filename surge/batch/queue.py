"""The batch work queue: one small interface, two backends chosen by URL.

- ``sqlite:///path/queue.db`` (the embedded default): a table of lines; taking one sets a
  lease (owner, expiry) in one ``UPDATE ... RETURNING``; acknowledging deletes the row. The
  leases of an owner that died are handed out again: at once when the owner was a process on
  this machine that no longer runs (a kill -9), else when the lease expires (owners renew
  theirs while they work).
- ``amqp://user:pass@host:5672/?queue=NAME`` (RabbitMQ, for workers on many machines): a
  durable queue, persistent messages published with confirms, manual acknowledgements, and a
  prefetch equal to the worker's concurrency. A delivery that is never acknowledged (its
  worker died) comes back by itself. Results of remote workers travel back on a second durable
  queue, ``NAME.results``, that the server consumes.

Both deliver at least once; the store keeps exactly one result per line, so a line that is
delivered twice is answered twice at worst and stored once.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import secrets
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from surge.batch.store import LineResult
from surge.http import sqlite

__all__ = [
    "DEFAULT_AMQP_QUEUE",
    "AmqpQueue",
    "BatchQueue",
    "Delivery",
    "LineTask",
    "SqliteQueue",
    "open_queue",
]

logger = logging.getLogger(__name__)

DEFAULT_AMQP_QUEUE = "surge.batch.lines"
# A lease outlives a worker that stopped renewing it by this long (a hung process, or one on
# another machine whose death this machine cannot see).
LEASE_SECONDS = 60.0
# How often a waiting consumer looks for lines enqueued by another process, and how often
# leases of dead local processes are looked for.
POLL_SECONDS = 0.5
RECLAIM_SECONDS = 5.0
PUBLISH_CHUNK = 500


class LineTask(msgspec.Struct, frozen=True):
    """One line of one batch, as it travels through the queue."""

    batch_id: str
    line_no: int
    custom_id: str
    url: str
    body: dict[str, Any]


class Delivery(abc.ABC):
    """A task handed to one consumer; settle it exactly once with ack or release."""

    def __init__(self, task: LineTask) -> None:
        self.task = task

    @abc.abstractmethod
    async def ack(self) -> None:
        """Done (its result is stored): never deliver it again."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Not done (shutting down): deliver it again, to anyone."""


class BatchQueue(abc.ABC):
    """Where batch lines wait for a worker. Delivery is at least once."""

    url: str

    @abc.abstractmethod
    async def start(self, prefetch: int = 1) -> None:
        """Connect; ``prefetch`` bounds the deliveries held unsettled at once."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect; unsettled deliveries go back to the queue."""

    @abc.abstractmethod
    async def put(self, tasks: Sequence[LineTask]) -> None:
        """Enqueue durably: when this returns, a crash cannot lose them."""

    @abc.abstractmethod
    async def get(self) -> Delivery:
        """The next task, waiting for one if needed."""

    @abc.abstractmethod
    async def depth(self) -> int:
        """Tasks waiting (not handed out)."""

    @abc.abstractmethod
    async def num_in_flight(self, batch_id: str) -> int:
        """Tasks of ``batch_id`` handed out and not settled (as far as this queue can see)."""

    async def drop_batch(self, batch_id: str) -> None:  # noqa: B027 - optional
        """Forget the batch's waiting tasks if the backend can; consumers skip them anyway."""


def open_queue(url: str) -> BatchQueue:
    """The backend for ``url``; ValueError with examples for anything else."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        path = url[len("sqlite://"):]
        if not path:
            raise ValueError(f"--batch-queue-url {url!r} names no file: use e.g. "
                             "sqlite:///var/lib/surge/queue.db")
        return SqliteQueue(path)
    if scheme in ("amqp", "amqps"):
        return AmqpQueue(url)
    raise ValueError(f"--batch-queue-url {url!r} is not supported: use sqlite:///path/queue.db "
                     "or amqp://guest:guest@127.0.0.1:5672/?queue=surge.batch.lines")


# -- SQLite --------------------------------------------------------------------------------

_QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT NOT NULL,
    url TEXT NOT NULL, body TEXT NOT NULL, enqueued REAL NOT NULL,
    lease_owner TEXT, lease_until REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, line_no));
CREATE INDEX IF NOT EXISTS queue_by_lease ON queue (lease_until, enqueued, line_no);
"""


class _SqliteDelivery(Delivery):
    def __init__(self, task: LineTask, queue: SqliteQueue) -> None:
        super().__init__(task)
        self._queue = queue

    async def ack(self) -> None:
        await self._queue._settle(self, delete=True)

    async def release(self) -> None:
        await self._queue._settle(self, delete=False)


class SqliteQueue(BatchQueue):
    """Lines in a SQLite table, leased to consumers; shared safely by processes on one host."""

    def __init__(self, path: str | Path, *, lease_seconds: float = LEASE_SECONDS) -> None:
        self.path = Path(path)
        self.url = f"sqlite://{self.path}"
        self.lease_seconds = lease_seconds
        self.owner = _owner_token()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="surge-batch-queue")
        self._conn: sqlite3.Connection | None = None
        self._wakeup = asyncio.Event()
        self._held: Counter[str] = Counter()
        self._background: list[asyncio.Task[None]] = []

    async def start(self, prefetch: int = 1) -> None:
        await self._run(self._open)
        await self._run(self.reclaim_dead_leases)
        self._background = [asyncio.create_task(self._every(self.lease_seconds / 3,
                                                            self._renew_leases)),
                            asyncio.create_task(self._every(RECLAIM_SECONDS,
                                                            self.reclaim_dead_leases))]

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._conn is not None:
            # Whatever we still hold goes back at once rather than when the lease expires.
            await self._run(self._release_all_mine)
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)

    async def put(self, tasks: Sequence[LineTask]) -> None:
        await self._run(self._insert, list(tasks))
        self._wakeup.set()

    async def get(self) -> Delivery:
        while True:
            task = await self._run(self._claim)
            if task is not None:
                self._held[task.batch_id] += 1
                return _SqliteDelivery(task, self)
            self._wakeup.clear()
            # Another process may enqueue too: look again after a while even without a wakeup.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), POLL_SECONDS)

    async def depth(self) -> int:
        return await self._run(self._count, "lease_until < ?", (time.time(),))

    async def num_in_flight(self, batch_id: str) -> int:
        return await self._run(self._count, "batch_id = ? AND lease_until >= ?",
                               (batch_id, time.time()))

    async def drop_batch(self, batch_id: str) -> None:
        await self._run(self._execute, "DELETE FROM queue WHERE batch_id = ? AND lease_until < ?",
                        (batch_id, time.time()))

    # -- on the queue's thread ---------------------------------------------------------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite.connect(self.path, synchronous="FULL")
        conn.executescript(_QUEUE_SCHEMA)
        self._conn = conn

    def _insert(self, tasks: list[LineTask]) -> None:
        now = time.time()
        rows = [(t.batch_id, t.line_no, t.custom_id, t.url, msgspec.json.encode(t.body).decode(),
                 now) for t in tasks]
        with sqlite.write_transaction(self._require_conn()) as conn:
            # Enqueueing again (recovery after a crash) keeps the one row a line already has.
            conn.executemany("INSERT INTO queue (batch_id, line_no, custom_id, url, body, "
                             "enqueued) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", rows)

    def _claim(self) -> LineTask | None:
        now = time.time()
        row = self._require_conn().execute(
            "UPDATE queue SET lease_owner = ?, lease_until = ? WHERE rowid = (SELECT rowid "
            "FROM queue WHERE lease_until < ? ORDER BY enqueued, line_no LIMIT 1) "
            "RETURNING batch_id, line_no, custom_id, url, body",
            (self.owner, now + self.lease_seconds, now)).fetchone()
        if row is None:
            return None
        return LineTask(row[0], row[1], row[2], row[3], msgspec.json.decode(row[4]))

    def _settle_row(self, task: LineTask, delete: bool) -> None:
        where = "WHERE batch_id = ? AND line_no = ? AND lease_owner = ?"
        sql = (f"DELETE FROM queue {where}" if delete
               else f"UPDATE queue SET lease_until = 0, lease_owner = NULL {where}")
        self._execute(sql, (task.batch_id, task.line_no, self.owner))

    def _renew_leases(self) -> None:
        self._execute("UPDATE queue SET lease_until = ? WHERE lease_owner = ? AND "
                      "lease_until > 0", (time.time() + self.lease_seconds, self.owner))

    def reclaim_dead_leases(self) -> None:
        """Hand out again the lines leased by processes of this host that no longer run."""
        conn = self._require_conn()
        owners = [row[0] for row in conn.execute(
            "SELECT DISTINCT lease_owner FROM queue WHERE lease_until > 0 AND "
            "lease_owner IS NOT NULL")]
        for owner in owners:
            if owner != self.owner and _owner_is_dead(owner):
                freed = self._execute("UPDATE queue SET lease_until = 0, lease_owner = NULL "
                                      "WHERE lease_owner = ?", (owner,))
                logger.info("batch queue: %d line(s) leased by dead process %s are queued "
                            "again", freed, owner.split("|")[1])

    def _release_all_mine(self) -> None:
        self._execute("UPDATE queue SET lease_until = 0, lease_owner = NULL WHERE "
                      "lease_owner = ?", (self.owner,))

    def _count(self, where: str, args: tuple[Any, ...]) -> int:
        return self._require_conn().execute(f"SELECT COUNT(*) FROM queue WHERE {where}",
                                            args).fetchone()[0]

    def _execute(self, sql: str, args: tuple[Any, ...]) -> int:
        return self._require_conn().execute(sql, args).rowcount

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the batch queue is not started")
        return self._conn

    # -- plumbing ----------------------------------------------------------------------------

    async def _settle(self, delivery: _SqliteDelivery, delete: bool) -> None:
        await self._run(self._settle_row, delivery.task, delete)
        self._held[delivery.task.batch_id] -= 1
        if not delete:
            self._wakeup.set()

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _every(self, seconds: float, fn: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(seconds)  # periodic upkeep, not synchronization
            try:
                await self._run(fn)
            except sqlite3.Error as exc:
                logger.warning("batch queue upkeep failed (will retry): %s", exc)


def _owner_token() -> str:
    """host|pid|process start|random: enough to tell, on this host, whether it still runs."""
    pid = os.getpid()
    return f"{socket.gethostname()}|{pid}|{_process_start(pid)}|{secrets.token_hex(4)}"


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks (Linux), so a reused pid is not mistaken for
    the owner; empty where /proc is missing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_is_dead(owner: str) -> bool:
    try:
        host, pid_text, started, _ = owner.split("|")
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False  # another machine's process: only its lease expiry can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, owned by someone else
    return bool(started) and _process_start(pid) != started


# -- RabbitMQ ------------------------------------------------------------------------------


class _AmqpDelivery(Delivery):
    def __init__(self, task: LineTask, message: Any, queue: AmqpQueue) -> None:
        super().__init__(task)
        self._message = message
        self._queue = queue

    async def ack(self) -> None:
        await self._queue._settle(self, self._message.ack)

    async def release(self) -> None:
        await self._queue._settle(self, lambda: self._message.nack(requeue=True))


class AmqpQueue(BatchQueue):
    """RabbitMQ: a durable queue of lines and a durable queue of results from remote workers."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.queue_name = query.pop("queue", DEFAULT_AMQP_QUEUE)
        self.results_name = f"{self.queue_name}.results"
        self.url = url
        # The broker library must not see our own parameter.
        self._broker_url = urlunsplit(parts._replace(query=urlencode(query)))
        self._connection: Any = None
        self._channel: Any = None
        self._consumer_channel: Any = None
        self._prefetch = 1
        self._deliveries: asyncio.Queue[_AmqpDelivery] = asyncio.Queue()
        self._held: Counter[str] = Counter()

    async def start(self, prefetch: int = 1) -> None:
        import aio_pika

        self._prefetch = max(prefetch, 1)
        try:
            self._connection = await aio_pika.connect_robust(self._broker_url)
        except Exception as exc:
            raise ConnectionError(f"cannot reach the RabbitMQ broker at {_safe(self.url)}: "
                                  f"{exc}") from exc
        self._channel = await self._connection.channel(publisher_confirms=True)
        for name in (self.queue_name, self.results_name):
            await self._channel.declare_queue(name, durable=True)

    async def close(self) -> None:
        if self._connection is not None:
            # Closing the connection returns every unacknowledged delivery to the queue.
            await self._connection.close()
            self._connection = None

    async def put(self, tasks: Sequence[LineTask]) -> None:
        bodies = [msgspec.json.encode(task) for task in tasks]
        for start in range(0, len(bodies), PUBLISH_CHUNK):
            await asyncio.gather(*(self._publish(self.queue_name, body)
                                   for body in bodies[start:start + PUBLISH_CHUNK]))

    async def get(self) -> Delivery:
        if self._consumer_channel is None:
            await self._consume(self.queue_name, self._on_line)
        delivery = await self._deliveries.get()
        self._held[delivery.task.batch_id] += 1
        return delivery

    async def depth(self) -> int:
        queue = await self._channel.declare_queue(self.queue_name, passive=True)
        return int(queue.declaration_result.message_count or 0)

    async def num_in_flight(self, batch_id: str) -> int:
        # Deliveries held by other processes are invisible to this one.
        return self._held[batch_id] + sum(
            1 for d in list(self._deliveries._queue)  # type: ignore[attr-defined]
            if d.task.batch_id == batch_id)

    async def publish_result(self, result: LineResult) -> None:
        """From a remote worker: durable once this returns (the broker confirmed it)."""
        body = msgspec.json.encode({"batch_id": result.batch_id, "custom_id": result.custom_id,
                                    "line_no": result.line_no,
                                    "status_code": result.status_code, "body": result.body})
        await self._publish(self.results_name, body)

    async def consume_results(self, handle: Callable[[LineResult], Awaitable[None]]) -> None:
        """Call ``handle`` for each result from remote workers; acknowledged after it returns
        (so a result stored by a server that then crashed is redelivered, and ignored)."""

        async def on_result(message: Any) -> None:
            data = msgspec.json.decode(message.body)
            try:
                await handle(LineResult(**data))
            except Exception:
                logger.exception("storing a remote worker's result failed; it is requeued")
                await message.nack(requeue=True)
                return
            await message.ack()

        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=64)
        queue = await channel.declare_queue(self.results_name, durable=True)
        await queue.consume(on_result, no_ack=False)

    async def delete_queues(self) -> None:
        """Remove both queues from the broker (tests, decommissioning)."""
        for name in (self.queue_name, self.results_name):
            await self._channel.queue_delete(name)

    async def _consume(self, name: str, callback: Callable[[Any], Awaitable[None]]) -> None:
        self._consumer_channel = await self._connection.channel()
        await self._consumer_channel.set_qos(prefetch_count=self._prefetch)
        queue = await self._consumer_channel.declare_queue(name, durable=True)
        await queue.consume(callback, no_ack=False)

    async def _on_line(self, message: Any) -> None:
        try:
            task = msgspec.json.decode(message.body, type=LineTask)
        except msgspec.DecodeError:
            logger.error("dropping a malformed message from %s", self.queue_name)
            await message.reject(requeue=False)
            return
        self._deliveries.put_nowait(_AmqpDelivery(task, message, self))

    async def _publish(self, routing_key: str, body: bytes) -> None:
        import aio_pika

        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                   content_type="application/json")
        await self._channel.default_exchange.publish(message, routing_key=routing_key)

    async def _settle(self, delivery: _AmqpDelivery,
                      settle: Callable[[], Awaitable[None]]) -> None:
        self._held[delivery.task.batch_id] -= 1
        try:
            await settle()
        except Exception as exc:
            # The channel broke (the broker restarted): the broker requeues it by itself.
            logger.warning("could not settle a batch line with the broker: %s", exc)


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
