"""The fault matrix (issue #4, part 3) and the security checks (part 4).

Each row of the matrix runs on MariaDB and on PostgreSQL, with real faults
provoked on real servers, and checks that nothing is lost:

- the rows committed are exactly those of the units that succeeded, counted
  through a separate admin connection by a marker unique to the test, in a
  table of this module's own (other test runs may share the servers and
  empty tests.testapp's table when their tests start);
- a failed unit leaves no row, and its exception reaches the caller
  unchanged (the very object; for server errors, the driver's code in
  ``__cause__``);
- the package makes no hidden retry (the unit's calls are counted);
- the next unit succeeds at its first attempt.

Rows covered elsewhere, not repeated here: close() raising on one alias
while the others are still closed (test_strategies.
test_close_failure_is_swallowed_per_alias; here only what it lacks: the
unit's return value and exception unchanged, with a close() failing for
real); a task_finished receiver connected after the app's that opens a
connection (test_signals.
test_task_finished_receiver_connected_after_ours_opens_a_connection: it
stays open, idle, until the next boundary of the thread). A server restart
and a server that is down run on PRIVATE instances (tests/private_servers.py)
started once per session on ports of their own. The Celery rows run in a
real prefork worker (tests/workers.Worker) that also loads
tests/fault_tasks.py. Run with ``-s`` to see the soak figures.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import threading
import time
import traceback
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import OperationalError, connections, transaction
from django.db.backends.signals import connection_created

from django_task_db import is_disconnect, task_scope
from django_task_db.checks import check_settings
from django_task_db.signals import task_finished, task_started, worker_stopping
from tests import fault_tasks
from tests.fault_tasks import TABLE, insert, sleep_sql, sleep_tag
from tests.private_servers import (
    PrivateServer,
    add_alias,
    make_private,
    remove_alias,
)
from tests.servers import (
    MySQLServer,
    Server,
    Sessions,
    idle_past_health_check,
    in_every_thread,
    local_ports,
    make_server,
    unavailable,
)
from tests.workers import Worker, sending_app, unique_queue

TIMEOUT = 30
PRIVATE_ALIAS = "task_db_private"

# Celery's Redis result backend still calls a method redis-py deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Call to deprecated setex:DeprecationWarning"
)

measurements: dict[str, dict[str, Any]] = {}


# Rows, markers and units.


def marker(label: str) -> str:
    return f"{label}_{uuid.uuid4().hex[:16]}"


def create_table(server: Server) -> None:
    if isinstance(server, MySQLServer):
        server.query(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id integer AUTO_INCREMENT "
            "PRIMARY KEY, marker varchar(64) NOT NULL, INDEX (marker)) ENGINE=InnoDB"
        )
    else:
        server.query(
            f"CREATE TABLE IF NOT EXISTS {TABLE} "
            "(id serial PRIMARY KEY, marker varchar(64) NOT NULL)"
        )
        server.query(f"CREATE INDEX IF NOT EXISTS {TABLE}_marker ON {TABLE} (marker)")


_tables: set[str] = set()


@pytest.fixture
def db(direct_server: Server) -> Server:
    """MariaDB and PostgreSQL (plain connections), with this module's table."""
    if direct_server.alias not in _tables:
        create_table(direct_server)
        _tables.add(direct_server.alias)
    return direct_server


def rows(server: Server, mark: str) -> int:
    """Committed rows of ``mark``, counted through an admin connection."""
    found = server.query(f"SELECT COUNT(*) FROM {TABLE} WHERE marker = %s", (mark,))
    return int(found[0][0])


def delete_rows(server: Server, *marks: str) -> None:
    for mark in marks:
        server.query(f"DELETE FROM {TABLE} WHERE marker = %s", (mark,))


@dataclass
class Outcome:
    value: Any
    error: BaseException | None
    calls: int
    seen: list[BaseException]  # what the body raised, as it raised it


def run_unit(body: Callable[..., Any], *args: Any, **scope: Any) -> Outcome:
    """Run ``body(*args)`` as a unit decorated with task_scope(**scope):
    its return value or the exception that reached this caller, the number
    of calls of the body, and the exceptions the body itself raised."""
    calls: list[int] = []
    seen: list[BaseException] = []

    @task_scope(**scope)
    def unit() -> Any:
        calls.append(1)
        try:
            return body(*args)
        except BaseException as exc:
            seen.append(exc)
            raise

    try:
        return Outcome(unit(), None, len(calls), seen)
    except Exception as exc:
        return Outcome(None, exc, len(calls), seen)


def write(alias: str, mark: str) -> int:
    """Write one row of ``mark``; the server's id of the connection."""
    insert(alias, mark)
    return make_server(alias).session_id()


def next_unit_succeeds(server: Server) -> int:
    """A unit that writes a row succeeds at its first call, and its row is
    committed; return its session id."""
    mark = marker("next")
    outcome = run_unit(write, server.alias, mark)
    assert outcome.error is None
    assert outcome.calls == 1
    assert rows(server, mark) == 1
    return int(outcome.value)


def assert_failed_unchanged(outcome: Outcome, error_type: type) -> BaseException:
    """The unit ran once and the caller got the body's own exception."""
    assert outcome.calls == 1
    assert outcome.error is not None
    assert type(outcome.error) is error_type
    assert outcome.seen[-1] is outcome.error
    return outcome.error


def driver_code(exc: BaseException) -> Any:
    """The driver's error code of a Django database error: MySQL's number,
    PostgreSQL's SQLSTATE."""
    cause = exc.__cause__
    assert cause is not None
    if type(cause).__module__.startswith("MySQLdb"):
        return cause.args[0]
    return cause.sqlstate


