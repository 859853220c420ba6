"""The storage schema as ordered, versioned migrations, recorded in ``schema_migrations``.

Why not alembic: the apps ship inside the package with a handful of tables; alembic would add an
``env.py``, an ini file and a scripts folder that must be found at run time in every install
layout, for what is here a list of functions. Each migration builds its tables in its own
``MetaData`` (the shape *at that version*), so a later migration that changes a table never
changes what an older one creates. Migrations run at startup in one transaction under a lock
(PostgreSQL advisory lock, SQLite ``BEGIN IMMEDIATE``), so replicas starting together against
one database apply each version exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

__all__ = ["DEMO_ORDERS", "MIGRATIONS", "Migration", "applied_versions", "apply_migrations"]

# Any constant works: it only has to be the same for every Surge process using the database.
_PG_LOCK_ID = 0x5355524745  # "SURGE"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[sa.Connection], None]


def _create_chat_tables(conn: sa.Connection) -> None:
    meta = sa.MetaData()
    sa.Table(
        "chat_sessions", meta,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False, index=True),
        sa.Column("title", sa.String(200), nullable=False, default=""),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False))
    sa.Table(
        "chat_messages", meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("session_id", sa.String(64),
                  sa.ForeignKey("chat_sessions.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False))
    meta.create_all(conn)


def _create_generations_table(conn: sa.Connection) -> None:
    meta = sa.MetaData()
    sa.Table(
        "generations", meta,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False, index=True),
        sa.Column("template", sa.String(32), nullable=False),
        sa.Column("tone", sa.String(32), nullable=False),
        sa.Column("length", sa.String(16), nullable=False),
        sa.Column("inputs", sa.Text, nullable=False),  # JSON object
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("temperature", sa.Float, nullable=False),
        sa.Column("seed", sa.BigInteger, nullable=True),
        # Set only for deterministic requests: equal keys must give equal outputs.
        sa.Column("cache_key", sa.String(64), nullable=True, index=True),
        sa.Column("output", sa.Text, nullable=False),
        sa.Column("finish_reason", sa.String(16), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False))
    meta.create_all(conn)


def _add_message_finish_reason(conn: sa.Connection) -> None:
    # Why the assistant stopped ("stop", "length"), next to our own status.
    conn.execute(sa.text("ALTER TABLE chat_messages ADD COLUMN finish_reason VARCHAR(16)"))


# The demo shop's orders, which the support chat looks up with its order-status tool (so the
# bot answers "where is my order?" from data). A deployment replaces or extends this table.
DEMO_ORDERS: tuple[dict[str, str | None], ...] = (
    {"id": "SRG-1001", "customer": "Ada Lovelace", "item": "Wireless headphones",
     "status": "shipped", "carrier": "DHL", "tracking_number": "JD014600003456",
     "estimated_delivery": "2026-12-05", "note": None},
    {"id": "SRG-1002", "customer": "Alan Turing", "item": "Espresso machine",
     "status": "processing", "carrier": None, "tracking_number": None,
     "estimated_delivery": "2026-12-09", "note": "Waiting for stock; ships within 3 days."},
    {"id": "SRG-1003", "customer": "Grace Hopper", "item": "Running shoes (size 42)",
     "status": "delivered", "carrier": "UPS", "tracking_number": "1Z999AA10123456784",
     "estimated_delivery": "2026-11-28", "note": "Delivered to the front desk."},
    {"id": "SRG-1004", "customer": "Edsger Dijkstra", "item": "Mechanical keyboard",
     "status": "cancelled", "carrier": None, "tracking_number": None,
     "estimated_delivery": None, "note": "Cancelled by the customer; refund issued 2026-11-30."},
    {"id": "SRG-1005", "customer": "Barbara Liskov", "item": "Desk lamp",
     "status": "out for delivery", "carrier": "UPS", "tracking_number": "1Z999AA10987654321",
     "estimated_delivery": "2026-12-03", "note": None},
    {"id": "SRG-1006", "customer": "Donald Knuth", "item": "Travel backpack",
     "status": "delayed", "carrier": "FedEx", "tracking_number": "771234567890",
     "estimated_delivery": "2026-12-12", "note": "Held up at the carrier's hub by weather."},
)


def _create_orders_table(conn: sa.Connection) -> None:
    meta = sa.MetaData()
    orders = sa.Table(
        "orders", meta,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("customer", sa.String(200), nullable=False),
        sa.Column("item", sa.String(200), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("carrier", sa.String(64), nullable=True),
        sa.Column("tracking_number", sa.String(64), nullable=True),
        sa.Column("estimated_delivery", sa.String(10), nullable=True),  # ISO date
        sa.Column("note", sa.Text, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False))
    meta.create_all(conn)
    now = time.time()
    conn.execute(orders.insert(), [{**order, "updated_at": now} for order in DEMO_ORDERS])


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "chat sessions and messages", _create_chat_tables),
    Migration(2, "writing-assistant generations", _create_generations_table),
    Migration(3, "finish reason of chat messages", _add_message_finish_reason),
    Migration(4, "orders (seeded with demo orders) for the support chat's tool",
              _create_orders_table),
)


def _migrations_table(meta: sa.MetaData) -> sa.Table:
    return sa.Table(
        "schema_migrations", meta,
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("applied_at", sa.Float, nullable=False))


def applied_versions(engine: sa.Engine) -> list[int]:
    """Versions recorded in the database, oldest first ([] for an empty database)."""
    if not sa.inspect(engine).has_table("schema_migrations"):
        return []
    table = _migrations_table(sa.MetaData())
    with engine.connect() as conn:
        return list(conn.scalars(sa.select(table.c.version).order_by(table.c.version)))


def apply_migrations(engine: sa.Engine,
                     migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply every migration not yet recorded, in order, atomically; returns those applied."""
    _check_order(migrations)
    table = _migrations_table(sa.MetaData())
    with engine.connect().execution_options(surge_write=True) as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
        table.create(conn, checkfirst=True)
        done = set(conn.scalars(sa.select(table.c.version)))
        newer = [m for m in migrations if m.version not in done]
        for migration in newer:
            migration.apply(conn)
            conn.execute(table.insert().values(version=migration.version, name=migration.name,
                                               applied_at=time.time()))
        return [m.version for m in newer]


def _check_order(migrations: tuple[Migration, ...]) -> None:
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise ValueError(f"migration versions must be unique and increasing, got {versions}")
