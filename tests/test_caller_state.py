"""What the caller owns survives a unit; what a unit leaves open does not leak;
a boundary looks only at its own thread's connections."""

from __future__ import annotations

import contextlib
import gc
import logging
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.db import connections, transaction

from django_task_db import task_scope
from django_task_db.signals import task_finished, task_started
from tests.servers import Server
from tests.testapp.models import Item

TABLE = Item._meta.db_table
BACKENDS = ["mysql", "postgres", "sqlite"]
# A strategy, and the CONN_MAX_AGE the connection is opened with.
STRATEGIES = {
    "close_old-age0": ("close_old", 0),
    "close_old-ageNone": ("close_old", None),
    "close_all": ("close_all", None),
}


class Boom(Exception):
    pass


class SQLiteFile:
    """The SQLite alias as its file sees it, through sqlite3 outside Django."""

    name = "SQLite"

    def __init__(self, alias: str):
        self.alias = alias
        self.path = django_settings.DATABASES[alias]["NAME"]

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path, timeout=10)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def session_id(self) -> object:
        """The driver connection of this thread: its identity is the session."""
        connection = connections[self.alias]
        connection.ensure_connection()
        return connection.connection


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest) -> Server | SQLiteFile:
    """MariaDB, PostgreSQL (plain persistent connections) and SQLite's file,
    the table empty, this thread's connection closed."""
    found = request.getfixturevalue(request.param)
    if request.param == "sqlite":
        return SQLiteFile(found)
    connections[found.alias].close()
    return found


@pytest.fixture
def max_age(db: Server | SQLiteFile) -> Iterator[Any]:
    """Set the CONN_MAX_AGE that db's next connection opens with."""
    settings_dict = connections[db.alias].settings_dict
    saved = settings_dict["CONN_MAX_AGE"]

    def set_to(age: int | None) -> None:
        connections[db.alias].close()
        settings_dict["CONN_MAX_AGE"] = age

    yield set_to
    connections[db.alias].close()
    settings_dict["CONN_MAX_AGE"] = saved