@pytest.fixture
def opened() -> Iterator[list[str]]:
    """The alias of every connection Django opens during the test, any thread."""
    seen: list[str] = []

    def record(connection: Any, **kwargs: Any) -> None:
        seen.append(connection.alias)

    connection_created.connect(record, weak=False, dispatch_uid="fault_matrix")
    yield seen
    connection_created.disconnect(dispatch_uid="fault_matrix")


def poll(
    check: Callable[[], Any], timeout: float = TIMEOUT, every: float = 0.02
) -> Any:
    """Call ``check`` until it returns something true, or the deadline."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(every)
    return value


def session_running(server: Server, mark: str) -> int | None:
    """The id of the session whose current query contains ``mark``."""
    if isinstance(server, MySQLServer):
        sql = (
            "SELECT ID FROM information_schema.PROCESSLIST "
            "WHERE INFO LIKE %s AND ID <> CONNECTION_ID()"
        )
    else:
        sql = (
            "SELECT pid FROM pg_stat_activity WHERE query LIKE %s "
            "AND state = 'active' AND pid <> pg_backend_pid()"
        )
    found = server.query(sql, (f"%{mark}%",))
    return int(found[0][0]) if found else None


class WhenRunning(threading.Thread):
    """Wait, in a thread of its own (admin connections only), for the query
    tagged ``mark`` to run on the server, then call ``action(session)``."""

    def __init__(self, server: Server, mark: str, action: Callable[[int], None]):
        super().__init__(daemon=True)
        self.server, self.mark, self.action = server, mark, action
        self.session: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.session = poll(lambda: session_running(self.server, self.mark))
            assert self.session, f"{self.mark} never ran on {self.server}"
            self.action(self.session)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> int:
        self.join(TIMEOUT)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error
        assert self.session is not None
        return self.session


# Row: the connection dies between units (idle timeout, KILL).


def set_idle_timeout(server: Server) -> None:
    """Make the server drop this unit's connection after 1 s idle."""
    with connections[server.alias].cursor() as cursor:
        if isinstance(server, MySQLServer):
            cursor.execute("SET SESSION wait_timeout = 1")
        else:
            cursor.execute("SET idle_session_timeout = '1s'")


def test_idle_timeout_between_units(db, opened):
    """The server drops an idle connection between units: the next reconnects."""
    # HEALTH_CHECKS (default): the next unit pings before its first query.
    first = marker("first")

    def unit() -> int:
        set_idle_timeout(db)
        return write(db.alias, first)

    outcome = run_unit(unit)
    assert outcome.error is None and outcome.calls == 1
    db.wait_until_gone(outcome.value, timeout=TIMEOUT)  # dropped by the server
    assert connections[db.alias].connection is not None  # Django does not know
    second = next_unit_succeeds(db)
    assert second != outcome.value
    assert rows(db, first) == 1
    assert opened == [db.alias, db.alias]


def test_kill_between_units(db, opened):
    """KILL / pg_terminate_backend between units: the next unit reconnects."""
    first = marker("first")
    outcome = run_unit(write, db.alias, first)
    assert outcome.error is None and outcome.calls == 1
    db.kill(outcome.value)
    idle_past_health_check()
    second = next_unit_succeeds(db)
    assert second != outcome.value
    assert rows(db, first) == 1
    assert opened == [db.alias, db.alias]


# Rows: a server restart between units, a server down at a unit's start.


class PrivateInstances:
    """The session's private server instances, started on first use."""

    def __init__(self) -> None:
        self.instances: dict[str, PrivateServer] = {}
        self.failures: dict[str, str] = {}

    def get(self, vendor: str) -> PrivateServer:
        if vendor in self.failures:
            unavailable(f"a private {vendor} server", self.failures[vendor])
        if vendor not in self.instances:
            instance = make_private(vendor)
            reason = instance.missing()
            if reason is None:
                try:
                    instance.initialize()
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}\n{instance.log()}"
            if reason is not None:
                instance.stop()
                instance.remove()
                self.failures[vendor] = reason
                unavailable(instance.name, reason)
            self.instances[vendor] = instance
        return self.instances[vendor]

    def close(self) -> None:
        for instance in self.instances.values():
            try:
                instance.stop()
            finally:
                instance.remove()


@pytest.fixture(scope="session")
def private_instances() -> Iterator[PrivateInstances]:
    instances = PrivateInstances()
    yield instances
    instances.close()


@dataclass
class Private:
    instance: PrivateServer
    server: Server  # admin access through the alias's settings


@pytest.fixture(params=["mysql", "postgresql"])
def private(request, private_instances) -> Iterator[Private]:
    """A private MariaDB / PostgreSQL instance, running, as the extra alias
    PRIVATE_ALIAS (added to DATABASES for the test), with this module's table."""
    instance = private_instances.get(request.param)
    if not instance.accepts_connections():
        instance.start()  # a test before this one left it stopped
    add_alias(PRIVATE_ALIAS, instance.database())
    try:
        server = make_server(PRIVATE_ALIAS)
        create_table(server)
        yield Private(instance, server)
    finally:
        remove_alias(PRIVATE_ALIAS)
        if not instance.accepts_connections():
            instance.start()


def test_server_restart_between_units(private, opened):
    """A server restart between units: the next unit reconnects, no row lost."""
    server = private.server
    first = marker("first")
    outcome = run_unit(write, PRIVATE_ALIAS, first)
    assert outcome.error is None and outcome.calls == 1
    private.instance.restart()
    idle_past_health_check()
    assert connections[PRIVATE_ALIAS].connection is not None  # the dead one
    next_unit_succeeds(server)
    assert rows(server, first) == 1
    assert opened == [PRIVATE_ALIAS, PRIVATE_ALIAS]


