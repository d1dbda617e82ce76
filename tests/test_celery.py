"""The Celery bridge, with workers running in this process: what the database
server sees of a worker's connections, task after task.

Each test starts its own worker (solo or threads pool) on a queue of its own,
in a Redis database of this module's own, so that no other worker takes its
tasks, and stops it warmly, as a worker stops on SIGTERM, so that it sends
worker_shutdown. Celery's Django fixup is installed on the test app, as in a
real project: pytest sets DJANGO_SETTINGS_MODULE.
"""

from __future__ import annotations

import gc
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
import redis
from celery import signals as celery_signals
from celery import states
from celery.contrib.testing.worker import test_worker_started
from celery.result import AsyncResult
from django.db import OperationalError, connections, transaction

from django_task_db import celery_bridge as bridge
from django_task_db.checks import check_settings
from tests.celery_app import (
    FIXUP_CLOSES_EVERY_CONNECTION,
    SESSION_ID_SQL,
    app,
    session_id,
    session_id_close_all,
    sleep_in_query,
    write,
    write_then_fail,
)
from tests.celery_app import inprocess_worker as shared_worker
from tests.names import REDIS_DB_CELERY
from tests.servers import MySQLServer, Server, Sessions, idle_past_health_check
from tests.testapp.models import Item
from tests.workers import sending_app, unique_queue

REDIS_DB = REDIS_DB_CELERY
N = 30
TIMEOUT = 30

# Celery's Redis result backend still calls a method redis-py deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Call to deprecated setex:DeprecationWarning"
)


@pytest.fixture(autouse=True)
def _forget_logged_errors() -> None:
    """The bridge logs each error about TASK_DB once per process."""
    bridge._logged.clear()


