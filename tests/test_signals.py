"""The generic signals sent directly by a runner, as SQLite and the servers see them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache
from django.db import connections
from django.db.backends.signals import connection_created

from django_task_db import task_scope
from django_task_db.signals import (
    connection_closed,
    task_finished,
    task_started,
    worker_process_started,
    worker_stopping,
)
from django_task_db.units import in_unit
from tests.testapp.models import Item

# What recording_strategy saw: (alias, phase, connection object).
strategy_calls: list[tuple[str, str, object]] = []


def recording_strategy(connection, phase):
    """A user's own strategy: records every call, closes only at "finish"."""
    strategy_calls.append((connection.alias, phase, connection))
    if phase == "finish":
        connection.close()


class ObservedCache(LocMemCache):
    """A cache whose close() calls are counted."""

    closes: list[str] = []
    fail = False

    def close(self, **kwargs):
        ObservedCache.closes.append("closed")
        if ObservedCache.fail:
            raise ConnectionError("cache server went away")
        super().close(**kwargs)


class Junk:
    pass


@pytest.fixture
def opened() -> Iterator[list[str]]:
    """Every alias for which Django opens a connection during the test."""
    seen: list[str] = []

    def record(connection, **kwargs):
        seen.append(connection.alias)

    connection_created.connect(
        record, weak=False, dispatch_uid="tests.test_signals.opened"
    )
    yield seen
    connection_created.disconnect(dispatch_uid="tests.test_signals.opened")


@pytest.fixture
def observed_cache(settings) -> Iterator[type[ObservedCache]]:
    """CACHES["default"] is an ObservedCache, initialized, with no close() seen yet."""
    settings.CACHES = {
        "default": {
            "BACKEND": "tests.test_signals.ObservedCache",
            "LOCATION": "observed",
        }
    }
    caches["default"].set("key", "value")
    assert isinstance(caches["default"], ObservedCache)
    ObservedCache.closes.clear()
    ObservedCache.fail = False
    yield ObservedCache
    ObservedCache.fail = False


@pytest.fixture(autouse=True)
def _clean_strategy_calls() -> None:
    strategy_calls.clear()


def is_open(alias: str) -> bool:
    return connections[alias].connection is not None


# -- A runner sending the signals with junk arguments --------------------------


def test_task_started_with_unknown_kwargs_applies_the_strategy(
    sqlite, settings, opened, closed
):
    """task_started(sender=None, <unknown kwargs>) still applies close_all."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    Item.objects.using(sqlite).count()
    task_started.send(sender=None, queue="default", retries=3, request=Junk())
    assert not is_open(sqlite)
    assert closed == [("default", "close_all")]
    Item.objects.using(sqlite).count()
    task_finished.send(sender=None, result=Junk(), runtime=0.5)
    assert not is_open(sqlite)
    assert opened == ["default", "default"]
    assert closed == [("default", "close_all")] * 2


def test_repeated_task_started(sqlite, settings, opened, closed):
    """task_started twice without task_finished applies the strategy both times."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    Item.objects.using(sqlite).count()
    task_started.send(sender=None)
    Item.objects.using(sqlite).count()
    task_started.send(sender=None)
    assert not is_open(sqlite)
    assert opened == ["default", "default"]
    assert closed == [("default", "close_all")] * 2
    assert in_unit()
    task_finished.send(sender=None)
    assert not in_unit()


def test_task_finished_without_task_started(sqlite, settings, closed):
    """task_finished with no task_started before it applies the strategy."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    Item.objects.using(sqlite).count()
    assert not in_unit()
    task_finished.send(sender=None, unknown="x")
    assert not is_open(sqlite)
    assert closed == [("default", "close_all")]
    assert not in_unit()


@pytest.mark.parametrize("failed", ["yes", 1, [None]])
def test_task_finished_with_a_truthy_failed(sqlite, settings, closed, failed):
    """A truthy failed (e.g. "yes") is a failure: closed even under keep."""
    settings.TASK_DB = {"STRATEGY": "keep"}
    Item.objects.using(sqlite).count()
    task_finished.send(sender=None, failed=failed)
    assert not is_open(sqlite)
    assert closed == [("default", "failure")]


@pytest.mark.parametrize("failed", ["", 0, None, False])
def test_task_finished_with_a_falsy_failed(sqlite, settings, closed, failed):
    """failed="" (or any falsy value) is a success: kept under keep."""
    settings.TASK_DB = {"STRATEGY": "keep"}
    Item.objects.using(sqlite).count()
    task_finished.send(sender=None, failed=failed)
    assert is_open(sqlite)
    assert closed == []


def test_signals_with_a_strategy_argument(sqlite, settings, closed):
    """The strategy keyword of a raw signal overrides TASK_DB for that call."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    Item.objects.using(sqlite).count()
    task_started.send(sender=None, strategy="keep")
    task_finished.send(sender=None, strategy="keep")
    assert is_open(sqlite)
    task_finished.send(sender=None, strategy="close_all", failed=False)
    assert not is_open(sqlite)
    assert closed == [("default", "close_all")]


