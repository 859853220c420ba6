"""Durable state of the Files and Batches API: file metadata, batches and per-line results.

Everything a user handed in or is owed must survive a kill -9 of the server, so it lives in
SQLite (WAL journal, ``synchronous=FULL``: a commit is on disk when it returns) next to a
folder of file bytes written atomically (temp file, fsync, rename, fsync of the folder).

A line's result is keyed by ``(batch_id, custom_id)`` and inserted with ``ON CONFLICT DO
NOTHING``: the queue delivers at least once, so the same line may be answered twice (a worker
died after answering but before acknowledging), and only the first answer counts. The batch's
``completed``/``failed`` counters move in the same transaction as the insert, so the live
progress never disagrees with the stored results.

The store is synchronous and safe to share between threads and processes (SQLite's own
locking, ``BEGIN IMMEDIATE`` for read-modify-write); async callers run it on one worker thread
(``surge.batch.service``) so the event loop never waits for an fsync.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surge.http import sqlite

__all__ = [
    "ACTIVE_STATUSES",
    "BATCH_STATUSES",
    "RUNNABLE_STATUSES",
    "TERMINAL_STATUSES",
    "BatchRecord",
    "BatchStore",
    "FileRecord",
    "LineResult",
    "new_id",
    "write_atomically",
]

BATCH_STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired",
                  "cancelling", "cancelled")
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
# Results are accepted while the batch runs (its lines are published while it is still
# "validating", so a fast worker may answer one then) or lets in-flight lines finish.
ACTIVE_STATUSES = frozenset({"validating", "in_progress", "cancelling"})
# Lines of these batches are worth running; the others' are skipped.
RUNNABLE_STATUSES = frozenset({"validating", "in_progress"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, num_lines INTEGER NOT NULL DEFAULT 0,
    urls TEXT NOT NULL DEFAULT '[]', owner TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL,
    window_seconds REAL NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    output_file_id TEXT, error_file_id TEXT, total INTEGER NOT NULL,
    completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0, metadata TEXT,
    owner TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS batches_by_status ON batches (status);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL, custom_id TEXT NOT NULL, line_no INTEGER NOT NULL,
    result_id TEXT NOT NULL, status_code INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (batch_id, custom_id));
"""
# Tables made before files and batches had owners get the column (the no-auth namespace).
_OWNER_COLUMN = "ALTER TABLE {table} ADD COLUMN owner TEXT NOT NULL DEFAULT ''"
_TIMESTAMP_OF = {"in_progress": "in_progress_at", "finalizing": "finalizing_at",
                 "completed": "completed_at", "failed": "failed_at", "expired": "expired_at",
                 "cancelling": "cancelling_at", "cancelled": "cancelled_at"}


@dataclass
class FileRecord:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    num_lines: int = 0
    urls: list[str] = field(default_factory=list)
    owner: str = ""  # whose file (``ApiKeyAuth.owner``): other keys see no such file

    def to_api(self) -> dict[str, Any]:
        """OpenAI's file object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes,
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


@dataclass
class BatchRecord:
    id: str
    seq: int
    endpoint: str
    input_file_id: str
    completion_window: str
    window_seconds: float
    status: str
    created_at: int
    total: int
    completed: int = 0
    failed: int = 0
    metadata: dict[str, str] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    timestamps: dict[str, int | None] = field(default_factory=dict)
    owner: str = ""  # whose batch: other keys see no such batch

    @property
    def expires_at(self) -> float:
        return self.created_at + self.window_seconds

    @property
    def num_done(self) -> int:
        return self.completed + self.failed

    def to_api(self) -> dict[str, Any]:
        """OpenAI's batch object."""
        return {"id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": None,
                "input_file_id": self.input_file_id,
                "completion_window": self.completion_window, "status": self.status,
                "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "created_at": self.created_at, "expires_at": int(self.expires_at),
                **{column: self.timestamps.get(column) for column in _TIMESTAMP_OF.values()},
                "request_counts": {"total": self.total, "completed": self.completed,
                                   "failed": self.failed},
                "metadata": self.metadata}


@dataclass
class LineResult:
    """One line's answer: the HTTP status and JSON body the endpoint gave (or an error)."""

    batch_id: str
    custom_id: str
    line_no: int
    status_code: int
    body: dict[str, Any]

    @property
    def succeeded(self) -> bool:
        return 200 <= self.status_code < 300