@pytest.fixture
def pings(db: Server | SQLiteFile, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every is_usable() (Django's ping) on this thread's connection of db."""
    connection = connections[db.alias]
    seen: list[str] = []
    original = connection.is_usable

    def counted() -> bool:
        seen.append(db.alias)
        return original()

    monkeypatch.setattr(connection, "is_usable", counted)
    return seen


def names(db: Server | SQLiteFile) -> list[str]:
    """The committed rows, as the server (or the file) has them."""
    return sorted(row[0] for row in db.query(f"SELECT name FROM {TABLE}"))


def warnings_about(caplog: pytest.LogCaptureFixture, alias: str) -> list[str]:
    messages = [
        r.getMessage()
        for r in caplog.records
        if r.name == "django_task_db" and r.levelno >= logging.WARNING
    ]
    assert all(alias in message for message in messages), messages
    return messages


def no_session_left(db: Server | SQLiteFile) -> bool:
    if connections[db.alias].connection is not None:
        return False
    return not isinstance(db, Server) or db.wait_for_count(0) == 0


# -- 3a. Autocommit turned off by the caller -----------------------------------


@pytest.mark.parametrize("ending", ["commit", "rollback"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_callers_transaction_survives_a_unit(
    db, settings, max_age, pings, caplog, closed, strategy, ending
):
    """Caller's set_autocommit(False) transaction around a unit: same session,
    its commit keeps a and b (rollback neither), one warning, no close, no ping."""
    name, age = STRATEGIES[strategy]
    settings.TASK_DB = {"STRATEGY": name}
    max_age(age)
    alias = db.alias

    @task_scope
    def helper():
        return db.session_id(), Item.objects.using(alias).count()

    caplog.set_level(logging.WARNING, logger="django_task_db")
    transaction.set_autocommit(False, using=alias)
    try:
        Item.objects.using(alias).create(name="a")
        session = db.session_id()
        inside, count = helper()
        autocommit = connections[alias].get_autocommit()
        Item.objects.using(alias).create(name="b")
        after = db.session_id()
        if ending == "commit":
            transaction.commit(using=alias)
        else:
            transaction.rollback(using=alias)
    finally:
        transaction.set_autocommit(True, using=alias)
    assert names(db) == (["a", "b"] if ending == "commit" else [])
    assert autocommit is False  # the caller's setting, untouched
    assert inside == session == after
    assert count == 1  # the unit saw the caller's uncommitted row
    assert closed == []
    assert pings == []
    assert len(warnings_about(caplog, alias)) == 1


def test_callers_transaction_under_keep_no_warning(db, settings, pings, caplog, closed):
    """Under keep, a unit in the caller's transaction warns of nothing, does
    not ping, and does not roll back what the caller began."""
    settings.TASK_DB = {"STRATEGY": "keep"}
    alias = db.alias

    @task_scope
    def helper():
        return db.session_id()

    caplog.set_level(logging.WARNING, logger="django_task_db")
    transaction.set_autocommit(False, using=alias)
    try:
        Item.objects.using(alias).create(name="a")
        session = db.session_id()
        inside = helper()
        autocommit = connections[alias].get_autocommit()
        Item.objects.using(alias).create(name="b")
        transaction.commit(using=alias)
    finally:
        transaction.set_autocommit(True, using=alias)
    assert names(db) == ["a", "b"]
    assert inside == session
    assert autocommit is False
    assert closed == []
    assert pings == []
    assert warnings_about(caplog, alias) == []


# -- 3b. A chunked read in progress --------------------------------------------


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_units_inside_a_chunked_read(db, settings, max_age, caplog, strategy):
    """A unit per row of iterator(chunk_size=3) over 10 rows: all 10 seen on
    the iterator's session, one warning per unit; cleanup resumes after."""
    name, age = STRATEGIES[strategy]
    settings.TASK_DB = {"STRATEGY": name}
    max_age(age)
    alias = db.alias
    expected = [f"row{i:02}" for i in range(10)]
    Item.objects.using(alias).bulk_create(Item(name=n) for n in expected)
    session = db.session_id()
    seen: list[str] = []
    sessions: list[object] = []
    warned: list[int] = []
    caplog.set_level(logging.WARNING, logger="django_task_db")
    rows = Item.objects.using(alias).order_by("name").iterator(chunk_size=3)
    failure = None
    try:
        for item in rows:
            caplog.clear()
            with task_scope():
                assert Item.objects.using(alias).filter(pk=item.pk).exists()
                seen.append(item.name)
                sessions.append(db.session_id())
            warned.append(len(warnings_about(caplog, alias)))
    except Exception as exc:
        # Only the message: a traceback kept by pytest would keep SQLite's
        # cursor, and its lock on the file, for the tests that follow.
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            rows.close()
        del rows
        gc.collect()
    assert failure is None, failure
    assert seen == expected
    assert sessions == [session] * 10
    assert warned == [1] * 10
    caplog.clear()
    with task_scope():
        pass
    assert warnings_about(caplog, alias) == []
    if (name, age) == ("close_old", None):
        assert db.session_id() == session
    else:
        assert no_session_left(db)


# -- 4. A transaction a unit leaves open ---------------------------------------

LEFT_OPEN = {
    # case: (TASK_DB, CONN_MAX_AGE, unit 1 fails)
    "keep": ({"STRATEGY": "keep"}, None, False),
    "keep-failed-no_close_on_failure": (
        {"STRATEGY": "keep", "CLOSE_ON_FAILURE": False},
        None,
        True,
    ),
    "close_old-ageNone": ({"STRATEGY": "close_old"}, None, False),
    "close_all": ({"STRATEGY": "close_all"}, None, False),
}


@pytest.mark.parametrize("opened", [False, True], ids=["not_open", "open"])
@pytest.mark.parametrize("case", list(LEFT_OPEN))
def test_transaction_left_open_by_a_unit_is_rolled_back(
    db, settings, max_age, caplog, closed, case, opened
):
    """Unit 1 set_autocommit(False), inserts x, ends: x rolled back, autocommit
    back on, one warning; units 2 (atomic) and 3 (autocommit) commit y and z."""
    task_db, age, fails = LEFT_OPEN[case]
    settings.TASK_DB = task_db
    max_age(age)
    alias = db.alias
    if opened:  # autocommit on at the unit's start; else not connected yet
        db.session_id()
    caplog.set_level(logging.WARNING, logger="django_task_db")
    sessions = []

    def unit_1():
        with task_scope():
            transaction.set_autocommit(False, using=alias)
            Item.objects.using(alias).create(name="x")
            sessions.append(db.session_id())
            if fails:
                raise Boom

    if fails:
        with pytest.raises(Boom):
            unit_1()
    else:
        unit_1()
    autocommit = connections[alias].get_autocommit()
    with task_scope():
        with transaction.atomic(using=alias):
            Item.objects.using(alias).create(name="y")
    with task_scope():
        Item.objects.using(alias).create(name="z")
        sessions.append(db.session_id())
    assert names(db) == ["y", "z"]
    assert autocommit is True
    if task_db["STRATEGY"] != "close_all":
        # Rolled back, not closed: the connection goes on.
        assert sessions[0] == sessions[1]
        assert closed == []
    assert len(warnings_about(caplog, alias)) == 1


# -- 5. Only this thread's connections -----------------------------------------

MANY = 500


@pytest.fixture
def many_aliases() -> Iterator[list[str]]:
    """MANY more SQLite ":memory:" aliases in DATABASES, and in connections."""
    extra = {
        f"caller_state_memory_{i}": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": ":memory:",
        }
        for i in range(MANY)
    }
    # connections.settings is the very dict of DATABASES, read once: add to
    # it, with the defaults Django fills in when it reads DATABASES.
    connections.configure_settings({**connections.settings, **extra})
    connections.settings.update(extra)
    if django_settings.DATABASES is not connections.settings:
        django_settings.DATABASES.update(extra)
    try:
        yield list(extra)
    finally:
        for connection in connections.all(initialized_only=True):
            if connection.alias in extra:
                connection.close()
                del connections[connection.alias]
        for alias in extra:
            connections.settings.pop(alias, None)
            django_settings.DATABASES.pop(alias, None)


def open_and_close_in_another_thread(aliases: list[str]) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for alias in aliases:
                connections[alias].ensure_connection()
            for alias in aliases:
                connections[alias].close()  # a no-op on ":memory:" in Django
                del connections[alias]  # which drops the driver's connection
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert errors == []


def initialized() -> set[str]:
    return {c.alias for c in connections.all(initialized_only=True)}


@pytest.mark.parametrize("boundary", ["task_scope", "signals"])
def test_boundary_ignores_aliases_other_threads_used(
    sqlite, settings, many_aliases, boundary
):
    """500 aliases connected in another thread: a unit in this one creates no
    connection wrapper for them, and still closes its own connection."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    open_and_close_in_another_thread(many_aliases)
    connections[sqlite].ensure_connection()
    before = initialized()
    assert not before & set(many_aliases)
    if boundary == "task_scope":
        with task_scope():
            pass
    else:
        task_started.send(sender=None)
        try:
            between = initialized()
        finally:
            task_finished.send(sender=None)  # never leave the unit open
        assert between == before
    assert initialized() == before
    assert connections[sqlite].connection is None


# -- Found in review: a chunked read of a connection closed since ------------


def test_chunked_read_of_a_closed_connection_holds_nothing(postgres, settings, caplog):
    """An iterator left half read on a connection that was closed since does
    not hold the new connection: a close_all unit closes it, with no warning."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    alias = postgres.alias
    Item.objects.using(alias).bulk_create(Item(name=str(i)) for i in range(5))
    rows = Item.objects.using(alias).iterator(chunk_size=2)
    next(rows)
    connections[alias].close()
    with caplog.at_level(logging.WARNING, logger="django_task_db"):
        with task_scope():
            session = postgres.session_id()
    assert connections[alias].connection is None
    postgres.wait_until_gone(session)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    del rows
    gc.collect()