def assert_connect_error(exc: BaseException, server: Server) -> None:
    """Django's OperationalError from the driver's failed connect."""
    assert type(exc) is OperationalError
    if isinstance(server, MySQLServer):
        # 2002 or 2003: can't connect (mysqlclient says 2002 for TCP too).
        assert driver_code(exc) in (2002, 2003)
    else:
        assert type(exc.__cause__).__name__ == "OperationalError"
        assert "Connection refused" in str(exc.__cause__)
    assert not is_disconnect(exc)


def test_server_down_at_unit_start(private, opened, closed):
    """Server down at a unit's start: the connect error, unchanged; then it is back."""
    # Two units fail: one holding a connection from before (the health check
    # drops it, then connecting fails), one holding none. Neither leaves state.
    server = private.server
    outcome = run_unit(write, PRIVATE_ALIAS, marker("before"))
    assert outcome.error is None
    private.instance.stop()
    idle_past_health_check()
    marks = [marker("stale"), marker("fresh")]
    for mark in marks:
        outcome = run_unit(write, PRIVATE_ALIAS, mark)
        error = assert_failed_unchanged(outcome, OperationalError)
        assert_connect_error(error, server)
        connection = connections[PRIVATE_ALIAS]
        assert connection.connection is None
        assert not connection.in_atomic_block
    assert opened == [PRIVATE_ALIAS]  # the failed connects opened nothing
    private.instance.start()
    assert all(rows(server, mark) == 0 for mark in marks)
    next_unit_succeeds(server)
    assert opened == [PRIVATE_ALIAS, PRIVATE_ALIAS]


# Row: the connection is killed in the middle of a query.


def test_kill_during_a_query(db, opened, closed):
    """KILL mid-query: the unit fails with 2013 / 57P01 unchanged; the next succeeds."""
    mark = marker("killed")

    def unit() -> None:
        with transaction.atomic(using=db.alias):
            insert(db.alias, mark)
            with connections[db.alias].cursor() as cursor:
                cursor.execute(sleep_sql(db.alias, 30, mark))

    killer = WhenRunning(db, sleep_tag(mark), db.kill)
    killer.start()
    outcome = run_unit(unit)
    killed = killer.finish()
    error = assert_failed_unchanged(outcome, OperationalError)
    assert driver_code(error) == (2013 if isinstance(db, MySQLServer) else "57P01")
    assert is_disconnect(error)
    assert rows(db, mark) == 0
    assert connections[db.alias].connection is None
    session = next_unit_succeeds(db)
    assert session != killed
    # Django's atomic block, failing to roll back, closed the connection and
    # then reconnected to restore autocommit; CLOSE_ON_FAILURE closed that
    # one at the unit's end. The next unit opened the third.
    assert opened == [db.alias] * 3
    assert closed == [(db.alias, "failure")]
    sessions = Sessions(db)
    try:
        assert sessions.wait_for_own(1) == {session}
    finally:
        sessions.close()


# Row: the query is interrupted, the connection lives on.


INTERRUPTED = {  # (vendor, how) -> driver code
    ("mysql", "cancel"): 1317,  # KILL QUERY
    ("mysql", "timeout"): 1969,  # max_statement_time
    ("postgresql", "cancel"): "57014",  # pg_cancel_backend
    ("postgresql", "timeout"): "57014",  # statement_timeout
}


@pytest.mark.parametrize("close_on_failure", [True, False], ids=["close", "keep"])
@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_query_interrupted(db, settings, opened, closed, how, close_on_failure):
    """KILL QUERY, a cancel, a statement timeout: the unit fails, no reconnect storm."""
    # The connection lives on: CLOSE_ON_FAILURE closes it all the same; without
    # it, close_old pings it (errors_occurred) and the next unit reuses it.
    settings.TASK_DB = {"CLOSE_ON_FAILURE": close_on_failure}
    alias, mysql = db.alias, isinstance(db, MySQLServer)
    mark = marker(how)
    sleep = sleep_sql(alias, 30, mark)

    failed_session: list[int] = []

    def unit() -> None:
        failed_session.append(db.session_id())
        with transaction.atomic(using=alias):
            insert(alias, mark)
            with connections[alias].cursor() as cursor:
                if how == "timeout" and mysql:
                    cursor.execute(
                        f"SET STATEMENT max_statement_time = 0.2 FOR {sleep}"
                    )
                else:
                    if how == "timeout":
                        cursor.execute("SET LOCAL statement_timeout = 200")
                    cursor.execute(sleep)

    canceller = None
    if how == "cancel":
        if mysql:
            cancel = lambda session: db.query(f"KILL QUERY {int(session)}")  # noqa: E731
        else:
            cancel = lambda session: db.query(  # noqa: E731
                "SELECT pg_cancel_backend(%s)", (session,)
            )
        canceller = WhenRunning(db, sleep_tag(mark), cancel)
        canceller.start()
    outcome = run_unit(unit)
    if canceller is not None:
        canceller.finish()
    error = assert_failed_unchanged(outcome, OperationalError)
    assert driver_code(error) == INTERRUPTED[(connections[alias].vendor, how)]
    assert not is_disconnect(error)
    assert rows(db, mark) == 0
    kept = connections[alias].connection is not None
    assert kept is not close_on_failure
    assert closed == ([] if kept else [(alias, "failure")])
    session = next_unit_succeeds(db)
    assert (session == failed_session[0]) is kept
    sessions = Sessions(db)
    try:
        own = sessions.wait_for_own(1)
    finally:
        sessions.close()
    assert own == {session}  # at most one server session for the alias
    assert opened == [alias] * (1 if kept else 2)


# Row: an exception with a transaction open.


