"""The pytest plugin, run in a sub-pytest (pytest's pytester): the leak
check's outcome and message, and the task_db_celery_worker fixture under
pytest-django's django_db."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from tests.names import REDIS_DB_IN_PROCESS
from tests.servers import Server
from tests.workers import unique_queue

pytestmark = pytest.mark.task_db_allow_leaks("the sub-pytest's connections")

ROOT = Path(__file__).resolve().parent.parent

SETTINGS = """
from tests.settings import *  # noqa: F403
DATABASES.pop("pgpool", None)
for _db in DATABASES.values():
    _db["TEST"] = {"DEPENDENCIES": []}
"""


@pytest.fixture
def inner(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    """A sub-pytest that imports the suite's settings, servers and apps."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(pytester.path)]))
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    return pytester


def settings(pytester: pytest.Pytester, app: bool = True, ini: str = "") -> None:
    extra = "" if app else 'INSTALLED_APPS = ["tests.testapp"]\n'
    pytester.makepyfile(inner_settings=SETTINGS + extra)
    pytester.makeini(f"[pytest]\nDJANGO_SETTINGS_MODULE = inner_settings\n{ini}\n")


LEAKS = """
import threading

import pytest
from django.db import connections, transaction


def leak(alias):
    found = []

    def work():
        connections[alias].cursor().execute("SELECT 1")
        found.append(connections[alias])

    thread = threading.Thread(target=work, name="leaky")
    thread.start()
    thread.join()
    return found[0]


def close(connection):
    connection.inc_thread_sharing()
    connection.close()


@pytest.mark.django_db(databases=["mysql"], transaction=True)
def test_thread_leak(request):
    request.addfinalizer(lambda: close(connection))
    connection = leak("mysql")


@pytest.mark.task_db_allow_leaks("on purpose")
@pytest.mark.django_db(databases=["mysql"], transaction=True)
def test_allowed(request):
    request.addfinalizer(lambda: close(connection))
    connection = leak("mysql")


@pytest.mark.django_db(databases=["default", "mysql"])
def test_atomic_left_open(request):
    block = transaction.atomic(using="mysql")
    block.__enter__()
    request.addfinalizer(lambda: block.__exit__(None, None, None))


@pytest.mark.django_db(databases=["default", "mysql", "postgres"])
def test_clean(request):
    for alias in ("default", "mysql", "postgres"):
        with transaction.atomic(using=alias):
            connections[alias].cursor().execute("SELECT 1")
"""


def test_ini_option_fails_leaks(
    inner: pytest.Pytester, mysql: Server, postgres: Server
) -> None:
    """With the ini option on, in a project without the app: the thread leak
    and the atomic block left open fail their tests, naming the alias and
    the line; the allowed and the clean tests pass (django_db's own atomic
    blocks are not leaks)."""
    settings(inner, app=False, ini="task_db_check_connections = true")
    inner.makepyfile(test_leaks=LEAKS)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_thread_leak _*",
            "1 database connection(s) left behind:",
            "- alias 'mysql', thread 'leaky' at test_leaks.py:11 in work: still open "
            "after its thread ended",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ test_atomic_left_open _*",
            "1 database connection(s) left behind:",
            "- alias 'mysql', thread 'MainThread': inside 1 more atomic "
            "block(s) than at the start",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "FAILED test_leaks.py::test_atomic_left_open*",
            "FAILED test_leaks.py::test_thread_leak*",
        ]
    )


def test_marker_turns_it_on(inner: pytest.Pytester, mysql: Server) -> None:
    """With the ini option off, only a test marked task_db_check_connections
    is checked."""
    settings(inner, app=False)
    inner.makepyfile(
        test_marked=LEAKS.split("def test_thread_leak")[0]
        + """
@pytest.mark.django_db(databases=["mysql"], transaction=True)
def test_unmarked(request):
    request.addfinalizer(lambda: close(connection))
    connection = leak("mysql")


@pytest.mark.task_db_check_connections
@pytest.mark.django_db(databases=["mysql"], transaction=True)
def test_marked(request):
    request.addfinalizer(lambda: close(connection))
    connection = leak("mysql")
"""
    )
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_marked.py::test_marked*"])


def test_without_django_settings(inner: pytest.Pytester) -> None:
    """In a project without Django settings, the plugin does nothing, even on."""
    inner.makeini("[pytest]\ntask_db_check_connections = true\n")
    inner.makepyfile(test_plain="def test_plain():\n    assert True\n")
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:django")
    result.assert_outcomes(passed=1)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


