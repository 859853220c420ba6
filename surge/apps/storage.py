"""One data-access layer for the apps' state: chat sessions, their messages, and writing-assistant
generations, in SQLite (the default, a file in the user's data folder) or PostgreSQL.

Why SQLAlchemy Core: one set of queries for both databases, a connection pool, and no ORM
session state to leak between concurrent requests. The methods are synchronous (short,
indexed queries); the HTTP layer runs them on a small thread pool so the event loop never
waits on the database. Every query that reads or changes a user's rows filters by
``user_id``: a user can never see, export or delete another user's history.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from surge.apps.migrations import MIGRATIONS, applied_versions, apply_migrations
from surge.config import DATA_DIR_ENV, user_data_dir
from surge.http import sqlite

__all__ = [
    "DATA_DIR_ENV",
    "GenerationRecord",
    "MessageRecord",
    "OrderRecord",
    "SessionRecord",
    "Store",
    "default_database_url",
    "new_id",
    "normalize_database_url",
    "open_store",
]

_TITLE_CHARS = 60


def default_database_url() -> str:
    """``sqlite:///<data folder>/apps.db``: ``$SURGE_DATA_DIR``, else the platform's user data
    folder (``~/.local/share/surge`` on Linux)."""
    return f"sqlite:///{user_data_dir() / 'apps.db'}"


def normalize_database_url(url: str) -> str:
    """The SQLAlchemy URL for a user's ``--database-url``; refuses what we do not support."""
    try:
        parsed = sa.make_url(url)
    except Exception as exc:
        raise ValueError(f"--database-url {url!r} is not a database URL: use e.g. "
                         "sqlite:///path/to/apps.db or postgresql://user@host/db") from exc
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if backend == "sqlite" and parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        if parsed.database in (None, "", ":memory:"):
            # Each pooled connection would get its own empty in-memory database.
            raise ValueError(f"--database-url {url!r} names no file: use sqlite:///PATH")
        return url
    raise ValueError(f"--database-url {url!r} is not supported: allowed are sqlite:///PATH "
                     "and postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE")


@dataclass(frozen=True)
class SessionRecord:
    id: str
    user_id: str
    title: str
    created_at: float
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "user_id"}


@dataclass(frozen=True)
class MessageRecord:
    id: int
    session_id: str
    role: str
    content: str
    status: str  # "complete", "stopped" (the user pressed stop) or "error"
    finish_reason: str | None
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GenerationRecord:
    id: str
    user_id: str
    template: str
    tone: str
    length: str
    inputs: dict[str, str]
    model: str | None
    temperature: float
    seed: int | None
    cache_key: str | None
    output: str
    finish_reason: str | None
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("user_id", "cache_key")}


@dataclass(frozen=True)
class OrderRecord:
    """An order of the shop the support chat serves (looked up by its order-status tool)."""

    id: str
    customer: str
    item: str
    status: str
    carrier: str | None
    tracking_number: str | None
    estimated_delivery: str | None
    note: str | None
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_meta = sa.MetaData()
_sessions = sa.Table(
    "chat_sessions", _meta,
    sa.Column("id", sa.String(64), primary_key=True), sa.Column("user_id", sa.String(128)),
    sa.Column("title", sa.String(200)), sa.Column("created_at", sa.Float),
    sa.Column("updated_at", sa.Float))
_messages = sa.Table(
    "chat_messages", _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session_id", sa.String(64)), sa.Column("role", sa.String(16)),
    sa.Column("content", sa.Text), sa.Column("status", sa.String(16)),
    sa.Column("finish_reason", sa.String(16)), sa.Column("created_at", sa.Float))
_orders = sa.Table(
    "orders", _meta,
    sa.Column("id", sa.String(32), primary_key=True), sa.Column("customer", sa.String(200)),
    sa.Column("item", sa.String(200)), sa.Column("status", sa.String(32)),
    sa.Column("carrier", sa.String(64)), sa.Column("tracking_number", sa.String(64)),
    sa.Column("estimated_delivery", sa.String(10)), sa.Column("note", sa.Text),
    sa.Column("updated_at", sa.Float))
_generations = sa.Table(
    "generations", _meta,
    sa.Column("id", sa.String(64), primary_key=True), sa.Column("user_id", sa.String(128)),
    sa.Column("template", sa.String(32)), sa.Column("tone", sa.String(32)),
    sa.Column("length", sa.String(16)), sa.Column("inputs", sa.Text),
    sa.Column("model", sa.String(200)), sa.Column("temperature", sa.Float),
    sa.Column("seed", sa.BigInteger), sa.Column("cache_key", sa.String(64)),
    sa.Column("output", sa.Text), sa.Column("finish_reason", sa.String(16)),
    sa.Column("created_at", sa.Float))


