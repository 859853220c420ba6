"""SQLite as the HTTP features keep their state in it (the batch API's store and queue, the web
apps' history): one set of settings, one way to write.

- WAL: readers never wait for the writer, so a page loads while answers are stored.
- A busy timeout: another process (a second replica, a batch worker) holding the write lock
  makes a writer wait for it, not fail at once.
- ``BEGIN IMMEDIATE`` for every write: the write lock is taken up front, so a read-then-write
  cannot be overtaken by another process between its read and its write.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

__all__ = ["BUSY_TIMEOUT_MS", "configure", "connect", "write_transaction"]

BUSY_TIMEOUT_MS = 30_000
# FULL: a commit survives a power cut (batch results are owed to a client). NORMAL: it may be
# lost then, but the file stays consistent (chat history).
Synchronous = Literal["FULL", "NORMAL"]


def connect(path: str | Path, *, synchronous: Synchronous = "FULL",
            foreign_keys: bool = False) -> sqlite3.Connection:
    """A connection usable from any one thread at a time, in autocommit mode (transactions
    are explicit: ``write_transaction``)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                           timeout=BUSY_TIMEOUT_MS / 1000)
    configure(conn, synchronous=synchronous, foreign_keys=foreign_keys)
    return conn


def configure(conn: Any, *, synchronous: Synchronous = "FULL",
              foreign_keys: bool = False) -> None:
    """The pragmas, on a DB-API connection (also one SQLAlchemy opened)."""
    pragmas = ["journal_mode=WAL", f"synchronous={synchronous}",
               f"busy_timeout={BUSY_TIMEOUT_MS}"]
    if foreign_keys:
        pragmas.append("foreign_keys=ON")
    cursor = conn.cursor()
    for pragma in pragmas:
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` when the block raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
