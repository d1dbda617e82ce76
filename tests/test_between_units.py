"""Between units of work and after them: health checks wherever a connection
is used (HEALTH_CHECK_IDLE), and no connection outliving its thread or greenlet.

Each scenario is checked on the server: which sessions a thread used, which
the server killed, and which are still there once the thread (or greenlet)
that opened them is gone. The garbage collector is kept out of the tests
about threads and greenlets, so that it cannot close what the package left
open.
"""

from __future__ import annotations

import gc
import json
import os
import select
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.db import connections
from django.test import override_settings

from django_task_db import task_scope
from tests.servers import Server, Sessions
from tests.testapp.models import Item

ROOT = Path(__file__).resolve().parent.parent
IDLE = 0.2  # HEALTH_CHECK_IDLE of the tests that go idle
PAST_IDLE = IDLE + 0.2  # how long they idle: a bit more than HEALTH_CHECK_IDLE
GONE_TIMEOUT = 5  # how long the server may take to drop a closed session
TIMEOUT = 60

# Celery's Redis result backend still calls a method redis-py deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Call to deprecated setex:DeprecationWarning"
)


# -- Helpers -------------------------------------------------------------------


def unique(name: str) -> str:
    return f"{name} {uuid.uuid4().hex}"


def query(alias: str) -> bool:
    """One query on this thread's connection of ``alias``."""
    return Item.objects.using(alias).exists()


def next_job(alias: str, prefix: str) -> Item | None:
    """The poll query of a job loop: the oldest pending job, if any."""
    return Item.objects.using(alias).filter(name__startswith=prefix).first()


def names(server: Server, prefix: str) -> list[str]:
    rows = server.query(
        f"SELECT name FROM {Item._meta.db_table} WHERE name LIKE %s",
        (prefix + "%",),
    )
    return sorted(row[0] for row in rows)