def lock_row(server: Server) -> tuple[str, int]:
    """A committed row for units to lock: its marker and id."""
    mark = marker("lock")
    server.query(f"INSERT INTO {TABLE} (marker) VALUES (%s)", (mark,))
    found = server.query(f"SELECT id FROM {TABLE} WHERE marker = %s", (mark,))
    return mark, int(found[0][0])


def try_lock(server: Server, row_id: int) -> BaseException | None:
    """Take the row's lock from an admin connection without waiting
    (SELECT ... FOR UPDATE NOWAIT); the error if it is held elsewhere."""
    conn = server.admin()
    try:
        with conn.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute(
                f"SELECT id FROM {TABLE} WHERE id = %s FOR UPDATE NOWAIT", (row_id,)
            )
            cursor.execute("ROLLBACK")
    except Exception as exc:  # the driver's lock error, whichever it is
        return exc
    finally:
        conn.close()
    return None


class Boom(Exception):
    pass


@pytest.mark.parametrize(
    "how, close_on_failure",
    [
        ("set_autocommit", True),
        ("set_autocommit", False),
        ("atomic", True),
        ("atomic", False),
    ],
)
def test_exception_with_an_open_transaction(
    db, settings, closed, how, close_on_failure
):
    """A unit raising in an open transaction: rolled back, locks released."""
    # Writes and a row lock after set_autocommit(False), or in transaction.atomic
    # with SELECT ... FOR UPDATE; autocommit is back for the next unit.
    settings.TASK_DB = {"CLOSE_ON_FAILURE": close_on_failure}
    alias = db.alias
    lock_mark, row_id = lock_row(db)
    mark = marker(how)
    held: list[BaseException | None] = []

    def writes() -> None:
        insert(alias, mark)
        with connections[alias].cursor() as cursor:
            if how == "atomic":
                cursor.execute(
                    f"SELECT id FROM {TABLE} WHERE id = %s FOR UPDATE", [row_id]
                )
            else:
                cursor.execute(
                    f"UPDATE {TABLE} SET marker = %s WHERE id = %s", [mark, row_id]
                )
        held.append(try_lock(db, row_id))

    session: list[int] = []

    def unit() -> None:
        session.append(db.session_id())
        if how == "atomic":
            with transaction.atomic(using=alias):
                writes()
                raise Boom(how)
        transaction.set_autocommit(False, using=alias)
        writes()
        raise Boom(how)

    outcome = run_unit(unit)
    assert_failed_unchanged(outcome, Boom)
    assert held[0] is not None  # the unit did hold the lock
    # CLOSE_ON_FAILURE closes the connection, and the server rolls back.
    # Without it, the unit's end rolls back the transaction the unit left
    # open after set_autocommit(False), and transaction.atomic rolls back
    # itself: the connection is kept.
    reason = "failure" if close_on_failure else None
    assert closed == ([] if reason is None else [(alias, reason)])
    if reason is not None:
        db.wait_until_gone(session[0])
    assert try_lock(db, row_id) is None  # released
    assert rows(db, mark) == 0
    assert rows(db, lock_mark) == 1  # the UPDATE was rolled back
    autocommit: list[bool] = []
    outcome = run_unit(lambda: autocommit.append(connections[alias].get_autocommit()))
    assert outcome.error is None and outcome.calls == 1
    assert autocommit == [True]
    next_unit_succeeds(db)


# Row: a unit inside an outer atomic block.


def test_units_inside_an_outer_atomic_block(db, caplog, closed):
    """Units in an outer atomic block: nothing closed, the outer block commits."""
    # One unit fails in its own savepoint; at most one warning per unit.
    alias = db.alias
    marks = {name: marker(name) for name in ("outer", "one", "failed", "two")}
    warnings: list[int] = []
    caplog.set_level(logging.INFO, logger="django_task_db")
    with transaction.atomic(using=alias):
        insert(alias, marks["outer"])
        session = db.session_id()
        for name in ("one", "failed", "two"):
            caplog.clear()
            if name == "failed":

                def unit() -> None:
                    with transaction.atomic(using=alias):
                        insert(alias, marks["failed"])
                        raise Boom

                assert_failed_unchanged(run_unit(unit), Boom)
            else:
                outcome = run_unit(write, alias, marks[name])
                assert outcome.error is None and outcome.calls == 1
                assert outcome.value == session
            warnings.append(
                len(
                    [
                        r
                        for r in caplog.records
                        if r.name == "django_task_db" and r.levelno >= logging.WARNING
                    ]
                )
            )
        assert all(rows(db, mark) == 0 for mark in marks.values())  # not yet
    assert db.session_id() == session
    assert closed == []
    assert {name: rows(db, mark) for name, mark in marks.items()} == {
        "outer": 1,
        "one": 1,
        "failed": 0,
        "two": 1,
    }
    assert max(warnings) <= 1
    next_unit_succeeds(db)


# Row: close() fails on one alias.


def test_close_failure_leaves_the_units_outcome(
    mysql, postgres, settings, closed, caplog
):
    """close() failing on MariaDB: the unit's value or error reaches the caller."""
    # Really failing: the driver's connection closed under Django's feet, so
    # mysqlclient raises 2006. What test_strategies.
    # test_close_failure_is_swallowed_per_alias lacks.
    settings.TASK_DB = {"STRATEGY": "close_all"}
    caplog.set_level(logging.INFO, logger="django_task_db")
    result = object()

    def unit(fail: bool) -> object:
        mysql.session_id()
        postgres.session_id()
        connections["mysql"].connection.close()  # under Django's feet
        if fail:
            raise Boom
        return result

    outcome = run_unit(unit, False)
    assert outcome.error is None and outcome.value is result and outcome.calls == 1
    outcome = run_unit(unit, True)
    assert_failed_unchanged(outcome, Boom)
    assert closed == [
        ("mysql", "close_all"),
        ("postgres", "close_all"),
        ("mysql", "failure"),
        ("postgres", "failure"),
    ]
    failures = [
        r for r in caplog.records if "Closing database connection" in r.getMessage()
    ]
    assert len(failures) == 2
    assert all("'mysql'" in r.getMessage() for r in failures)
    sessions = Sessions(postgres)
    try:
        assert sessions.wait_for_own(0) == set()
    finally:
        sessions.close()