class BatchStore:
    """Files, batches and results under ``data_dir`` (``batch.db`` and ``files/``)."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite.connect(self.data_dir / "batch.db", synchronous="FULL")
        self._conn.row_factory = sqlite3.Row
        self._conn.executescript(_SCHEMA)
        self._add_owner_columns()

    def _add_owner_columns(self) -> None:
        for table in ("files", "batches"):
            columns = {row["name"] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            if "owner" not in columns:
                with self._transaction():
                    self._conn.execute(_OWNER_COLUMN.format(table=table))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- files -------------------------------------------------------------------------------

    def add_file(self, filename: str, purpose: str, content: bytes, *, num_lines: int = 0,
                 urls: list[str] | None = None, file_id: str | None = None,
                 owner: str = "") -> FileRecord:
        """Write the bytes durably, then the record: a file id never names missing bytes."""
        record = FileRecord(file_id or new_id("file-"), filename, purpose, len(content),
                            int(time.time()), num_lines, sorted(urls or []), owner)
        write_atomically(self.file_path(record.id), content)
        with self._transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO files (id, filename, purpose, bytes, created_at, "
                "num_lines, urls, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.filename, record.purpose, record.bytes, record.created_at,
                 record.num_lines, json.dumps(record.urls), owner))
        return record

    def get_file(self, file_id: str, owner: str | None = None) -> FileRecord | None:
        """The file, or None; with ``owner``, only that owner's (None: anyone's, for the
        service itself)."""
        row = self._query_one("SELECT * FROM files WHERE id = ?", (file_id,))
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        return FileRecord(row["id"], row["filename"], row["purpose"], row["bytes"],
                          row["created_at"], row["num_lines"], json.loads(row["urls"]),
                          row["owner"])

    def list_files(self, purpose: str | None = None,
                   owner: str | None = None) -> list[FileRecord]:
        conditions = [(column, value) for column, value in (("purpose", purpose),
                                                            ("owner", owner))
                      if value is not None]
        where = " AND ".join(f"{column} = ?" for column, _ in conditions)
        sql = f"SELECT id FROM files {'WHERE ' + where if where else ''} " \
              "ORDER BY created_at DESC, id"
        with self._lock:
            ids = [row["id"] for row in self._conn.execute(sql, [v for _, v in conditions])]
        return [record for file_id in ids if (record := self.get_file(file_id)) is not None]

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"

    def read_file(self, file_id: str) -> bytes:
        return self.file_path(file_id).read_bytes()

    def delete_file(self, file_id: str) -> bool:
        with self._transaction():
            deleted = self._conn.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        self.file_path(file_id).unlink(missing_ok=True)
        return bool(deleted)

    # -- batches -----------------------------------------------------------------------------

    def add_batch(self, endpoint: str, input_file_id: str, completion_window: str,
                  window_seconds: float, total: int,
                  metadata: dict[str, str] | None, owner: str = "") -> BatchRecord:
        batch_id = new_id("batch_")
        with self._transaction():
            self._conn.execute(
                "INSERT INTO batches (id, endpoint, input_file_id, completion_window, "
                "window_seconds, status, created_at, total, metadata, owner) "
                "VALUES (?, ?, ?, ?, ?, 'validating', ?, ?, ?, ?)",
                (batch_id, endpoint, input_file_id, completion_window, window_seconds,
                 int(time.time()), total, json.dumps(metadata) if metadata else None, owner))
        record = self.get_batch(batch_id)
        assert record is not None
        return record

    def get_batch(self, batch_id: str, owner: str | None = None) -> BatchRecord | None:
        """The batch, or None; with ``owner``, only that owner's."""
        row = self._query_one("SELECT * FROM batches WHERE id = ?", (batch_id,))
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        return _batch_from_row(row)

    def list_batches(self, limit: int, after: str | None = None,
                     owner: str | None = None) -> tuple[list[BatchRecord], bool]:
        """Newest first, ``limit`` of them after the batch ``after``; and whether more exist.
        With ``owner``, only that owner's."""
        conditions, args_list = [], []
        if after is not None:
            conditions.append("seq < (SELECT seq FROM batches WHERE id = ?)")
            args_list.append(after)
        if owner is not None:
            conditions.append("owner = ?")
            args_list.append(owner)
        sql = "SELECT * FROM batches" + (" WHERE " + " AND ".join(conditions)
                                         if conditions else "")
        args: tuple[Any, ...] = tuple(args_list)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY seq DESC LIMIT ?",
                                      (*args, limit + 1)).fetchall()
        return [_batch_from_row(row) for row in rows[:limit]], len(rows) > limit

    def batches_with_status(self, *statuses: str) -> list[BatchRecord]:
        marks = ", ".join("?" * len(statuses))
        with self._lock:
            rows = self._conn.execute(
                f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY seq", statuses
            ).fetchall()
        return [_batch_from_row(row) for row in rows]

    def count_by_status(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT status, COUNT(*) AS n FROM batches GROUP BY status").fetchall()
        counts = dict.fromkeys(BATCH_STATUSES, 0)
        counts.update({row["status"]: row["n"] for row in rows})
        return counts

    def set_status(self, batch_id: str, status: str, *, only_from: tuple[str, ...],
                   also_stamp: str | None = None) -> bool:
        """Move a batch to ``status`` if it is in one of ``only_from``; False otherwise.

        The status's timestamp is set (once), and ``also_stamp``'s too: a batch that expires
        goes to ``finalizing`` with ``expired_at`` set, so a restart knows where it goes next.
        """
        marks = ", ".join("?" * len(only_from))
        columns = [_TIMESTAMP_OF[s] for s in (status, also_stamp) if s in _TIMESTAMP_OF]
        stamp = "".join(f", {column} = COALESCE({column}, ?)" for column in columns)
        args = (status, *[int(time.time())] * len(columns), batch_id, *only_from)
        with self._transaction():
            changed = self._conn.execute(
                f"UPDATE batches SET status = ?{stamp} WHERE id = ? AND status IN ({marks})",
                args).rowcount
        return bool(changed)

    def set_output(self, batch_id: str, status: str, output_file_id: str | None,
                   error_file_id: str | None) -> None:
        """The last step of finalizing: the files exist, so the batch may say where."""
        column = _TIMESTAMP_OF[status]
        with self._transaction():
            self._conn.execute(
                f"UPDATE batches SET status = ?, output_file_id = ?, error_file_id = ?, "
                f"{column} = COALESCE({column}, ?) WHERE id = ?",
                (status, output_file_id, error_file_id, int(time.time()), batch_id))

    # -- results -----------------------------------------------------------------------------

    def add_result(self, result: LineResult) -> bool:
        """Store a line's first answer; False if it was answered before or the batch is over.

        The insert and the batch's counter move together, so counts equal stored results.
        """
        with self._transaction():
            row = self._conn.execute("SELECT status FROM batches WHERE id = ?",
                                     (result.batch_id,)).fetchone()
            if row is None or row["status"] not in ACTIVE_STATUSES:
                return False
            inserted = self._conn.execute(
                "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (result.batch_id, result.custom_id, result.line_no, new_id("batch_req_"),
                 result.status_code, json.dumps(result.body))).rowcount
            if inserted:
                counter = "completed" if result.succeeded else "failed"
                self._conn.execute(f"UPDATE batches SET {counter} = {counter} + 1 "
                                   "WHERE id = ?", (result.batch_id,))
        return bool(inserted)

    def answered_custom_ids(self, batch_id: str) -> set[str]:
        with self._lock:
            rows = self._conn.execute("SELECT custom_id FROM results WHERE batch_id = ?",
                                      (batch_id,)).fetchall()
        return {row["custom_id"] for row in rows}

    def iter_results(self, batch_id: str) -> Iterator[tuple[str, LineResult]]:
        """(result id, result) in input order."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM results WHERE batch_id = ? ORDER BY line_no", (batch_id,)
            ).fetchall()
        for row in rows:
            yield row["result_id"], LineResult(row["batch_id"], row["custom_id"],
                                               row["line_no"], row["status_code"],
                                               json.loads(row["body"]))

    # -- plumbing ----------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front: a read-then-write cannot be overtaken by
        # another process between its read and its write.
        with self._lock, sqlite.write_transaction(self._conn):
            yield

    def _query_one(self, sql: str, args: tuple[Any, ...]) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute(sql, args).fetchone()


def _batch_from_row(row: sqlite3.Row) -> BatchRecord:
    return BatchRecord(
        row["id"], row["seq"], row["endpoint"], row["input_file_id"], row["completion_window"],
        row["window_seconds"], row["status"], row["created_at"], row["total"],
        row["completed"], row["failed"],
        json.loads(row["metadata"]) if row["metadata"] else None, row["output_file_id"],
        row["error_file_id"], {column: row[column] for column in _TIMESTAMP_OF.values()},
        row["owner"])


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def write_atomically(path: Path, content: bytes) -> None:
    """Readers see the old file or the whole new one, never a torn one, even after a crash."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with temp.open("wb") as out:
        out.write(content)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself must be on disk too
    finally:
        os.close(directory)
