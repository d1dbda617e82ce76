"""django_task_db.testing.check_connections: each kind of leak, against the
real servers (and SQLite where it applies), and clean code."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections, transaction
from django.db.backends.signals import connection_created

from django_task_db import task_scope, tracking
from django_task_db.testing import ConnectionLeak, check_connections
from tests.servers import MySQLServer, Server, Sessions

pytestmark = pytest.mark.task_db_allow_leaks("these tests make leaks on purpose")

HERE = os.path.relpath(__file__)


@pytest.fixture(params=["sqlite", "mysql", "postgres"])
def alias(request: pytest.FixtureRequest) -> str:
    """SQLite, MariaDB and PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite"))
    server: Server = request.getfixturevalue(request.param)
    return server.alias


@pytest.fixture
def app_cleanup_off() -> Iterator[None]:
    """The app's own closing at thread end out of the way, as in a project
    without django_task_db in INSTALLED_APPS."""
    connection_created.disconnect(dispatch_uid="django_task_db.track")
    yield
    connection_created.connect(tracking.track, dispatch_uid="django_task_db.track")


def line_of(text: str) -> int:
    with open(__file__) as file:
        for number, line in enumerate(file, 1):
            if text in line and "line_of" not in line:
                return number
    raise AssertionError(text)


def open_in_thread(alias: str, close: bool = False) -> tuple[Any, int | None]:
    """Run a query in a thread that then ends; return its connection and
    the server's id for its session (None on SQLite)."""
    found: list[Any] = []

    def work() -> None:
        connection = connections[alias]
        with connection.cursor() as cursor:  # opens
            cursor.execute(SESSION_SQL.get(connection.vendor, "SELECT 1"))
            found.append((connection, cursor.fetchone()[0]))
        if close:
            connection.close()

    thread = threading.Thread(target=work, name="leaky-worker")
    thread.start()
    thread.join()
    connection, session = found[0]
    return connection, session if connection.vendor != "sqlite" else None


SESSION_SQL = {
    "mysql": "SELECT CONNECTION_ID()",
    "postgresql": "SELECT pg_backend_pid()",
}


def still_open(alias: str, connection: Any, session: int | None) -> bool:
    """Whether the server (or, for SQLite, this process's file descriptors)
    still has the connection."""
    if session is None:
        path = os.path.realpath(connection.settings_dict["NAME"])
        fds = os.listdir("/proc/self/fd")
        targets = set()
        for fd in fds:
            with contextlib.suppress(OSError):  # closed meanwhile
                targets.add(os.readlink(f"/proc/self/fd/{fd}"))
        return path in targets
    from tests.servers import make_server

    sampler = Sessions(make_server(alias))
    try:
        return session in sampler.all()
    finally:
        sampler.close()


def close_leaked(connection: Any) -> None:
    connection.inc_thread_sharing()
    connection.close()
    connection.dec_thread_sharing()


def test_connection_of_an_ended_thread(alias: str, app_cleanup_off: None) -> None:
    """A thread ends with its connection open: the check names the alias, the
    thread and the line of the test's code that opened it."""
    with pytest.raises(ConnectionLeak) as raised:
        with check_connections():
            connection, session = open_in_thread(alias)
    try:
        assert still_open(alias, connection, session)
        [leak] = raised.value.leaks
        assert (leak.kind, leak.alias, leak.thread) == (
            "ended_thread",
            alias,
            "leaky-worker",
        )
        assert leak.where == f"{HERE}:{line_of('# opens')} in work"
        message = str(raised.value)
        assert f"- alias {alias!r}, thread 'leaky-worker' at {leak.where}: " in message
        assert "still open after its thread ended" in message
    finally:
        close_leaked(connection)
    assert not still_open(alias, connection, session)


def test_thread_that_closes_its_connection(alias: str, app_cleanup_off: None) -> None:
    """A thread that closes its own connection leaves nothing behind."""
    with check_connections():
        connection, session = open_in_thread(alias, close=True)
    assert not still_open(alias, connection, session)


def test_app_closes_at_thread_end(alias: str) -> None:
    """With the app's own cleanup, an ended thread's connection is closed, and
    the check passes."""
    with check_connections():
        connection, session = open_in_thread(alias)
    assert connection.connection is None
    assert not still_open(alias, connection, session)


def test_connection_opened_before_the_check(alias: str, app_cleanup_off: None) -> None:
    """A leak from before the check began is not this block's."""
    connection, session = open_in_thread(alias)
    try:
        with check_connections():
            pass
    finally:
        close_leaked(connection)


def test_atomic_block_left_open(alias: str) -> None:
    """An atomic block entered and never left is a leak of this thread's."""
    block = transaction.atomic(using=alias)
    with pytest.raises(ConnectionLeak) as raised:
        with check_connections():
            block.__enter__()
    block.__exit__(None, None, None)
    [leak] = raised.value.leaks
    assert (leak.kind, leak.alias) == ("transaction", alias)
    assert "inside 1 more atomic block(s) than at the start" in str(leak)


def test_autocommit_left_off(alias: str) -> None:
    """A transaction begun with set_autocommit(False) and left open is a leak."""
    with pytest.raises(ConnectionLeak) as raised:
        with check_connections():
            transaction.set_autocommit(False, using=alias)
            connections[alias].cursor().execute("SELECT 1")
    transaction.rollback(using=alias)
    transaction.set_autocommit(True, using=alias)
    [leak] = raised.value.leaks
    assert (leak.kind, leak.alias) == ("transaction", alias)
    assert "autocommit is off" in leak.detail