# Rows in a real prefork Celery worker: the soft time limit, the soak.


SENTINEL = uuid.uuid4().hex  # unique per run: it must never be seen
SENTINEL_PASSWORD = f"pw-{SENTINEL}"
SENTINEL_OPTION = f"opt-{SENTINEL}"


def sentinel_databases() -> dict[str, dict[str, Any]]:
    """Aliases whose PASSWORD and OPTIONS hold the sentinel; nothing listens
    on their port, so connecting fails."""
    return {
        "sentinel_mysql": {
            "ENGINE": "django.db.backends.mysql",
            "NAME": "sentinel",
            "HOST": "127.0.0.1",
            "PORT": "1",
            "USER": "root",
            "PASSWORD": SENTINEL_PASSWORD,
            "OPTIONS": {"init_command": f"SET @task_db = '{SENTINEL_OPTION}'"},
        },
        "sentinel_postgres": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "sentinel",
            "HOST": "127.0.0.1",
            "PORT": "1",
            "USER": "postgres",
            "PASSWORD": SENTINEL_PASSWORD,
            "OPTIONS": {"options": f"-c task_db.sentinel={SENTINEL_OPTION}"},
        },
    }


class FaultWorker(Worker):
    """A prefork worker that also loads tests/fault_tasks.py, with extra
    DATABASES aliases passed to it as JSON."""

    def __init__(self, *args: Any, databases: dict[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.databases = databases

    def command(self) -> list[str]:
        return [*super().command(), "--include", "tests.fault_tasks"]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env[fault_tasks.DATABASES_ENV] = json.dumps(self.databases)
        return env


CONCURRENCY = 2


@pytest.fixture(scope="module")
def worker(redis_url, tmp_path_factory) -> Iterator[FaultWorker]:
    """One ``celery worker --pool=prefork -c 2`` (TASK_DB {}), shared by the
    Celery rows of this module, with the sentinel aliases in its DATABASES."""
    directory = tmp_path_factory.mktemp("fault_worker")
    with sending_app(redis_url, unique_queue("fault")) as app:
        worker = FaultWorker(
            app,
            app.conf.task_default_queue,
            directory / "worker.log",
            {},
            CONCURRENCY,
            databases=sentinel_databases(),
        )
        worker.start()
        try:
            yield worker
        finally:
            outcome = worker.stop()
        for name, figures in measurements.items():
            print(f"\n[fault matrix] {name}: {figures}")
    assert not outcome["killed"], (outcome, worker.log()[-20000:])
    assert not outcome["left_running"], (outcome, worker.log()[-20000:])


def pid_of_session(worker: Worker, server: Server, session: int) -> int | None:
    """The worker process whose socket is the client end of ``session``."""
    sessions = Sessions(server)
    try:
        ports = {port for sid, port in sessions.rows() if sid == session}
    finally:
        sessions.close()
    for pid in worker.processes():
        if ports & local_ports(pid):
            return pid
    return None


@pytest.mark.parametrize("write", [False, True], ids=["autocommit", "write"])
def test_soft_time_limit_interrupts_a_query(worker, db, write):
    """Celery's soft time limit mid-query: the task fails, its session ends."""
    # Celery's soft time limit fires while a prefork task waits on a query
    # (in autocommit, or after an uncommitted write): the task fails with
    # SoftTimeLimitExceeded, no row is committed, its server session ends,
    # and the next task in that pool process succeeds. The interrupted
    # connection is unusable (MariaDB 2014 commands out of sync, psycopg
    # "another command is already in progress") and Django does not know
    # (no database error was raised: ticket #30646): CLOSE_ON_FAILURE
    # closes it.
    #
    # mysqlclient retries the read that the signal interrupts, so on MariaDB
    # the limit only fires once the query returns: its query sleeps 3 s. On
    # PostgreSQL psycopg returns at once and the query sleeps 60 s: the server
    # session must end well before that.
    alias = db.alias
    mark = marker("soft")
    seconds = 3 if isinstance(db, MySQLServer) else 60
    started = time.monotonic()
    result = worker.send(fault_tasks.sleep_past_soft_limit, alias, mark, seconds, write)
    session = poll(lambda: session_running(db, sleep_tag(mark)))
    assert session, worker.log()[-5000:]
    pid = pid_of_session(worker, db, session)
    assert pid is not None
    with pytest.raises(SoftTimeLimitExceeded):
        result.get(timeout=TIMEOUT)
    failed_after = time.monotonic() - started
    assert result.state == "FAILURE"
    assert type(result.result) is SoftTimeLimitExceeded
    left = Sessions(db)
    try:
        gone = not left.wait_until_gone({session}, timeout=5)
    finally:
        left.close()
    ended_after = time.monotonic() - started
    measurements[f"{db.name} soft time limit, write={write}"] = {
        "task failed after s": round(failed_after, 2),
        "session ended after s": round(ended_after, 2) if gone else None,
        "query seconds": seconds,
    }
    assert rows(db, mark) == 0
    # The next task of the same pool process succeeds.
    deadline = time.monotonic() + TIMEOUT
    pids: set[int] = set()
    nexts = []
    while pid not in pids and time.monotonic() < deadline:
        nexts.append(marker("next"))
        answer = worker.run(fault_tasks.write_marker, alias, nexts[-1], timeout=TIMEOUT)
        pids.add(answer["pid"])
        assert answer["session"] != session
    assert pid in pids
    assert all(rows(db, mark) == 1 for mark in nexts)
    # Fails on PostgreSQL when written: psycopg cancels the query only for
    # KeyboardInterrupt and SystemExit; for SoftTimeLimitExceeded it leaves
    # the connection ACTIVE, and closing it does not stop the statement, so
    # the server session (and its transaction's locks) lives on until the
    # query ends by itself.
    assert gone, f"session {session} still on the server {ended_after:.1f}s after"


# The soak: 10,000 units solo, in 8 threads, and in the prefork worker.


UNITS = 10_000
WARMUP = 500
THREADS = 8
# Bounds, after a warm-up: open file descriptors grow by 5 at most, Python's
# traced memory by less than 1 MiB, and connections.all() not at all; the
# server never holds more than concurrency + 1 sessions of ours.
FDS_GROWTH = 5
TRACED_GROWTH = 1024 * 1024


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def figures() -> dict[str, int]:
    wrappers = len(connections.all())  # first: it may import a backend
    gc.collect()
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "traced": tracemalloc.get_traced_memory()[0],
        "rss_kib": rss_kib(),
        "connections": wrappers,
    }


def server_ports(pid: int | str, server_port: int) -> set[int]:
    """Local ports of process ``pid``'s TCP sockets connected to ``server_port``."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
        with open(f"/proc/{pid}/net/tcp") as file:
            lines = file.read().splitlines()[1:]
    except OSError:  # the process is gone
        return set()
    ports = set()
    for line in lines:
        fields = line.split()
        if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == server_port:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class Peak(threading.Thread):
    """The peak number of server sessions held by processes ``pids``, sampled
    every 10 ms from a thread of its own, on one admin connection, until
    stopped.

    Each sample asks the server for the sessions of the alias, with their
    client ports (other test runs sharing the server included); a session is
    ours if its client port is that of a socket of ``pids`` connected to the
    server. Reading /proc is costly (every TCP socket of the host is listed,
    TIME_WAIT ones too) and would slow the units down, so each session (id
    and port) is looked up once, when it first shows.
    """

    def __init__(self, server: Server, pids: list[int | str]):
        super().__init__(daemon=True)
        self.server = server
        self.pids = pids
        self.peak = 0
        self.samples = 0
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            sessions = Sessions(self.server)
            port = int(self.server.settings["PORT"])
            ours: dict[tuple[int, int | None], bool] = {}
            try:
                while not self.stopping.is_set():
                    found = sessions.rows()
                    if new := [row for row in found if row not in ours]:
                        ports: set[int] = set()
                        for pid in self.pids:
                            ports |= server_ports(pid, port)
                        ours.update((row, row[1] in ports) for row in new)
                    self.peak = max(self.peak, sum(ours[row] for row in found))
                    self.samples += 1
                    self.stopping.wait(0.01)  # the sampling period
            finally:
                sessions.close()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> int:
        self.stopping.set()
        self.join(TIMEOUT)
        if self.error is not None:
            raise self.error
        assert self.samples > 0
        return self.peak


@pytest.fixture
def traced() -> Iterator[None]:
    """tracemalloc on for the test (unless it already was)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    yield
    if started:
        tracemalloc.stop()


@pytest.mark.parametrize("mode", ["solo", "threads"])
def test_soak_in_process(db, traced, mode):
    """10,000 units solo or in 8 threads: nothing lost, no growth."""
    # 10,000 units through task_scope, in one thread or in 8: every row
    # committed, at most concurrency + 1 server sessions at any time, and after
    # a warm-up fds within +5, traced memory growth under 1 MiB, and
    # connections.all() the same size.
    alias = db.alias
    mark = marker(f"soak_{mode}")
    concurrency = 1 if mode == "solo" else THREADS

    @task_scope
    def unit() -> None:
        insert(alias, mark)

    @task_scope
    def first_unit() -> None:
        # The soak measures the client: PostgreSQL need not wait for the WAL
        # to reach the disk at each commit (a session setting, kept with the
        # connection).
        if connections[alias].vendor == "postgresql":
            with connections[alias].cursor() as cursor:
                cursor.execute("SET synchronous_commit = off")
        insert(alias, mark)

    started = time.monotonic()
    try:
        if mode == "solo":
            first_unit()
            for _ in range(WARMUP - 1):
                unit()
            before = figures()
            peak = Peak(db, ["self"])
            peak.start()
            for _ in range(UNITS):
                unit()
            peak.stop()
            after = figures()
            per_thread = [after["connections"]]
        else:
            with ThreadPoolExecutor(THREADS) as executor:
                in_every_thread(executor, first_unit)
                for future in [executor.submit(unit) for _ in range(WARMUP)]:
                    future.result(timeout=TIMEOUT)
                before = figures()
                peak = Peak(db, ["self"])
                peak.start()
                futures = [executor.submit(unit) for _ in range(UNITS)]
                for future in futures:
                    future.result(timeout=120)
                del futures, future
                peak.stop()
                after = figures()
                per_thread = in_every_thread(executor, lambda: len(connections.all()))
                in_every_thread(executor, connections.close_all)
        seconds = time.monotonic() - started
        units_done = rows(db, mark)
    finally:
        delete_rows(db, mark)
    measurements[f"{db.name} soak {mode}"] = {
        "units": UNITS + WARMUP + (THREADS if mode == "threads" else 0),
        "seconds": round(seconds, 1),
        "peak_sessions": peak.peak,
        "samples": peak.samples,
        "before": before,
        "after": after,
    }
    name = f"{db.name} soak {mode}"
    print(f"\n[fault matrix] {name}: {measurements[name]}")
    assert units_done == UNITS + WARMUP + (THREADS if mode == "threads" else 0)
    assert 1 <= peak.peak <= concurrency + 1
    assert after["fds"] - before["fds"] <= FDS_GROWTH
    assert after["traced"] - before["traced"] < TRACED_GROWTH
    assert after["connections"] == before["connections"]
    assert set(per_thread) == {before["connections"]}


def probe_children(worker: Worker) -> dict[int, dict[str, Any]]:
    """Each pool process's figures (one probe each), with its RSS."""
    key = f"task_db_probe_{uuid.uuid4().hex}"
    results = [
        worker.send(fault_tasks.probe, key, CONCURRENCY) for _ in range(CONCURRENCY)
    ]
    answers = {}
    for result in results:
        answer = result.get(timeout=TIMEOUT)
        answer["rss_kib"] = rss_kib(answer["pid"])
        answers[answer["pid"]] = answer
    assert len(answers) == CONCURRENCY
    return answers


def wait_for_rows(server: Server, mark: str, expected: int, timeout: float) -> int:
    """Poll until ``mark`` has ``expected`` committed rows; the last count."""
    deadline = time.monotonic() + timeout
    while (count := rows(server, mark)) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def test_soak_prefork(worker, db):
    """10,000 tasks in a prefork -c 2 worker: nothing lost, no growth."""
    # 10,000 tasks in the prefork -c 2 worker: every row committed, at most
    # 3 server sessions of the worker at any time, and in each pool process,
    # after a warm-up, fds within +5, traced memory growth under 1 MiB and
    # connections.all() the same size.
    alias = db.alias
    mark = marker("soak_prefork")
    probe_children(worker)  # starts tracemalloc in each pool process
    try:
        for _ in range(WARMUP):
            worker.send(fault_tasks.soak_unit, alias, mark)
        assert wait_for_rows(db, mark, WARMUP, TIMEOUT) == WARMUP, worker.log()[-5000:]
        before = probe_children(worker)
        peak = Peak(db, list(worker.processes()))
        peak.start()
        started = time.monotonic()
        for _ in range(UNITS):
            worker.send(fault_tasks.soak_unit, alias, mark)
        sent = time.monotonic() - started
        done = wait_for_rows(db, mark, WARMUP + UNITS, 240)
        seconds = time.monotonic() - started
        peak.stop()
        after = probe_children(worker)
    finally:
        delete_rows(db, mark)
    measurements[f"{db.name} soak prefork"] = {
        "tasks": UNITS,
        "send_seconds": round(sent, 1),
        "seconds": round(seconds, 1),
        "peak_sessions": peak.peak,
        "samples": peak.samples,
        "before": before,
        "after": after,
    }
    name = f"{db.name} soak prefork"
    print(f"\n[fault matrix] {name}: {measurements[name]}")
    assert done == WARMUP + UNITS, worker.log()[-5000:]
    assert 1 <= peak.peak <= CONCURRENCY + 1
    assert set(after) == set(before)  # the same pool processes
    for pid, figures_after in after.items():
        assert figures_after["fds"] - before[pid]["fds"] <= FDS_GROWTH
        assert figures_after["traced"] - before[pid]["traced"] < TRACED_GROWTH
        assert figures_after["connections"] == before[pid]["connections"]


# Security (issue #4, part 4): the sentinel password is never shown.


@pytest.fixture
def sentinel_aliases() -> Iterator[list[str]]:
    """The sentinel aliases, in DATABASES for the test."""
    databases = sentinel_databases()
    for alias, database in databases.items():
        add_alias(alias, database)
    try:
        yield list(databases)
    finally:
        for alias in databases:
            remove_alias(alias)


@pytest.fixture
def everything_logged(caplog) -> Iterator[Any]:
    """caplog at DEBUG for every logger, including those with a level of
    their own (Django's)."""
    caplog.set_level(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        logger = logging.getLogger(name)
        if logger.level:
            caplog.set_level(logging.DEBUG, logger=name)
    yield caplog


def texts_of(exc: BaseException) -> list[str]:
    """str and repr of an exception and of its cause and context chain, and
    the formatted traceback."""
    texts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current), repr(current.args)]
        current = current.__cause__ or current.__context__
    return texts