WORKER = """
import threading
import time

import pytest
from celery.contrib.testing.worker import start_worker
from celery.signals import task_postrun
from django.db import connections

from django_task_db.celery_testing import SharedConnectionInUse
from tests.celery_app import app
from tests.testapp.models import Item

ALIASES = ["default", "mysql", "postgres"]
started, release = threading.Event(), threading.Event()


@app.task
def write(alias, name):
    Item.objects.using(alias).create(name=name)
    return id(connections[alias].connection)


@app.task
def hold(alias):
    started.set()
    release.wait(30)
    return Item.objects.using(alias).count()


@pytest.fixture
def task_db_celery_app():
    return app


@pytest.fixture
def raw(alias):  # the test's connection, open before the worker starts
    connections[alias].ensure_connection()
    return connections[alias].connection


def names(alias):
    return sorted(Item.objects.using(alias).values_list("name", flat=True))


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.django_db(databases=ALIASES)
def test_in_the_test_transaction(alias, raw, task_db_celery_worker):
    Item.objects.using(alias).create(name="test")
    assert write.delay(alias, "task").get(timeout=30) == id(raw)
    assert names(alias) == ["task", "test"]
    assert connections[alias].connection is raw


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.django_db(databases=ALIASES, transaction=True)
def test_transactional(alias, raw, task_db_celery_worker):
    Item.objects.using(alias).create(name="test")
    assert write.delay(alias, "task").get(timeout=30) != id(raw)
    assert names(alias) == ["task", "test"]
    assert connections[alias].connection is raw


@pytest.mark.django_db(databases=["postgres"])
def test_query_while_a_task_runs(task_db_celery_worker):
    result = hold.delay("postgres")
    assert started.wait(30)
    with pytest.raises(SharedConnectionInUse, match="alias 'postgres' while a Celery"):
        Item.objects.using("postgres").count()
    release.set()
    assert result.get(timeout=30) == 0


def slow_end(**kwargs):
    time.sleep(0.3)  # a task_postrun receiver, connected before the fixture's


task_postrun.connect(slow_end, weak=False)


@pytest.mark.django_db(databases=["postgres"])
def test_query_right_after_a_result(task_db_celery_worker):
    # Celery stores the result before it sends task_postrun.
    for n in range(3):
        write.delay("postgres", f"task {n}").get(timeout=30)
        assert Item.objects.using("postgres").count() == n + 1


def test_worker_before_db(task_db_celery_worker, db):
    Item.objects.create(name="test")
    assert write.delay("default", "task").get(timeout=30) == id(
        connections["default"].connection
    )
    assert names("default") == ["task", "test"]


@pytest.mark.parametrize("alias", ["mysql", "postgres"])
@pytest.mark.django_db(databases=ALIASES, transaction=True)
def test_celery_start_worker_alone(alias, raw):
    with start_worker(app, perform_ping_check=False):
        assert connections[alias].connection is raw, "closed by the worker's start"
"""


@pytest.mark.parametrize("app", [True, False], ids=["app", "no_app"])
def test_celery_worker_fixture(
    app: bool,
    inner: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
    mysql: Server,
    postgres: Server,
) -> None:
    """task_db_celery_worker under django_db: tasks run inside the test's
    transaction on its own connections (default), or on their own
    (transaction=True), and the test's connection is never closed, where
    Celery's own start_worker closes it at the worker's start; a query of
    the test while a task runs on the shared connection is refused, one
    right after a task's result waits for the task's end; the fixture sets
    up ``db`` first whatever the arguments' order. With the app's Celery
    bridge, and with Celery's fixup alone."""
    queue = unique_queue("fixture")  # nothing left queued by another run
    monkeypatch.setenv("TASK_DB_CELERY_QUEUE", queue)
    settings(inner, app=app, ini="task_db_check_connections = true")
    inner.makepyfile(test_worker=WORKER)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=9, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_celery_start_worker_alone?mysql? FAILED*",
            "*test_celery_start_worker_alone?postgres? FAILED*",
        ],
        consecutive=False,
    )
    assert result.stdout.str().count("closed by the worker's start") >= 2
    assert "left behind" not in result.stdout.str()
    client = redis.Redis.from_url(f"{redis_url}/{REDIS_DB_IN_PROCESS}")
    client.delete(queue, f"_kombu.binding.{queue}")
    client.close()