def test_caller_atomic_block_is_the_baseline(alias: str) -> None:
    """The atomic blocks open when the check starts (a TestCase's, django_db's)
    are not leaks; blocks begun and ended inside are fine."""
    with transaction.atomic(using=alias):
        with check_connections():
            with transaction.atomic(using=alias):
                connections[alias].cursor().execute("SELECT 1")


def test_transaction_in_a_running_thread(direct_server: Server) -> None:
    """Another thread still inside a transaction at the end is a leak."""
    alias = direct_server.alias
    entered, leave = threading.Event(), threading.Event()

    def work() -> None:
        with transaction.atomic(using=alias):  # opens in atomic
            connections[alias].cursor().execute("SELECT 1")
            entered.set()
            leave.wait(30)
        connections[alias].close()

    thread = threading.Thread(target=work, name="in-atomic")
    with pytest.raises(ConnectionLeak) as raised:
        with check_connections():
            thread.start()
            assert entered.wait(30)
    leave.set()
    thread.join()
    [leak] = raised.value.leaks
    assert (leak.kind, leak.alias, leak.thread) == ("transaction", alias, "in-atomic")
    assert leak.where == f"{HERE}:{line_of('# opens in atomic')} in work"


def running_on_server(server: Server, session: int) -> bool:
    if isinstance(server, MySQLServer):
        rows = server.query(
            "SELECT 1 FROM information_schema.PROCESSLIST WHERE ID = %s "
            "AND INFO LIKE 'SELECT SLEEP%%'",
            (session,),
        )
    else:
        rows = server.query(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'",
            (session,),
        )
    return bool(rows)


def cancel(server: Server, session: int) -> None:
    if isinstance(server, MySQLServer):
        server.query(f"KILL QUERY {int(session)}")
    else:
        server.query("SELECT pg_cancel_backend(%s)", (session,))


def test_query_still_running(direct_server: Server) -> None:
    """A query that another thread is still running at the end is a leak,
    named by the line that started it; the server shows it running."""
    alias = direct_server.alias
    sessions: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        connection = connections[alias]
        sessions.append(direct_server.session_id())
        sleep = "SLEEP(30)" if connection.vendor == "mysql" else "pg_sleep(30)"
        try:
            connection.cursor().execute(f"SELECT {sleep}")  # runs long
        except Exception as exc:  # cancelled below
            errors.append(exc)
        connection.close()

    thread = threading.Thread(target=work, name="slow-query")
    with pytest.raises(ConnectionLeak) as raised:
        with check_connections():
            thread.start()
            deadline = time.monotonic() + 30
            while not (sessions and running_on_server(direct_server, sessions[0])):
                assert time.monotonic() < deadline
                time.sleep(0.02)
    cancel(direct_server, sessions[0])
    thread.join(30)
    assert not thread.is_alive()
    assert errors  # the query did not end by itself
    [leak] = raised.value.leaks
    assert (leak.kind, leak.alias, leak.thread) == (
        "running_query",
        alias,
        "slow-query",
    )
    assert leak.where == f"{HERE}:{line_of('# runs long')} in work"


def test_sqlite_query_still_running(sqlite: str) -> None:
    """The same on SQLite: a long query of another thread, interrupted after
    the check."""
    started = threading.Event()
    holder: list[Any] = []

    def work() -> None:
        connection = connections[sqlite]
        connection.ensure_connection()
        holder.append(connection.connection)
        # Called by SQLite while the query runs.
        connection.connection.set_progress_handler(lambda: started.set() or 0, 1000)
        with contextlib.suppress(Exception):  # interrupted below
            connection.cursor().execute(  # runs for ever
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
                "SELECT count(*) FROM n"
            )
        connection.close()

    thread = threading.Thread(target=work, name="slow-sqlite")
    with pytest.raises(ConnectionLeak) as raised:
        with check_connections():
            thread.start()
            assert started.wait(30)  # the query runs; it would for ever
    holder[0].interrupt()
    thread.join(30)
    assert not thread.is_alive()
    [leak] = raised.value.leaks
    assert (leak.kind, leak.thread) == ("running_query", "slow-sqlite")
    assert leak.where == f"{HERE}:{line_of('# runs for ever')} in work"


def test_clean_code_passes(alias: str) -> None:
    """Threads in task_scope or closing their own connections, finished
    queries, atomic blocks ended and autocommit restored: nothing to report."""

    @task_scope(strategy="close_all")
    def unit() -> None:
        with transaction.atomic(using=alias):
            connections[alias].cursor().execute("SELECT 1")

    def closes() -> None:
        connections[alias].cursor().execute("SELECT 1")
        connections.close_all()

    with check_connections():
        threads = [threading.Thread(target=unit) for _ in range(2)]
        threads.append(threading.Thread(target=closes))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        transaction.set_autocommit(False, using=alias)
        connections[alias].cursor().execute("SELECT 1")
        transaction.commit(using=alias)
        transaction.set_autocommit(True, using=alias)


def test_body_exception_goes_on(alias: str) -> None:
    """The block's own exception is not replaced by a report."""
    block = transaction.atomic(using=alias)
    with pytest.raises(KeyError):
        with check_connections():
            block.__enter__()
            raise KeyError("the body's")
    block.__exit__(None, None, None)