def log_texts(caplog) -> list[str]:
    texts = []
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(repr(record.args))
        if record.exc_info:
            texts.append("".join(traceback.format_exception(*record.exc_info)))
        texts.append(logging.Formatter().format(record))
    return texts


def test_sentinel_never_shown_in_process(sentinel_aliases, everything_logged, closed):
    """Failing units on the sentinel aliases never show the sentinel."""
    # Decorated, with a retry, with a strategy, by raw signals, at
    # worker_stopping: no log record (any level, any logger), exception text
    # or traceback, nor connection_closed's arguments show it.
    caplog = everything_logged
    exceptions: list[BaseException] = []
    for alias in sentinel_aliases:
        connections[alias].force_debug_cursor = True  # log queries too
        for scope in ({}, {"retry_on_disconnect": 2}, {"strategy": "close_all"}):
            outcome = run_unit(make_server(alias).session_id, **scope)
            error = assert_failed_unchanged(outcome, OperationalError)
            exceptions.append(error)
        task_started.send(sender=None)
        try:
            make_server(alias).session_id()
        except OperationalError as exc:
            exceptions.append(exc)
        task_finished.send(sender=None, failed=True)
        worker_stopping.send(sender=None)
    assert len(exceptions) == 8
    texts = [text for exc in exceptions for text in texts_of(exc)]
    texts += log_texts(caplog) + [repr(closed)]
    joined = "".join(texts)
    assert "Connection refused" in joined and "Can't connect" in joined
    assert not [text for text in texts if SENTINEL in text]