class Store:
    """The apps' database. ``Store(url)`` connects; ``migrate()`` brings the schema up to date
    (``open_store`` does both)."""

    def __init__(self, url: str, pool_size: int = 4) -> None:
        self.url = normalize_database_url(url)
        self.engine = _create_engine(self.url, pool_size)

    def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied now ([] when up to date)."""
        known = max(m.version for m in MIGRATIONS)
        recorded = applied_versions(self.engine)
        if recorded and recorded[-1] > known:
            raise RuntimeError(f"the database at {self.safe_url} has schema version "
                               f"{recorded[-1]}, newer than this Surge knows ({known}): "
                               "upgrade Surge or use another --database-url")
        return apply_migrations(self.engine)

    def schema_versions(self) -> list[int]:
        return applied_versions(self.engine)

    @property
    def safe_url(self) -> str:
        return sa.make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    # -- chat ----------------------------------------------------------------------------

    def create_session(self, user_id: str, title: str = "",
                       session_id: str | None = None) -> SessionRecord:
        now = time.time()
        record = SessionRecord(session_id or new_id(), user_id, title[:200], now, now)
        with self._write() as conn:
            conn.execute(_sessions.insert().values(**asdict(record)))
        return record

    def get_session(self, user_id: str, session_id: str) -> SessionRecord | None:
        with self._read() as conn:
            row = conn.execute(sa.select(_sessions).where(
                _sessions.c.id == session_id, _sessions.c.user_id == user_id)).first()
        return SessionRecord(**row._mapping) if row else None

    def list_sessions(self, user_id: str, limit: int = 100) -> list[SessionRecord]:
        query = (sa.select(_sessions).where(_sessions.c.user_id == user_id)
                 .order_by(_sessions.c.updated_at.desc()).limit(limit))
        with self._read() as conn:
            return [SessionRecord(**row._mapping) for row in conn.execute(query)]

    def add_message(self, user_id: str, session_id: str, role: str, content: str,
                    status: str = "complete", finish_reason: str | None = None
                    ) -> MessageRecord | None:
        """Append a message to the user's session (None if it is not theirs); the first user
        message also titles the session."""
        now = time.time()
        with self._write() as conn:
            session = conn.execute(sa.select(_sessions.c.title).where(
                _sessions.c.id == session_id, _sessions.c.user_id == user_id)).first()
            if session is None:
                return None
            values = {"session_id": session_id, "role": role, "content": content,
                      "status": status, "finish_reason": finish_reason, "created_at": now}
            message_id = conn.execute(_messages.insert().values(**values)).inserted_primary_key
            update: dict[str, Any] = {"updated_at": now}
            if not session.title and role == "user":
                update["title"] = _title(content)
            conn.execute(_sessions.update().where(_sessions.c.id == session_id).values(**update))
        return MessageRecord(id=int(message_id[0]), **values)

    def messages(self, user_id: str, session_id: str) -> list[MessageRecord] | None:
        """The session's messages in order, or None if it is not the user's."""
        query = (sa.select(_messages).join(_sessions, _sessions.c.id == _messages.c.session_id)
                 .where(_sessions.c.id == session_id, _sessions.c.user_id == user_id)
                 .order_by(_messages.c.id))
        with self._read() as conn:
            if not _owns(conn, user_id, session_id):
                return None
            return [MessageRecord(**row._mapping) for row in conn.execute(query)]

    def delete_session(self, user_id: str, session_id: str) -> bool:
        with self._write() as conn:
            if not _owns(conn, user_id, session_id):
                return False
            conn.execute(_messages.delete().where(_messages.c.session_id == session_id))
            conn.execute(_sessions.delete().where(_sessions.c.id == session_id))
        return True

    # -- writing assistant -----------------------------------------------------------------

    def get_order(self, order_id: str) -> OrderRecord | None:
        """The order with this id (as written, case-insensitively), or None."""
        query = sa.select(_orders).where(_orders.c.id == order_id.strip().upper())
        with self._read() as conn:
            row = conn.execute(query).first()
        return OrderRecord(**row._mapping) if row is not None else None

    def add_generation(self, record: GenerationRecord) -> GenerationRecord:
        values = asdict(record)
        values["inputs"] = json.dumps(record.inputs, sort_keys=True)
        with self._write() as conn:
            conn.execute(_generations.insert().values(**values))
        return record

    def list_generations(self, user_id: str, limit: int = 100) -> list[GenerationRecord]:
        query = (sa.select(_generations).where(_generations.c.user_id == user_id)
                 .order_by(_generations.c.created_at.desc()).limit(limit))
        with self._read() as conn:
            return [_generation(row) for row in conn.execute(query)]

    def find_cached(self, cache_key: str) -> GenerationRecord | None:
        """The newest generation made for exactly this deterministic request, by anyone: equal
        keys give equal outputs, so the text reveals nothing the requester would not get."""
        query = (sa.select(_generations).where(_generations.c.cache_key == cache_key)
                 .order_by(_generations.c.created_at.desc()).limit(1))
        with self._read() as conn:
            row = conn.execute(query).first()
        return _generation(row) if row else None

    def delete_generation(self, user_id: str, generation_id: str) -> bool:
        with self._write() as conn:
            deleted = conn.execute(_generations.delete().where(
                _generations.c.id == generation_id, _generations.c.user_id == user_id))
        return deleted.rowcount > 0

    # -- a user's whole history -------------------------------------------------------------

    def export_user(self, user_id: str) -> dict[str, Any]:
        sessions = self.list_sessions(user_id, limit=1_000_000)
        return {
            "exported_at": time.time(),
            "sessions": [{**s.to_dict(), "messages": [m.to_dict() for m in
                                                      self.messages(user_id, s.id) or []]}
                         for s in sessions],
            "generations": [g.to_dict() for g in
                            self.list_generations(user_id, limit=1_000_000)],
        }

    def delete_user(self, user_id: str) -> dict[str, int]:
        """Delete every session, message and generation of the user; returns the counts."""
        owned = sa.select(_sessions.c.id).where(_sessions.c.user_id == user_id)
        with self._write() as conn:
            messages = conn.execute(_messages.delete().where(
                _messages.c.session_id.in_(owned))).rowcount
            sessions = conn.execute(_sessions.delete().where(
                _sessions.c.user_id == user_id)).rowcount
            generations = conn.execute(_generations.delete().where(
                _generations.c.user_id == user_id)).rowcount
        return {"sessions": sessions, "messages": messages, "generations": generations}

    # -- transactions ------------------------------------------------------------------------

    def _read(self) -> contextlib.AbstractContextManager[sa.Connection]:
        return self.engine.begin()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        # SQLite: take the write lock when the transaction starts, so two writers queue on the
        # busy timeout instead of one failing at once when it upgrades a read lock.
        with self.engine.connect().execution_options(surge_write=True) as conn, conn.begin():
            yield conn


def new_id() -> str:
    return secrets.token_hex(16)


def _title(content: str) -> str:
    words = " ".join(content.split())
    return words if len(words) <= _TITLE_CHARS else words[: _TITLE_CHARS - 1] + "…"


def _owns(conn: sa.Connection, user_id: str, session_id: str) -> bool:
    return conn.execute(sa.select(_sessions.c.id).where(
        _sessions.c.id == session_id, _sessions.c.user_id == user_id)).first() is not None


def _generation(row: sa.Row[Any]) -> GenerationRecord:
    values = dict(row._mapping)
    values["inputs"] = json.loads(values["inputs"])
    return GenerationRecord(**values)


def _create_engine(url: str, pool_size: int) -> sa.Engine:
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size,
                                pool_pre_ping=True)
    database = sa.make_url(url).database
    if database and database != ":memory:":
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size,
                              connect_args={"check_same_thread": False,
                                            "timeout": sqlite.BUSY_TIMEOUT_MS / 1000})
    sa.event.listen(engine, "connect", _configure_sqlite)
    sa.event.listen(engine, "begin", _begin_sqlite)
    return engine


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the driver, say when transactions begin (see _begin_sqlite).
    dbapi_connection.isolation_level = None
    sqlite.configure(dbapi_connection, synchronous="NORMAL", foreign_keys=True)


def _begin_sqlite(conn: sa.Connection) -> None:
    write = conn.get_execution_options().get("surge_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def open_store(url: str | None) -> Store:
    """Connect to ``url`` (default: the SQLite file in the data folder) and migrate."""
    store = Store(url or default_database_url())
    store.migrate()
    return store