def test_worker_process_started_with_junk_keeps_own_connections(
    sqlite, settings, opened, closed
):
    """worker_process_started with junk kwargs keeps this process's connections."""
    Item.objects.using(sqlite).count()
    worker_process_started.send(sender=None, pid=-1, junk=Junk())
    assert is_open(sqlite)
    Item.objects.using(sqlite).count()
    assert opened == ["default"]
    assert closed == []


def test_raw_signals_with_junk_on_a_server(direct_server, settings, closed):
    """Junk signals keep a server session under keep; failed/stopping end it."""
    settings.TASK_DB = {"STRATEGY": "keep"}
    alias = direct_server.alias
    task_started.send(sender=None, extra=Junk())
    session = direct_server.session_id()
    task_started.send(sender=None)
    task_finished.send(sender=None, retries=2)
    task_finished.send(sender=None)
    worker_process_started.send(sender=None, junk=1)
    assert direct_server.session_id() == session
    assert direct_server.sessions() == {session}
    assert closed == []

    task_finished.send(sender=None, failed="yes")
    direct_server.wait_until_gone(session)
    assert direct_server.wait_for_count(0) == 0
    assert closed == [(alias, "failure")]

    second = direct_server.session_id()
    assert second != session
    worker_stopping.send(sender=None, reason=Junk())
    assert direct_server.wait_for_count(0) == 0
    assert closed == [(alias, "failure"), (alias, "worker_stopping")]


def test_task_started_close_all_on_a_server(direct_server, settings, closed):
    """task_started(sender=None, <junk>) under close_all ends the server session."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    session = direct_server.session_id()
    task_started.send(sender=None, task_id="abc", args=(1, 2))
    direct_server.wait_until_gone(session)
    assert direct_server.wait_for_count(0) == 0
    assert direct_server.session_id() != session
    task_finished.send(sender=None)
    assert direct_server.wait_for_count(0) == 0
    assert closed == [(direct_server.alias, "close_all")] * 2


# -- worker_stopping -----------------------------------------------------------


def test_worker_stopping_closes_every_connection_of_the_thread(
    sqlite, mysql, postgres, settings, closed
):
    """worker_stopping mid-unit closes SQLite, MariaDB and PostgreSQL connections."""
    settings.TASK_DB = {"STRATEGY": "keep"}
    task_started.send(sender=None)
    Item.objects.using(sqlite).count()
    mysql.session_id()
    postgres.session_id()
    assert in_unit()
    worker_stopping.send(sender=None)
    assert mysql.wait_for_count(0) == 0
    assert postgres.wait_for_count(0) == 0
    assert not any(is_open(alias) for alias in ("default", "mysql", "postgres"))
    assert sorted(closed) == [
        ("default", "worker_stopping"),
        ("mysql", "worker_stopping"),
        ("postgres", "worker_stopping"),
    ]
    assert not in_unit()


def test_worker_stopping_closes_djangos_pool(pgpool, settings, closed):
    """worker_stopping closes Django's pool: no pool session left on the server."""
    settings.TASK_DB = {"STRATEGY": "keep"}
    pgpool.session_id()
    assert pgpool.sessions()
    worker_stopping.send(sender=None)
    assert pgpool.wait_for_count(0) == 0
    assert ("pgpool", "worker_stopping") in closed
    # A later unit gets a new pool.
    with task_scope():
        assert pgpool.session_id() in pgpool.sessions()


# -- A user's own strategy -----------------------------------------------------


def test_dotted_path_strategy_sees_only_this_threads_open_connections(
    sqlite, direct_server, settings, closed
):
    """A dotted-path strategy is called only for this thread's open connections."""
    settings.TASK_DB = {"STRATEGY": "tests.test_signals.recording_strategy"}
    alias = direct_server.alias

    # Opened and closed again in this thread: initialized, but not open.
    direct_server.session_id()
    connections[alias].close()
    assert direct_server.wait_for_count(0) == 0

    other_session: list[int] = []
    ready, release = threading.Event(), threading.Event()

    def other_thread():
        try:
            other_session.append(direct_server.session_id())
        finally:
            ready.set()
            release.wait(30)
            connections[alias].close()

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        assert ready.wait(30)
        assert other_session

        Item.objects.using(sqlite).count()
        task_started.send(sender=None)
        Item.objects.using(sqlite).count()
        task_finished.send(sender=None)
    finally:
        release.set()
        thread.join(30)

    sqlite_connection = connections[sqlite]
    assert [(a, p) for a, p, _ in strategy_calls] == [
        ("default", "start"),
        ("default", "finish"),
    ]
    assert all(c is sqlite_connection for _, _, c in strategy_calls)
    assert not is_open(sqlite)
    assert closed == [("default", "recording_strategy")]
    assert direct_server.wait_for_count(0) == 0