@pytest.fixture
def sentinel_user(private) -> Iterator[str]:
    """An alias of the private instance whose PASSWORD is the sentinel (a
    MariaDB user made for it; PostgreSQL trusts and ignores it)."""
    database = private.instance.database()
    if private.instance.vendor == "mysql":
        user = "task_db_sentinel"
        private.server.query(
            f"CREATE USER IF NOT EXISTS '{user}'@'%%' IDENTIFIED BY %s",
            (SENTINEL_PASSWORD,),
        )
        private.server.query(
            f"ALTER USER '{user}'@'%%' IDENTIFIED BY %s", (SENTINEL_PASSWORD,)
        )
        private.server.query(f"GRANT ALL ON {database['NAME']}.* TO '{user}'@'%%'")
        database.update(
            USER=user, OPTIONS=sentinel_databases()["sentinel_mysql"]["OPTIONS"]
        )
    else:
        database["OPTIONS"] = {
            **database["OPTIONS"],
            **sentinel_databases()["sentinel_postgres"]["OPTIONS"],
        }
    database["PASSWORD"] = SENTINEL_PASSWORD
    add_alias("sentinel_open", database)
    try:
        yield "sentinel_open"
    finally:
        remove_alias("sentinel_open")


def test_sentinel_never_shown_with_an_open_connection(
    private, sentinel_user, everything_logged, closed
):
    """A sentinel-password connection killed, retried, closed: never shown."""
    # The retry's warning quotes the error; the connection is closed on
    # failure and at worker_stopping.
    caplog = everything_logged
    server = make_server(sentinel_user)
    alias = sentinel_user
    connections[alias].force_debug_cursor = True
    calls: list[int] = []

    def killed_once() -> int:
        calls.append(server.session_id())
        if len(calls) == 1:
            private.server.kill(calls[0])
            return server.session_id()  # fails: the connection is gone
        return calls[-1]

    outcome = run_unit(killed_once, retry_on_disconnect=1)
    assert outcome.error is None and len(calls) == 2
    outcome = run_unit(lambda: (server.session_id(), 1 / 0))
    error = assert_failed_unchanged(outcome, ZeroDivisionError)
    task_started.send(sender=None)
    server.session_id()
    worker_stopping.send(sender=None)
    # The retry closed the broken connection ("failure"), the failed unit
    # closed its own, worker_stopping the last.
    assert closed == [(alias, "failure")] * 2 + [(alias, "worker_stopping")]
    assert any("running it again" in r.getMessage() for r in caplog.records)
    texts = texts_of(error) + log_texts(caplog) + [repr(closed)]
    assert not [text for text in texts if SENTINEL in text]


