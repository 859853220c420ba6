"""The apps' data-access layer against SQLite and a real PostgreSQL (127.0.0.1:5432, a fresh
database per test session, dropped afterwards)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from surge.apps.migrations import MIGRATIONS, Migration, apply_migrations
from surge.apps.storage import (
    GenerationRecord,
    Store,
    default_database_url,
    new_id,
    normalize_database_url,
    open_store,
)

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server; yields a template URL for it."""
    name = f"surge_apps_test_{secrets.token_hex(4)}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is needed for these tests: {exc}")
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind for every test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'apps.db'}"
        return
    base = request.getfixturevalue("postgres_server")
    schema = f"t_{secrets.token_hex(4)}"
    admin = sa.create_engine(normalize_database_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    # Each test gets its own schema, through libpq's `options` (search_path).
    yield f"{base}?options=-csearch_path%3D{schema}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    opened = open_store(database_url)
    yield opened
    opened.close()


def _generation(user: str, key: str | None, output: str = "text") -> GenerationRecord:
    return GenerationRecord(new_id(), user, "email", "formal", "short", {"points": "hi"}, None,
                            0.0, None, key, output, "stop", 0.0)


def test_migrations_apply_once_and_are_recorded(database_url: str) -> None:
    store = Store(database_url)
    try:
        assert store.schema_versions() == []
        assert store.migrate() == [m.version for m in MIGRATIONS]
        assert store.migrate() == []  # idempotent: nothing left to apply
        assert store.schema_versions() == [m.version for m in MIGRATIONS]
        columns = {c["name"] for c in sa.inspect(store.engine).get_columns("chat_messages")}
        assert "finish_reason" in columns  # migration 3 altered the table migration 1 made
    finally:
        store.close()


def test_a_new_migration_applies_on_top_of_an_existing_schema(store: Store) -> None:
    added = Migration(99, "test table",
                      lambda conn: conn.execute(sa.text("CREATE TABLE later_t (x INTEGER)")))
    assert apply_migrations(store.engine, (*MIGRATIONS, added)) == [99]
    assert apply_migrations(store.engine, (*MIGRATIONS, added)) == []
    assert sa.inspect(store.engine).has_table("later_t")


def test_failed_migration_leaves_nothing_half_applied(store: Store) -> None:
    def broken(conn: sa.Connection) -> None:
        conn.execute(sa.text("CREATE TABLE half_t (x INTEGER)"))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        apply_migrations(store.engine, (*MIGRATIONS, Migration(50, "broken", broken)))
    assert 50 not in store.schema_versions()
    assert not sa.inspect(store.engine).has_table("half_t")


def test_newer_database_schema_is_refused(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO schema_migrations VALUES (1000, 'future', 0)"))
    with pytest.raises(RuntimeError, match="newer than this Surge knows"):
        store.migrate()


def test_concurrent_startups_apply_each_migration_once(database_url: str) -> None:
    errors: list[BaseException] = []
    applied: list[list[int]] = []

    def start() -> None:
        try:
            opened = Store(database_url)
            applied.append(opened.migrate())
            opened.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert sorted(map(len, applied)) == [0, 0, 0, len(MIGRATIONS)]


def test_conversation_round_trip(store: Store) -> None:
    session = store.create_session("alice")
    store.add_message("alice", session.id, "user", "Where is my   order\n#42?")
    store.add_message("alice", session.id, "assistant", "On its way", "stopped", None)
    messages = store.messages("alice", session.id)
    assert [(m.role, m.content, m.status) for m in messages or []] == [
        ("user", "Where is my   order\n#42?", "complete"), ("assistant", "On its way", "stopped")]
    titled = store.get_session("alice", session.id)
    assert titled is not None and titled.title == "Where is my order #42?"
    assert [s.id for s in store.list_sessions("alice")] == [session.id]


def test_users_never_reach_each_others_history(store: Store) -> None:
    mine = store.create_session("alice")
    store.add_message("alice", mine.id, "user", "private")
    store.add_generation(_generation("alice", None))
    assert store.get_session("bob", mine.id) is None
    assert store.messages("bob", mine.id) is None
    assert store.add_message("bob", mine.id, "user", "intrusion") is None
    assert store.delete_session("bob", mine.id) is False
    assert store.list_sessions("bob") == []
    assert store.list_generations("bob") == []
    assert store.export_user("bob")["sessions"] == []
    assert store.delete_user("bob") == {"sessions": 0, "messages": 0, "generations": 0}
    assert [m.content for m in store.messages("alice", mine.id) or []] == ["private"]


def test_export_then_delete_a_users_history(store: Store) -> None:
    for title in ("one", "two"):
        session = store.create_session("alice", title)
        store.add_message("alice", session.id, "user", f"question {title}")
    store.add_generation(_generation("alice", "k1"))
    other = store.create_session("bob")
    store.add_message("bob", other.id, "user", "bob's")
    exported = store.export_user("alice")
    assert sorted(s["title"] for s in exported["sessions"]) == ["one", "two"]
    assert all(len(s["messages"]) == 1 for s in exported["sessions"])
    assert len(exported["generations"]) == 1 and "cache_key" not in exported["generations"][0]
    assert store.delete_user("alice") == {"sessions": 2, "messages": 2, "generations": 1}
    after = store.export_user("alice")
    assert after["sessions"] == [] and after["generations"] == []
    assert [m.content for m in store.messages("bob", other.id) or []] == ["bob's"]


def test_delete_one_session_takes_its_messages(store: Store) -> None:
    keep, drop = store.create_session("alice"), store.create_session("alice")
    for session in (keep, drop):
        store.add_message("alice", session.id, "user", session.id)
    assert store.delete_session("alice", drop.id)
    assert store.messages("alice", drop.id) is None
    with store.engine.connect() as conn:
        left = conn.execute(sa.text("SELECT session_id FROM chat_messages")).scalars().all()
    assert left == [keep.id]


def test_cache_lookup_finds_the_newest_answer_for_a_key(store: Store) -> None:
    assert store.find_cached("k") is None
    store.add_generation(_generation("alice", "k", "older"))
    newest = _generation("bob", "k", "newer")
    store.add_generation(GenerationRecord(**{**newest.__dict__, "created_at": 5.0}))
    store.add_generation(_generation("alice", None, "sampled"))
    found = store.find_cached("k")
    assert found is not None and found.output == "newer"
    assert found.inputs == {"points": "hi"}
    assert store.delete_generation("alice", found.id) is False  # bob's, not alice's


def test_many_threads_write_at_once(store: Store) -> None:
    """The server writes from a thread pool; concurrent writers must all land."""
    sessions = [store.create_session(f"user{i}") for i in range(8)]

    def chat(index: int) -> None:
        for turn in range(10):
            store.add_message(f"user{index}", sessions[index].id, "user", f"{index}-{turn}")

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for index, session in enumerate(sessions):
        contents = [m.content for m in store.messages(f"user{index}", session.id) or []]
        assert contents == [f"{index}-{turn}" for turn in range(10)]


@pytest.mark.parametrize("url, message", [
    ("mysql://u@h/db", "not supported"), ("sqlite://", "names no file"),
    ("sqlite:///:memory:", "names no file"), ("not a url", "not a database URL")])
def test_unsupported_database_urls_are_refused_clearly(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalize_database_url(url)


def test_default_database_is_sqlite_in_the_data_folder(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SURGE_DATA_DIR", str(tmp_path / "data"))
    assert default_database_url() == f"sqlite:///{tmp_path / 'data' / 'apps.db'}"
    store = open_store(None)
    store.close()
    assert (tmp_path / "data" / "apps.db").is_file()


def test_postgres_urls_use_psycopg3() -> None:
    assert normalize_database_url("postgresql://u:p@h:5/db") == "postgresql+psycopg://u:p@h:5/db"
    assert normalize_database_url("postgres://u@h/db").startswith("postgresql+psycopg://")


def test_demo_orders_are_seeded_and_looked_up(store: Store) -> None:
    from surge.apps.migrations import DEMO_ORDERS

    for seeded in DEMO_ORDERS:
        order = store.get_order(str(seeded["id"]).lower())  # ids are matched case-insensitively
        assert order is not None and order.id == seeded["id"]
        assert (order.item, order.status, order.tracking_number) == (
            seeded["item"], seeded["status"], seeded["tracking_number"])
    assert store.get_order("SRG-9999") is None
