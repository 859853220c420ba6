"""The store keeps one result per line however often it is delivered, and keeps counts equal
to stored results; the SQLite queue's leases survive the death of their owner."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from surge.batch.queue import LineTask, SqliteQueue
from surge.batch.store import _SCHEMA, BatchStore, LineResult


@pytest.fixture
def store(tmp_path: Path) -> BatchStore:
    s = BatchStore(tmp_path / "data")
    yield s
    s.close()


def _batch(store: BatchStore, total: int = 3) -> str:
    source = store.add_file("in.jsonl", "batch", b"{}\n", num_lines=total)
    batch = store.add_batch("/v1/completions", source.id, "24h", 86400.0, total, None)
    assert store.set_status(batch.id, "in_progress", only_from=("validating",))
    return batch.id


def test_a_redelivered_line_is_stored_and_counted_once(store: BatchStore) -> None:
    batch_id = _batch(store)
    first = LineResult(batch_id, "a", 1, 200, {"id": "first"})
    again = LineResult(batch_id, "a", 1, 200, {"id": "second"})
    assert store.add_result(first) is True
    assert store.add_result(again) is False
    assert store.add_result(LineResult(batch_id, "b", 2, 400, {"error": {}})) is True
    batch = store.get_batch(batch_id)
    assert (batch.completed, batch.failed) == (1, 1)
    assert [(r.custom_id, r.body) for _, r in store.iter_results(batch_id)] == [
        ("a", {"id": "first"}), ("b", {"error": {}})]


def test_results_survive_reopening_and_come_in_input_order(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    batch_id = _batch(store)
    for custom_id, line_no in [("c", 3), ("a", 1), ("b", 2)]:
        store.add_result(LineResult(batch_id, custom_id, line_no, 200, {}))
    store.close()
    reopened = BatchStore(tmp_path)
    assert [r.custom_id for _, r in reopened.iter_results(batch_id)] == ["a", "b", "c"]
    assert reopened.get_batch(batch_id).completed == 3
    reopened.close()


def test_a_finished_batch_takes_no_more_results(store: BatchStore) -> None:
    batch_id = _batch(store)
    assert store.set_status(batch_id, "finalizing", only_from=("in_progress",))
    assert store.add_result(LineResult(batch_id, "a", 1, 200, {})) is False
    assert store.get_batch(batch_id).completed == 0
    assert not store.set_status(batch_id, "cancelling", only_from=("in_progress",))


def test_batches_page_newest_first(store: BatchStore) -> None:
    ids = [_batch(store) for _ in range(5)]
    page, more = store.list_batches(2)
    assert [b.id for b in page] == ids[::-1][:2] and more
    page, more = store.list_batches(2, after=page[-1].id)
    assert [b.id for b in page] == ids[::-1][2:4] and more
    page, more = store.list_batches(2, after=page[-1].id)
    assert [b.id for b in page] == [ids[0]] and not more


def test_files_and_batches_are_seen_by_their_owner_only(store: BatchStore) -> None:
    mine = store.add_file("in.jsonl", "batch", b"{}\n", num_lines=1, owner="alice")
    batch = store.add_batch("/v1/completions", mine.id, "24h", 86400.0, 1, None, owner="alice")
    assert store.get_file(mine.id, "alice") == mine and store.get_file(mine.id, "bob") is None
    assert store.get_batch(batch.id, "bob") is None and store.get_batch(batch.id, "alice")
    assert store.list_files(owner="bob") == [] and store.list_files(owner="alice") == [mine]
    assert store.list_batches(10, owner="bob") == ([], False)
    assert [b.id for b in store.list_batches(10, owner="alice")[0]] == [batch.id]
    # The service itself (recovery, the worker, finalizing) sees every owner's.
    assert store.get_file(mine.id) == mine and store.get_batch(batch.id).owner == "alice"


def test_a_store_from_before_owners_opens_with_its_rows_in_the_no_auth_namespace(
        tmp_path: Path) -> None:
    data = tmp_path / "old"
    data.mkdir()
    with sqlite3.connect(data / "batch.db") as conn:
        conn.executescript(_SCHEMA.replace(", owner TEXT NOT NULL DEFAULT ''", "").replace(
            ",\n    owner TEXT NOT NULL DEFAULT ''", ""))
        conn.execute("INSERT INTO files (id, filename, purpose, bytes, created_at) "
                     "VALUES ('file-old', 'in.jsonl', 'batch', 3, 0)")
    store = BatchStore(data)
    try:
        assert store.get_file("file-old", "").owner == ""
        assert store.get_file("file-old", "alice") is None
    finally:
        store.close()


def test_file_bytes_are_written_whole(store: BatchStore) -> None:
    record = store.add_file("x.jsonl", "batch", b"line\n" * 1000)
    assert store.read_file(record.id) == b"line\n" * 1000
    assert store.get_file(record.id).bytes == 5000
    assert not list(store.files_dir.glob(".*.tmp"))  # no temp file left behind


# -- the SQLite queue --------------------------------------------------------------------------


def _tasks(n: int, batch_id: str = "batch_x") -> list[LineTask]:
    return [LineTask(batch_id, i, f"c{i}", "/v1/completions", {"prompt": str(i)})
            for i in range(1, n + 1)]


def _take_one_and_die(path: str) -> None:
    """A consumer process that takes a line and dies without settling it (kill -9)."""
    import os

    async def take() -> None:
        queue = SqliteQueue(path)
        await queue.start()
        await queue.get()
        os._exit(0)  # no release, no lease renewal: the lease is orphaned

    asyncio.run(take())


@pytest.mark.timeout(60)
def test_queue_leases_are_exclusive_and_dead_owners_lose_them(tmp_path: Path) -> None:
    path = str(tmp_path / "queue.db")

    async def scenario() -> None:
        queue = SqliteQueue(path)
        await queue.start()
        await queue.put(_tasks(3))
        await queue.put(_tasks(3))  # enqueueing again (recovery) adds nothing
        assert await queue.depth() == 3
        first = await queue.get()
        assert first.task.custom_id == "c1"
        assert await queue.num_in_flight("batch_x") == 1
        # Another process takes c2 and dies holding it.
        child = multiprocessing.get_context("spawn").Process(target=_take_one_and_die,
                                                             args=(path,))
        child.start()
        await asyncio.to_thread(child.join, 30)
        assert await queue.depth() == 1  # only c3 waits; c2 is leased by the dead child
        await asyncio.to_thread(queue.reclaim_dead_leases)
        assert await queue.depth() == 2
        second, third = await queue.get(), await queue.get()
        assert {second.task.custom_id, third.task.custom_id} == {"c2", "c3"}
        await first.ack()
        await second.release()  # back to the queue for anyone
        await third.ack()
        assert await queue.depth() == 1 and await queue.num_in_flight("batch_x") == 0
        await queue.close()

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_an_expired_lease_is_handed_out_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        holder = SqliteQueue(tmp_path / "q.db", lease_seconds=0.2)
        other = SqliteQueue(tmp_path / "q.db")
        await holder.start()
        await other.start()
        await holder.put(_tasks(1))
        taken = await holder.get()
        holder._background[0].cancel()  # a hung owner: it stops renewing its lease
        again = await asyncio.wait_for(other.get(), 10)
        assert again.task == taken.task
        await again.ack()
        assert await other.depth() == 0
        await holder.close()
        await other.close()

    asyncio.run(scenario())