def test_bad_task_db_fails_at_check_without_the_sentinel(sentinel_aliases, settings):
    """A bad TASK_DB fails manage.py check; no message shows the sentinel."""
    settings.TASK_DB = {
        "ALIASES": {
            "sentinel_mysql": "nope",
            "sentinel_postgres": "keep",
            "gone": "keep",
        },
        "HEALTH_CHECKS": "yes",
    }
    pool = {
        **sentinel_databases()["sentinel_postgres"],
        "CONN_MAX_AGE": 0,
        "OPTIONS": {"pool": {"min_size": 1}, "application_name": SENTINEL_OPTION},
    }
    add_alias("sentinel_pool", pool)
    try:
        messages = check_settings(None)
        with pytest.raises(SystemCheckError) as raised:
            # This app's checks only: from Django 6.0 the model checks of
            # other apps connect to each MySQL alias (its data_types depend
            # on the server version), which the sentinel's port refuses.
            call_command("check", "django_task_db")
        settings.TASK_DB = {"ALIASES": {"sentinel_pool": "keep"}}
        messages += check_settings(None)  # W001: the pool without health checks
    finally:
        remove_alias("sentinel_pool")
    assert {m.id for m in messages} == {
        "django_task_db.E003",  # ALIASES: 'nope'
        "django_task_db.E004",  # ALIASES: 'gone', not in DATABASES
        "django_task_db.E005",  # HEALTH_CHECKS: 'yes'
        "django_task_db.W001",  # sentinel_pool: a pool without health checks
    }
    texts = [str(raised.value)] + [f"{m} {m.hint} {m.obj!r}" for m in messages]
    assert "django_task_db.E005" in str(raised.value)
    assert not [text for text in texts if SENTINEL in text]


def test_sentinel_never_shown_by_a_worker(worker):
    """A prefork worker's log and task results never show the sentinel."""
    # Tasks on the sentinel aliases fail, and a task_postrun receiver that
    # uses the alias raises: Celery logs "Signal handler ... raised".
    results = []
    for alias in sentinel_databases():
        for task in (
            fault_tasks.use_alias,
            fault_tasks.use_alias_then_raise_in_postrun,
        ):
            result = worker.send(task, alias)
            with pytest.raises(OperationalError):
                result.get(timeout=TIMEOUT)
            results.append(result)

    def signal_lines() -> list[str]:
        return [line for line in worker.log().splitlines() if "Signal handler" in line]

    assert len(poll(lambda: len(signal_lines()) >= 2 and signal_lines())) >= 2
    assert all("raised" in line for line in signal_lines())
    texts = [worker.log()]
    for result in results:
        texts += [str(result.traceback), repr(result.result)]
        texts += texts_of(result.result)
    assert "Can't connect" in texts[0] and "Connection refused" in texts[0]
    assert not [text for text in texts if SENTINEL in text]