def test_dotted_path_strategy_not_called_without_open_connections(settings):
    """With no connection open in the thread, a user's strategy is never called."""
    settings.TASK_DB = {"STRATEGY": "tests.test_signals.recording_strategy"}
    task_started.send(sender=None)
    task_finished.send(sender=None)
    with task_scope():
        pass
    assert strategy_calls == []


# -- CLOSE_CACHES --------------------------------------------------------------


def test_close_caches_at_the_end_of_a_unit(observed_cache, settings):
    """CLOSE_CACHES=True closes Django's caches at task_finished, not at start."""
    settings.TASK_DB = {"CLOSE_CACHES": True}
    task_started.send(sender=None)
    assert caches["default"].get("key") == "value"
    assert observed_cache.closes == []
    task_finished.send(sender=None)
    assert observed_cache.closes == ["closed"]
    with pytest.raises(ZeroDivisionError):
        with task_scope():
            raise ZeroDivisionError
    assert observed_cache.closes == ["closed"] * 2


def test_caches_left_alone_by_default(observed_cache, settings):
    """Without CLOSE_CACHES (default or False) caches are never closed."""
    for task_db in ({}, {"CLOSE_CACHES": False}):
        settings.TASK_DB = task_db
        task_started.send(sender=None)
        task_finished.send(sender=None)
        with task_scope():
            pass
    assert observed_cache.closes == []


def test_cache_close_failure_is_logged(
    observed_cache, sqlite, settings, caplog, closed
):
    """A cache close() that raises is logged; the database cleanup still runs."""
    settings.TASK_DB = {"CLOSE_CACHES": True, "STRATEGY": "close_all"}
    observed_cache.fail = True
    Item.objects.using(sqlite).count()
    with caplog.at_level(logging.ERROR, logger="django_task_db"):
        task_finished.send(sender=None)
    assert observed_cache.closes == ["closed"]
    assert closed == [("default", "close_all")]
    records = [r for r in caplog.records if r.name == "django_task_db"]
    assert len(records) == 1
    assert "cache" in records[0].getMessage()
    assert records[0].exc_info[0] is ConnectionError


# -- Receivers written by users ------------------------------------------------


def test_raising_connection_closed_receiver_does_not_break_cleanup(
    sqlite, direct_server, settings, caplog, closed
):
    """A raising connection_closed receiver is logged; every alias still closes."""
    settings.TASK_DB = {"STRATEGY": "close_all"}

    def broken(alias, reason, **kwargs):
        raise RuntimeError(f"broken receiver for {alias}")

    connection_closed.connect(broken, weak=False, dispatch_uid="tests.broken")
    try:
        Item.objects.using(sqlite).count()
        direct_server.session_id()
        with caplog.at_level(logging.ERROR, logger="django_task_db"):
            task_finished.send(sender=None)
    finally:
        connection_closed.disconnect(dispatch_uid="tests.broken")
    assert not is_open(sqlite)
    assert not is_open(direct_server.alias)
    assert direct_server.wait_for_count(0) == 0
    assert sorted(closed) == sorted(
        [("default", "close_all"), (direct_server.alias, "close_all")]
    )
    errors = [r for r in caplog.records if r.name == "django_task_db"]
    assert sorted(str(r.exc_info[1]) for r in errors) == sorted(
        ["broken receiver for default", f"broken receiver for {direct_server.alias}"]
    )
    assert all("connection_closed" in r.getMessage() for r in errors)


def test_task_finished_receiver_connected_after_ours_opens_a_connection(
    direct_server, settings, closed
):
    """A later task_finished receiver's connection stays open to the next boundary."""
    # Receivers run in the order they were connected: the app's (connected in
    # ready()) cleans up first, then the user's opens a connection. Nothing
    # handles it after that, even under close_all: it stays open, idle, until
    # the next boundary of this thread (here the next task_started) closes it.
    settings.TASK_DB = {"STRATEGY": "close_all"}
    late_sessions: list[int] = []

    def late(sender, **kwargs):
        late_sessions.append(direct_server.session_id())

    task_finished.connect(late, weak=False, dispatch_uid="tests.late")
    try:
        with task_scope():
            pass
        task_started.send(sender=None)
        task_finished.send(sender=None)
    finally:
        task_finished.disconnect(dispatch_uid="tests.late")
    # Two units finished; the second found the first's late connection open
    # at its start and closed it; the late receiver then opened another.
    assert len(late_sessions) == 2
    assert late_sessions[0] != late_sessions[1]
    assert is_open(direct_server.alias)
    assert direct_server.sessions() == {late_sessions[1]}
    assert closed == [(direct_server.alias, "close_all")]
    task_started.send(sender=None)
    assert direct_server.wait_for_count(0) == 0
    assert closed == [(direct_server.alias, "close_all")] * 2
    task_finished.send(sender=None)