@pytest.fixture
def queue(redis_url: str) -> Iterator[str]:
    """A queue of this test's own, the default queue of the test app, in this
    module's Redis database."""
    name = unique_queue("inprocess")
    with sending_app(redis_url, name, REDIS_DB):
        yield name
    client = redis.Redis.from_url(f"{redis_url}/{REDIS_DB}")
    client.delete(name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")
    client.close()


@pytest.fixture
def inprocess_worker(queue: str) -> Callable[..., AbstractContextManager[Any]]:
    """Start a worker in this process on the test's queue:
    ``with inprocess_worker("threads", 2):``."""

    def start(pool: str = "solo", concurrency: int = 1) -> AbstractContextManager[Any]:
        return shared_worker(queue, pool, concurrency, TIMEOUT)

    return start


@pytest.fixture
def sessions(direct_server: Server) -> Iterator[Sessions]:
    """A sampler of the server's sessions, through one admin connection."""
    sampler = Sessions(direct_server)
    yield sampler
    sampler.close()


def run(task: Any, *args: Any) -> AsyncResult:
    """Send ``task`` and wait until it is done (whatever its outcome)."""
    result = task.delay(*args)
    result.get(timeout=TIMEOUT, propagate=False)
    return result


def run_many(task: Any, count: int, *args: Any) -> list[Any]:
    """Send ``count`` tasks at once, then return their results in order."""
    results = [task.delay(*args) for _ in range(count)]
    return [result.get(timeout=TIMEOUT) for result in results]


def unique(name: str) -> str:
    """A row name no other test run uses."""
    return f"{name} {uuid.uuid4().hex}"


def count_rows(server: Server, name: str) -> int:
    """Committed rows named ``name``, through the server's admin connection.
    Not server.count_rows(): other test runs may share the table."""
    rows = server.query(
        f"SELECT COUNT(*) FROM {Item._meta.db_table} WHERE name = %s", (name,)
    )
    return int(rows[0][0])


def wait_for_running_query(server: Server, session: int, prefix: str) -> bool:
    """Poll until the server shows ``session`` running a query that starts
    with ``prefix``."""
    if isinstance(server, MySQLServer):
        sql = (
            "SELECT ID FROM information_schema.PROCESSLIST "
            "WHERE ID = %s AND COMMAND = 'Query' AND INFO LIKE %s"
        )
    else:
        sql = (
            "SELECT pid FROM pg_stat_activity "
            "WHERE pid = %s AND state = 'active' AND query LIKE %s"
        )
    deadline = time.monotonic() + TIMEOUT
    while not server.query(sql, (session, prefix + "%")):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


POOLS = pytest.mark.parametrize(
    ("pool", "concurrency"), [("solo", 1), ("threads", 2)], ids=["solo", "threads"]
)


@POOLS
def test_close_old_reuses_one_session_per_worker_thread(
    direct_server, sessions, settings, inprocess_worker, pool, concurrency
):
    """Under close_old, with the fixup replaced, tasks reuse one session per thread."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    with inprocess_worker(pool, concurrency):
        ids = run_many(session_id, N, direct_server.alias)
        still_open = set(ids) <= direct_server.sessions()
    # The executor threads are gone, and with them their connections, once
    # collected: leave no session behind for the next tests.
    gc.collect()
    sessions.wait_until_gone(set(ids))
    assert 1 <= len(set(ids)) <= concurrency
    assert still_open


@POOLS
def test_close_all_opens_a_session_per_task(
    direct_server, sessions, settings, inprocess_worker, pool, concurrency
):
    """Under close_all each task gets a new session, closed once it is done."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    before = sessions.own()
    with inprocess_worker(pool, concurrency):
        ids = run_many(session_id, N, direct_server.alias)
        left = sessions.wait_until_gone(set(ids))
        extra = sessions.own() - before
    assert len(set(ids)) == N
    assert left == set()
    assert extra == set()


@POOLS
def test_celery_fixup_kept_closes_every_connection(
    direct_server, settings, inprocess_worker, pool, concurrency
):
    """Unreplaced, the fixup runs beside the bridge: from Celery 5.6 it gives
    every task a new session whatever STRATEGY says; before 5.6 it closes by
    CONN_MAX_AGE (None here), as close_old does. W002 warns of it."""
    settings.TASK_DB = {"STRATEGY": "close_old", "REPLACE_CELERY_FIXUP": False}
    warnings = [message.id for message in check_settings()]
    with inprocess_worker(pool, concurrency):
        ids = run_many(session_id, N, direct_server.alias)
    if FIXUP_CLOSES_EVERY_CONNECTION:
        assert len(set(ids)) == N
    else:
        assert 1 <= len(set(ids)) <= concurrency
    assert "django_task_db.W002" in warnings


@pytest.fixture
def bridge_after_fixup() -> Iterator[None]:
    """Move the bridge's worker_init receiver after the fixup's, as when the
    Celery app is created before Django is set up (pytest sets Django up
    first)."""
    signal = celery_signals.worker_init
    saved = list(signal.receivers)
    uid = "django_task_db.celery_bridge._on_worker_init"
    ours = [r for r in saved if r[0][0] == uid]
    assert ours
    signal.receivers[:] = [r for r in saved if r not in ours] + ours
    signal.sender_receivers_cache.clear()
    yield
    signal.receivers[:] = saved
    signal.sender_receivers_cache.clear()


def test_fixup_replaced_when_the_worker_starts(
    direct_server, settings, inprocess_worker, bridge_after_fixup
):
    """Run after the fixup's worker_init, the bridge replaces it at worker start."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    opened = []

    def open_connection(**kwargs: Any) -> None:
        opened.append(direct_server.session_id())

    test_worker_started.connect(open_connection, weak=False)
    try:
        with inprocess_worker("solo"):
            first = run(session_id, direct_server.alias).result
    finally:
        test_worker_started.disconnect(open_connection)
    assert opened == [first]


def test_check_quiet_when_the_fixup_is_replaced(settings):
    """W002 is not reported with the default REPLACE_CELERY_FIXUP."""
    settings.TASK_DB = {}
    assert "django_task_db.W002" not in [message.id for message in check_settings()]


def test_task_strategy_overrides_the_setting(
    direct_server, sessions, settings, inprocess_worker
):
    """db_strategy="close_all" tasks get fresh sessions; close_old ones reuse."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    alias = direct_server.alias
    with inprocess_worker("solo"):
        kept = [run(session_id, alias).result for _ in range(3)]
        fresh = [run(session_id_close_all, alias).result for _ in range(3)]
        kept_again = [run(session_id, alias).result for _ in range(3)]
        left = sessions.wait_until_gone(set(fresh))
    assert len(set(kept)) == 1
    assert len(set(fresh)) == 3
    assert len(set(kept_again)) == 1
    assert not set(fresh) & set(kept + kept_again)
    assert left == set()


def test_failed_task_is_rolled_back_and_its_connection_closed(
    direct_server, sessions, settings, inprocess_worker
):
    """A task failing with uncommitted writes is rolled back and its session closed."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    alias = direct_server.alias
    lost, kept = unique("lost"), unique("kept")
    with inprocess_worker("solo"):
        before = run(session_id, alias).result
        failed = run(write_then_fail, alias, lost)
        left = sessions.wait_until_gone({before})
        after = run(write, alias, kept)
        kept_rows = count_rows(direct_server, kept)
    assert failed.state == states.FAILURE
    assert isinstance(failed.result, RuntimeError)
    assert str(failed.result) == f"task failed after writing {lost!r}"
    assert count_rows(direct_server, lost) == 0
    assert left == set()
    assert after.state == states.SUCCESS
    assert after.result != before
    assert kept_rows == 1


@pytest.fixture
def fail_after_query() -> Iterator[Any]:
    """A task of the test app that fails after a query that succeeded."""

    @app.task(name="tests.test_celery.fail_after_query")
    def fail_after_query(alias: str) -> None:
        connection = connections[alias]
        with connection.cursor() as cursor:
            cursor.execute(SESSION_ID_SQL[connection.vendor])
        raise RuntimeError("failed after a query")

    yield fail_after_query
    app.tasks.unregister(fail_after_query.name)


def test_failed_task_closes_its_connection(
    direct_server, sessions, settings, inprocess_worker, fail_after_query
):
    """A failed task's healthy connection is closed even under close_old."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    alias = direct_server.alias
    with inprocess_worker("solo"):
        before = run(session_id, alias).result
        failed = run(fail_after_query, alias)
        left = sessions.wait_until_gone({before})
        after = run(session_id, alias).result
    assert failed.state == states.FAILURE
    assert left == set()
    assert after != before


def test_failed_task_keeps_its_connection_without_close_on_failure(
    direct_server, settings, inprocess_worker, fail_after_query
):
    """Without CLOSE_ON_FAILURE, close_old keeps a failed task's healthy session."""
    settings.TASK_DB = {"STRATEGY": "close_old", "CLOSE_ON_FAILURE": False}
    alias = direct_server.alias
    with inprocess_worker("solo"):
        before = run(session_id, alias).result
        failed = run(fail_after_query, alias)
        after = run(session_id, alias).result
    assert failed.state == states.FAILURE
    assert after == before


def test_connection_killed_between_tasks(direct_server, settings, inprocess_worker):
    """A session killed between tasks: the next task succeeds on a new one."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    alias = direct_server.alias
    with inprocess_worker("solo"):
        killed = run(session_id, alias).result
        direct_server.kill(killed)
        idle_past_health_check()
        after = run(session_id, alias)
    assert after.state == states.SUCCESS
    assert after.result != killed


def test_connection_killed_mid_query(direct_server, settings, inprocess_worker):
    """A session killed mid-query fails its task with the driver's error only."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    alias = direct_server.alias
    mysql = isinstance(direct_server, MySQLServer)
    with inprocess_worker("solo"):
        victim = run(session_id, alias).result
        sleeping = sleep_in_query.delay(alias, 5)
        running = wait_for_running_query(
            direct_server, victim, "SELECT SLEEP" if mysql else "SELECT pg_sleep"
        )
        direct_server.kill(victim)
        sleeping.get(timeout=TIMEOUT, propagate=False)
        after = run(session_id, alias)
    assert running
    assert sleeping.state == states.FAILURE
    assert isinstance(sleeping.result, OperationalError)
    # Django's OperationalError, raised from the driver's own (57P01 is
    # psycopg's AdminShutdown).
    if mysql:
        assert sleeping.result.args[0] == 2013
        assert "Lost connection" in str(sleeping.result)
        assert "MySQLdb.OperationalError: (2013, " in sleeping.traceback
    else:
        message = "terminating connection due to administrator command"
        assert str(sleeping.result) == message
        assert f"psycopg.errors.AdminShutdown: {message}" in sleeping.traceback
    assert after.state == states.SUCCESS
    assert after.result != victim


@pytest.fixture(params=["apply", "always_eager"])
def eager(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Run a task eagerly and return its result: ``task.apply()``, or
    ``task.delay()`` under task_always_eager."""
    if request.param == "apply":
        yield lambda task, *args: task.apply(args).get()
        return
    saved = app.conf.task_always_eager
    app.conf.task_always_eager = True
    try:
        yield lambda task, *args: task.delay(*args).get()
    finally:
        app.conf.task_always_eager = saved


def test_eager_task_leaves_the_callers_connection_alone(
    direct_server, settings, closed, caplog, eager
):
    """An eager task runs on the caller's connection; the bridge leaves it alone."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    caplog.set_level(logging.INFO, logger="django_task_db")
    alias = direct_server.alias
    name = unique("eager")
    caller = direct_server.session_id()
    outside = eager(write, alias, name)
    with transaction.atomic(using=alias):
        Item.objects.using(alias).create(name=name)
        inside = eager(write, alias, name)
    rows = count_rows(direct_server, name)
    after = direct_server.session_id()
    assert outside == caller
    assert inside == caller
    assert after == caller
    assert rows == 3
    assert closed == []
    assert [r.getMessage() for r in caplog.records if r.name == "django_task_db"] == []


def assert_fixup_sessions(ids: list[int], left: set[int]) -> None:
    """What Celery's fixup alone does with 10 tasks on a solo worker: a
    session per task, each closed (Celery 5.6+), or one session kept."""
    if FIXUP_CLOSES_EVERY_CONNECTION:
        assert len(set(ids)) == 10
        assert left == set()
    else:
        assert len(set(ids)) == 1
        assert left == set(ids)


def test_bridge_off_leaves_the_celery_fixup_in_charge(
    direct_server, sessions, settings, inprocess_worker, closed
):
    """With TASK_DB["CELERY"] False the fixup handles the connections, not
    the bridge: Celery 5.6+ closes each after its task, earlier releases keep
    it (CONN_MAX_AGE None) whatever STRATEGY says."""
    settings.TASK_DB = {"CELERY": False, "STRATEGY": "close_all"}
    with inprocess_worker("solo"):
        ids = run_many(session_id, 10, direct_server.alias)
        left = sessions.wait_until_gone(set(ids))
    assert_fixup_sessions(ids, left)
    if FIXUP_CLOSES_EVERY_CONNECTION:
        assert closed == []
    else:
        # The connection the fixup kept is closed when the worker's thread
        # ends, not at a task's boundary.
        assert closed in ([], [(direct_server.alias, "thread_ended")])


def test_worker_shutdown_closes_the_worker_connection(
    direct_server, sessions, settings, inprocess_worker, closed
):
    """worker_shutdown closes the session a solo worker kept between tasks."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    alias = direct_server.alias
    with inprocess_worker("solo"):
        kept = set(run_many(session_id, 3, alias))
        open_while_running = kept <= direct_server.sessions()
    left = sessions.wait_until_gone(kept)
    assert len(kept) == 1
    assert open_while_running
    assert left == set()
    assert closed == [(alias, "worker_stopping")]


@pytest.fixture
def misconfigured() -> Iterator[Any]:
    """A task of the test app whose db_strategy is not a strategy."""

    @app.task(name="tests.test_celery.misconfigured", db_strategy="not_a_strategy")
    def misconfigured(alias: str) -> int:
        connection = connections[alias]
        with connection.cursor() as cursor:
            cursor.execute(SESSION_ID_SQL[connection.vendor])
            return int(cursor.fetchone()[0])

    yield misconfigured
    app.tasks.unregister(misconfigured.name)


def test_bad_task_strategy_is_logged_and_the_task_runs(
    direct_server, settings, inprocess_worker, misconfigured, caplog
):
    """A bad db_strategy is logged at worker start, and the task still runs."""
    settings.TASK_DB = {}
    caplog.set_level(logging.ERROR, logger="django_task_db")
    formatter = logging.Formatter()
    with inprocess_worker("solo"):
        at_start = [
            formatter.format(record)
            for record in caplog.records
            if record.name == "django_task_db" and record.levelno == logging.ERROR
        ]
        result = run(misconfigured, direct_server.alias)
    assert any(
        "'tests.test_celery.misconfigured'" in text and "'not_a_strategy'" in text
        for text in at_start
    )
    assert result.state == states.SUCCESS


def test_bad_task_strategy_falls_back_to_the_setting(
    direct_server, settings, inprocess_worker, misconfigured
):
    """A task with a bad db_strategy gets TASK_DB's strategy: under close_old
    it reuses the worker's session like any other task."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    with inprocess_worker("solo"):
        ids = [run(misconfigured, direct_server.alias).get(TIMEOUT) for _ in range(5)]
        ids += run_many(session_id, 5, direct_server.alias)
    assert len(set(ids)) == 1


@pytest.mark.parametrize(
    "task", [session_id, session_id_close_all], ids=["no db_strategy", "close_all"]
)
def test_invalid_task_db_leaves_the_fixup_in_charge(
    direct_server, sessions, settings, inprocess_worker, closed, caplog, task
):
    """A bad TASK_DB in a worker is logged once and Celery's fixup keeps
    managing the connections, instead of nobody; the bridge does nothing, not
    even for a task's own db_strategy."""
    settings.TASK_DB = {"STRATEGY": "close_sometimes"}
    caplog.set_level(logging.ERROR, logger="django_task_db")
    with inprocess_worker("solo"):
        ids = run_many(task, 10, direct_server.alias)
        left = sessions.wait_until_gone(set(ids))
    assert_fixup_sessions(ids, left)
    if FIXUP_CLOSES_EVERY_CONNECTION:
        assert closed == []
    else:
        # The connection the fixup kept is closed when the worker stops, not
        # at a task's boundary.
        assert closed == [(direct_server.alias, "worker_stopping")]
    errors = [r.getMessage() for r in caplog.records if r.name == "django_task_db"]
    assert len([e for e in errors if "'close_sometimes'" in e]) == 1


def test_worker_logs_the_alias_checks(settings, caplog):
    """A worker logs the checks of settings alone (W006 to W008) too."""
    from django_task_db import celery_bridge

    settings.TASK_DB = {"STRATEGY": "close_all"}  # CONN_MAX_AGE None: W007
    with caplog.at_level("WARNING", logger="django_task_db"):
        celery_bridge._report_checks()
    assert "django-task-db system check django_task_db.W007" in caplog.text