@pytest.fixture
def pings(direct_server: Server, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every is_usable() (Django's ping) on this thread's connection."""
    connection = connections[direct_server.alias]
    seen: list[str] = []
    original = connection.is_usable

    def counted() -> bool:
        seen.append(direct_server.alias)
        return original()

    monkeypatch.setattr(connection, "is_usable", counted)
    return seen


@pytest.fixture
def sessions(direct_server: Server) -> Iterator[Sessions]:
    sampler = Sessions(direct_server)
    yield sampler
    sampler.close()


@pytest.fixture
def max_age(direct_server: Server) -> Iterator[Callable[[int | None], None]]:
    """Set the CONN_MAX_AGE that the alias's next connections open with, in
    every thread (the settings dict is shared); restored after."""
    settings_dict = connections[direct_server.alias].settings_dict
    saved = settings_dict["CONN_MAX_AGE"]

    def set_to(age: int | None) -> None:
        connections[direct_server.alias].close()
        settings_dict["CONN_MAX_AGE"] = age

    yield set_to
    connections[direct_server.alias].close()
    settings_dict["CONN_MAX_AGE"] = saved


@pytest.fixture
def no_gc(sessions: Sessions) -> Iterator[set[int]]:
    """The garbage collector off for the test; the sessions the test adds
    to the yielded set are waited for after it is back on and has run (so
    that a failing test leaves none behind)."""
    used: set[int] = set()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield used
    finally:
        if was_enabled:
            gc.enable()
        gc.collect()
        sessions.wait_until_gone(used, GONE_TIMEOUT)


# -- 1a. Health checks on the poll query of a job loop ---------------------------


@pytest.mark.parametrize("strategy", ["keep", "close_old", "close_all"])
def test_poll_query_between_units_survives_a_kill(direct_server, settings, strategy):
    """A job loop's poll query between units reconnects after an idle kill."""
    settings.TASK_DB = {"STRATEGY": strategy, "HEALTH_CHECK_IDLE": IDLE}
    alias = direct_server.alias
    assert connections[alias].settings_dict["CONN_MAX_AGE"] is None
    prefix = unique("job")
    direct_server.query(
        f"INSERT INTO {Item._meta.db_table} (name) VALUES (%s)", (prefix,)
    )
    done = unique("done")

    @task_scope
    def run(job: Item) -> None:
        Item.objects.using(alias).filter(pk=job.pk).delete()
        Item.objects.using(alias).create(name=done)

    job = next_job(alias, prefix)
    assert job is not None
    run(job)
    assert next_job(alias, prefix) is None  # the loop idles: nothing to do
    assert next_job(alias, prefix) is None
    killed = direct_server.session_id()
    time.sleep(PAST_IDLE)
    direct_server.kill(killed)

    assert next_job(alias, prefix) is None
    assert direct_server.session_id() != killed
    assert names(direct_server, done) == [done]


@pytest.mark.parametrize("strategy", ["keep", "close_old"])
def test_connection_opened_in_a_unit_survives_a_kill_between_units(
    direct_server, settings, strategy
):
    """Opened in a unit, killed idle: the next query between units reconnects."""
    settings.TASK_DB = {"STRATEGY": strategy, "HEALTH_CHECK_IDLE": IDLE}
    alias = direct_server.alias
    connections[alias].close()
    name = unique("opened in a unit")

    with task_scope():
        Item.objects.using(alias).create(name=name)
        opened = direct_server.session_id()
    assert direct_server.session_id() == opened  # kept after the unit
    time.sleep(PAST_IDLE)
    direct_server.kill(opened)

    assert next_job(alias, name) is not None
    assert direct_server.session_id() != opened


# -- 1b. A Celery worker's main process, outside any task -----------------------


@pytest.fixture
def queue(redis_url: str) -> Iterator[str]:
    """A queue of this test's own, the test app's default, in the Redis
    database of the in-process worker (tests/names.py)."""
    import redis

    from tests.celery_app import REDIS_DB
    from tests.workers import sending_app, unique_queue

    name = unique_queue("between")
    with sending_app(redis_url, name, REDIS_DB):
        yield name
    client = redis.Redis.from_url(f"{redis_url}/{REDIS_DB}")
    client.delete(name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")
    client.close()


def inprocess_worker(queue: str, pool: str, concurrency: int = 1) -> Any:
    from tests.celery_app import inprocess_worker as worker

    return worker(queue, pool, concurrency, TIMEOUT)


def run_task(task: Any, *args: Any) -> Any:
    result = task.delay(*args)
    return result.get(timeout=TIMEOUT)


def test_worker_consumer_write_outside_tasks_survives_a_kill(
    direct_server, settings, queue, sessions
):
    """A write in a worker's consumer thread, killed idle, reconnects."""
    from celery import signals as celery_signals

    from tests.celery_app import session_id

    settings.TASK_DB = {"STRATEGY": "close_old", "HEALTH_CHECK_IDLE": IDLE}
    alias = direct_server.alias
    prefix = unique("received")
    written: list[int] = []
    errors: list[BaseException] = []
    threads: set[int] = set()

    def on_received(sender: Any = None, request: Any = None, **kwargs: Any) -> None:
        # What a result backend does in the worker's main process (the
        # REVOKED state of a terminated task): a write outside any task.
        threads.add(threading.get_ident())
        try:
            Item.objects.using(alias).create(name=f"{prefix} {len(written)}")
            written.append(direct_server.session_id())
        except Exception as exc:
            errors.append(exc)

    celery_signals.task_received.connect(
        on_received, weak=False, dispatch_uid="tests.test_between_units.received"
    )
    task_sessions: set[int] = set()
    try:
        with inprocess_worker(queue, "threads", 1):
            task_sessions.add(run_task(session_id, alias))
            assert len(written) == 1
            time.sleep(PAST_IDLE)
            direct_server.kill(written[0])
            task_sessions.add(run_task(session_id, alias))
    finally:
        celery_signals.task_received.disconnect(
            dispatch_uid="tests.test_between_units.received"
        )
        gc.collect()  # the pool thread's connection, whatever the package did
        sessions.wait_until_gone(task_sessions | set(written), GONE_TIMEOUT)

    assert threading.get_ident() not in threads
    assert errors == []
    assert len(written) == 2 and written[1] != written[0]
    assert names(direct_server, prefix) == [f"{prefix} 0", f"{prefix} 1"]


def test_main_thread_query_after_a_worker_ran_a_task(direct_server, settings, queue):
    """The main thread's idle connection, killed after a worker's task, reconnects."""
    from tests.celery_app import session_id

    settings.TASK_DB = {"STRATEGY": "close_old", "HEALTH_CHECK_IDLE": IDLE}
    alias = direct_server.alias
    name = unique("main thread")
    with inprocess_worker(queue, "solo"):
        ran_on = {run_task(session_id, alias)}
        # The main thread's own query, outside any task (opened now: the
        # worker's start closes the connections of the thread it starts in).
        main = direct_server.session_id()
        ran_on.add(run_task(session_id, alias))
        time.sleep(PAST_IDLE)
        direct_server.kill(main)
        Item.objects.using(alias).create(name=name)
        after = direct_server.session_id()

    assert main not in ran_on  # the tasks ran in the worker's thread
    assert after != main
    assert names(direct_server, name) == [name]


# -- 1c. Inside a unit, after its first query -----------------------------------


@pytest.mark.parametrize("opened", ["before_the_unit", "in_the_unit"])
def test_unit_idle_after_its_first_query_survives_a_kill(
    direct_server, settings, opened
):
    """A unit idles after its first query, is killed: its next query reconnects."""
    settings.TASK_DB = {"HEALTH_CHECK_IDLE": IDLE}
    alias = direct_server.alias
    if opened == "before_the_unit":
        query(alias)
    else:
        connections[alias].close()
    prefix = unique("in a unit")

    with task_scope():
        Item.objects.using(alias).create(name=f"{prefix} 1")
        killed = direct_server.session_id()
        time.sleep(PAST_IDLE)
        direct_server.kill(killed)
        Item.objects.using(alias).create(name=f"{prefix} 2")
        after = direct_server.session_id()

    assert after != killed
    assert names(direct_server, prefix) == [f"{prefix} 1", f"{prefix} 2"]


# -- 1d. No ping for a connection in continuous use -----------------------------


@pytest.mark.parametrize("strategy", ["close_old", "keep"])
def test_queries_in_a_row_in_a_unit_and_between_units_are_not_pinged(
    direct_server, settings, pings, strategy
):
    """20 queries in a row inside one unit, then 20 between units: no ping."""
    settings.TASK_DB = {"STRATEGY": strategy, "HEALTH_CHECK_IDLE": 5}
    alias = direct_server.alias
    query(alias)
    with task_scope():
        for _ in range(20):
            query(alias)
    for _ in range(20):
        query(alias)
    assert pings == []


@pytest.mark.parametrize("strategy", ["close_old", "keep"])
def test_loop_of_one_query_units_is_not_pinged(
    direct_server, settings, pings, strategy
):
    """20 one-query units in a row, a poll query between them: no ping."""
    settings.TASK_DB = {"STRATEGY": strategy, "HEALTH_CHECK_IDLE": 5}
    alias = direct_server.alias
    used = set()
    for _ in range(20):
        with task_scope():
            query(alias)
        used.add(direct_server.session_id())
    assert len(used) == 1  # one connection all along
    assert pings == []


# -- 1e. HEALTH_CHECKS False, after units armed the checks -----------------------


@pytest.mark.parametrize(
    ("override", "idle"),
    [
        ({"HEALTH_CHECKS": False}, 1.2),  # past the default HEALTH_CHECK_IDLE
        ({"HEALTH_CHECKS": False, "HEALTH_CHECK_IDLE": IDLE}, PAST_IDLE),
    ],
    ids=["default_idle", "short_idle"],
)
def test_health_checks_off_after_units_ran_stops_every_ping(
    direct_server, settings, pings, override, idle
):
    """HEALTH_CHECKS overridden False after pinged units: no ping at all."""
    settings.TASK_DB = {"HEALTH_CHECK_IDLE": IDLE}
    alias = direct_server.alias
    query(alias)
    for _ in range(2):
        time.sleep(PAST_IDLE)
        with task_scope():
            query(alias)
        time.sleep(PAST_IDLE)
        query(alias)
    armed = len(pings)

    with override_settings(TASK_DB=override):
        for _ in range(2):
            with task_scope():
                query(alias)
                time.sleep(idle)
                query(alias)
            query(alias)
            time.sleep(idle)
            query(alias)

    assert armed > 0
    assert len(pings) == armed


# -- 2a, 2b. Threads -------------------------------------------------------------


def test_thread_pool_sessions_closed_at_shutdown(
    direct_server, settings, sessions, max_age, no_gc
):
    """ThreadPoolExecutor(4), 40 units, close_old: no session after shutdown."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    max_age(60)
    alias = direct_server.alias
    used: list[int] = []

    @task_scope
    def unit() -> None:
        query(alias)
        used.append(direct_server.session_id())

    executor = ThreadPoolExecutor(4)
    try:
        futures = [executor.submit(unit) for _ in range(40)]
        for future in futures:
            future.result(timeout=TIMEOUT)
    finally:
        executor.shutdown(wait=True)
    no_gc.update(used)

    assert not gc.isenabled()
    assert 1 <= len(set(used)) <= 4
    assert sessions.wait_until_gone(set(used), GONE_TIMEOUT) == set()


def run_in_thread(target: Callable[..., None], *args: Any) -> None:
    """Run ``target(*args)`` in a new thread, until the thread has ended."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target(*args)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


def test_thread_per_unit_leaves_no_session(direct_server, settings, sessions, no_gc):
    """A thread per unit, 20 times: its session is gone after each join."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    alias = direct_server.alias
    assert connections[alias].settings_dict["CONN_MAX_AGE"] is None
    left: list[set[int]] = []

    @task_scope
    def unit(used: list[int]) -> None:
        query(alias)
        used.append(direct_server.session_id())

    for _ in range(20):
        used: list[int] = []
        run_in_thread(unit, used)
        no_gc.update(used)
        left.append(sessions.wait_until_gone(set(used), GONE_TIMEOUT))
        if left[-1]:
            break

    assert not gc.isenabled()
    assert left == [set()] * 20


def test_plain_thread_connection_closed_when_it_ends(direct_server, sessions, no_gc):
    """A thread that queries outside any unit: its session is gone once it ends."""
    alias = direct_server.alias
    used: list[int] = []

    def plain() -> None:
        query(alias)
        used.append(direct_server.session_id())

    run_in_thread(plain)
    no_gc.update(used)

    assert not gc.isenabled()
    assert len(used) == 1
    assert sessions.wait_until_gone(set(used), GONE_TIMEOUT) == set()


# -- 2c. gevent: a greenlet per unit ---------------------------------------------

GREEN_SCRIPT = r"""
import gc
import json
import select
import sys

from gevent import monkey

monkey.patch_all()

import django
import gevent
from gevent.event import Event

django.setup()

import django_task_db
from django.db import connections
from django_task_db import task_scope
from tests.testapp.models import Item

mode, alias = sys.argv[1], sys.argv[2]
SQL = {"mysql": "SELECT CONNECTION_ID()", "postgresql": "SELECT pg_backend_pid()"}
connections[alias].settings_dict["CONN_MAX_AGE"] = 60
gc.disable()


def say(**message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def wait_for_the_test():
    # gevent's select: the hub keeps running while this waits.
    ready, _, _ = select.select([sys.stdin], [], [], 60)
    if not ready or not sys.stdin.readline():
        sys.exit("no word from the test")


@task_scope
def unit():
    Item.objects.using(alias).exists()
    connection = connections[alias]
    with connection.cursor() as cursor:
        cursor.execute(SQL[connection.vendor])
        return int(cursor.fetchone()[0])


say(package=django_task_db.__file__)
if mode == "sequence":
    ids = []
    for _ in range(20):
        greenlet = gevent.spawn(unit)
        greenlet.join()
        if not greenlet.successful():
            raise greenlet.exception
        ids.append(greenlet.value)
    gevent.sleep(0.05)
    say(units=ids, gc_enabled=gc.isenabled())
    wait_for_the_test()
else:
    finished, release, box = Event(), Event(), []

    def alive():
        box.append(unit())
        finished.set()
        release.wait()

    greenlet = gevent.spawn(alive)
    finished.wait(60)
    say(unit=box[0] if box else None, dead=greenlet.dead, gc_enabled=gc.isenabled())
    wait_for_the_test()
    release.set()
    greenlet.join()
say(done=True)
"""


class GreenProcess:
    """The subprocess running GREEN_SCRIPT: JSON lines out, a line in to go on."""

    def __init__(self, tmp_path: Path, mode: str, alias: str):
        pytest.importorskip("gevent")
        script = tmp_path / "green_units.py"
        script.write_text(GREEN_SCRIPT)
        self.stderr_path = tmp_path / "green_units.err"
        env = dict(os.environ)
        env.update(
            DJANGO_SETTINGS_MODULE="tests.settings",
            TASK_DB_TEST_SETTINGS=json.dumps({"STRATEGY": "close_old"}),
            PYTHONUNBUFFERED="1",
        )
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
        )
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(script), mode, alias],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], TIMEOUT)
        line = self.process.stdout.readline() if ready else ""
        assert line, f"no answer from the gevent process: {self.errors()}"
        return json.loads(line)

    def go_on(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def errors(self) -> str:
        return self.stderr_path.read_text()[-5000:]

    def stop(self) -> None:
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextmanager
def green_process(tmp_path: Path, mode: str, alias: str) -> Iterator[GreenProcess]:
    process = GreenProcess(tmp_path, mode, alias)
    try:
        started = process.read()
        assert Path(started["package"]).resolve().is_relative_to(ROOT)
        yield process
    finally:
        process.stop()


def test_greenlet_per_unit_leaves_no_session(direct_server, sessions, tmp_path):
    """gevent, 20 units in a greenlet each (close_old, 60 s): no session left."""
    with green_process(tmp_path, "sequence", direct_server.alias) as process:
        report = process.read()
        left = sessions.wait_until_gone(set(report["units"]), GONE_TIMEOUT)
        process.go_on()
        assert process.read() == {"done": True}
    sessions.wait_until_gone(set(report["units"]), GONE_TIMEOUT)

    assert report["gc_enabled"] is False
    assert len(set(report["units"])) == 20
    assert left == set()


def test_greenlet_unit_closes_its_connection_at_its_end(
    direct_server, sessions, tmp_path
):
    """gevent: a unit closes its connection at its end, its greenlet alive."""
    with green_process(tmp_path, "alive", direct_server.alias) as process:
        report = process.read()
        assert report["unit"] is not None, process.errors()
        left = sessions.wait_until_gone({report["unit"]}, GONE_TIMEOUT)
        process.go_on()
        assert process.read() == {"done": True}
    sessions.wait_until_gone({report["unit"]}, GONE_TIMEOUT)

    assert report["dead"] is False
    assert left == set()


def test_connection_never_used_in_a_unit_survives_a_kill(direct_server):
    """A connection opened and used only outside any unit (a scheduler, a
    worker's main process), in a thread that never ran one: killed while
    idle, its next query succeeds on a new session."""
    from tests.servers import idle_past_health_check

    outcome: list[Any] = []

    def outside_any_unit() -> None:
        try:
            killed = direct_server.session_id()  # a new connection object
            direct_server.kill(killed)
            idle_past_health_check()
            outcome.append(direct_server.session_id() != killed)
        except Exception as exc:
            outcome.append(exc)
        finally:
            connections[direct_server.alias].close()

    thread = threading.Thread(target=outside_any_unit)
    thread.start()
    thread.join(TIMEOUT)
    assert outcome == [True]
