"""is_disconnect on every code both ways and on errors provoked from the real
servers, and task_scope's opt-in retry."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import MySQLdb
import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connections,
    transaction,
)

from django_task_db import is_disconnect, task_scope
from django_task_db.faults import MYSQL_CODES, POSTGRES_STATES
from tests.servers import MySQLServer, Server
from tests.testapp.models import Item

MYSQL_NOT_DISCONNECT = {
    1062: "Duplicate entry",  # integrity
    1205: "Lock wait timeout exceeded",
    1213: "Deadlock found when trying to get lock",
    1317: "Query execution was interrupted",  # KILL QUERY
    1366: "Incorrect integer value",  # data
    1064: "You have an error in your SQL syntax",
    2002: "Can't connect to local server through socket",
}
POSTGRES_DISCONNECT = {"08000", "08001", "08003", "08004", "08006", "08P01"} | set(
    POSTGRES_STATES
)
POSTGRES_NOT_DISCONNECT = {
    "57014",  # statement timeout / cancel
    "40P01",  # deadlock
    "55P03",  # lock not available
    "23505",  # unique violation
    "22P02",  # invalid text representation
    "42601",  # syntax error
    "3D000",  # invalid catalog name: no such database, at connect
}


def django_wrapped(driver_error: Exception, django_type: type = OperationalError):
    """Wrap a driver's error as Django's DatabaseErrorWrapper does."""
    try:
        try:
            raise driver_error
        except Exception as exc:
            raise django_type(*exc.args) from exc
    except Exception as wrapped:
        return wrapped


def postgres_error(sqlstate: str) -> psycopg.Error:
    return psycopg.errors.lookup(sqlstate)(f"error {sqlstate}")


@pytest.mark.parametrize("code", sorted(MYSQL_CODES))
def test_mysql_disconnect_codes(code):
    """Every listed MySQL/MariaDB code is a disconnect, raw and wrapped."""
    for error in (
        MySQLdb.OperationalError(code, "gone"),
        MySQLdb.InterfaceError(code, ""),
    ):
        assert is_disconnect(error)
        assert is_disconnect(django_wrapped(error))


@pytest.mark.parametrize("code", sorted(MYSQL_NOT_DISCONNECT))
def test_mysql_other_codes(code):
    """Deadlock, lock wait, KILL QUERY, integrity, data and syntax errors are not."""
    error = MySQLdb.OperationalError(code, MYSQL_NOT_DISCONNECT[code])
    assert not is_disconnect(error)
    assert not is_disconnect(django_wrapped(error))
    assert not is_disconnect(
        django_wrapped(MySQLdb.IntegrityError(code, ""), IntegrityError)
    )


def test_mysql_match_codes_not_messages():
    """MariaDB's "Server has gone away" and a misleading text: the code decides."""
    assert is_disconnect(MySQLdb.OperationalError(2006, "Server has gone away"))
    assert not is_disconnect(
        MySQLdb.OperationalError(1205, "MySQL server has gone away")
    )


@pytest.mark.parametrize("sqlstate", sorted(POSTGRES_DISCONNECT))
def test_postgres_disconnect_states(sqlstate):
    """SQLSTATE class 08 and 57P01/02/03/05 are disconnects, raw and wrapped."""
    error = postgres_error(sqlstate)
    assert error.sqlstate == sqlstate
    assert is_disconnect(error)
    assert is_disconnect(django_wrapped(error))


@pytest.mark.parametrize("sqlstate", sorted(POSTGRES_NOT_DISCONNECT))
def test_postgres_other_states(sqlstate):
    """Statement timeout, deadlock, lock, integrity, data errors are not."""
    error = postgres_error(sqlstate)
    assert not is_disconnect(error)
    assert not is_disconnect(django_wrapped(error, DatabaseError))


@pytest.mark.parametrize(
    "message",
    [
        "consuming input failed: server closed the connection unexpectedly",
        "the connection is closed",
        "connection already closed",
    ],
)
def test_postgres_errors_without_sqlstate(message):
    """psycopg's connection errors that have only a text."""
    for error in (psycopg.OperationalError(message), psycopg.InterfaceError(message)):
        assert error.sqlstate is None
        assert is_disconnect(error)
        assert is_disconnect(django_wrapped(error, InterfaceError))
    assert not is_disconnect(psycopg.OperationalError("canceling statement"))


def test_other_exceptions():
    """Errors of no database driver, and Django's own without a cause, are not."""
    assert not is_disconnect(ValueError("the connection is closed"))
    assert not is_disconnect(OperationalError(2006, "gone"))
    assert not is_disconnect(ConnectionResetError())


def provoke(server: Server, sql: str) -> Exception:
    """Run ``sql`` on the alias through Django and return what it raised."""
    try:
        with connections[server.alias].cursor() as cursor:
            cursor.execute(sql)
    except Exception as exc:
        return exc
    raise AssertionError(f"{sql!r} did not fail")


def test_real_disconnects(direct_server):
    """Errors from a real server: killed while idle, then used again."""
    alias = direct_server.alias
    direct_server.kill(direct_server.session_id())
    first = provoke(direct_server, "SELECT 1")
    second = provoke(direct_server, "SELECT 1")
    assert isinstance(first, OperationalError) and is_disconnect(first)
    assert is_disconnect(second)
    connections[alias].close()


def test_real_errors_that_are_not_disconnects(direct_server):
    """Integrity, syntax and timeout errors from a real server are not
    disconnects, and the connection still works after them."""
    alias = direct_server.alias
    Item.objects.using(alias).create(id=1, name="one")
    with pytest.raises(IntegrityError) as integrity:
        Item.objects.using(alias).create(id=1, name="again")
    assert not is_disconnect(integrity.value)
    assert not is_disconnect(provoke(direct_server, "SELEC 1"))
    if isinstance(direct_server, MySQLServer):
        with connections[alias].cursor() as cursor:
            cursor.execute("SET SESSION max_statement_time = 0.05")
        timed_out = provoke(direct_server, "SELECT SLEEP(2)")
        assert timed_out.args[0] == 1969  # max_statement_time exceeded
    else:
        with connections[alias].cursor() as cursor:
            cursor.execute("SET statement_timeout = 50")
        timed_out = provoke(direct_server, "SELECT pg_sleep(2)")
        assert timed_out.__cause__.sqlstate == "57014"
    assert not is_disconnect(timed_out)
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")


def test_real_kill_query_is_not_a_disconnect(mysql):
    """KILL QUERY (1317) interrupts the statement, not the connection."""
    session = mysql.session_id()
    thread_errors: list[Exception] = []

    def run() -> None:
        try:
            thread_errors.append(provoke(mysql, "SELECT SLEEP(5)"))
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    running = poll_running(mysql, "SELECT SLEEP(5)")
    assert running != session
    mysql.query(f"KILL QUERY {int(running)}")
    thread.join(10)
    (error,) = thread_errors
    assert error.args[0] == 1317 or error.__cause__.args[0] == 1317
    assert not is_disconnect(error)


def poll_running(server: Server, sql: str, timeout: float = 10) -> int:
    """The session id running ``sql``, once the server shows it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = server.query(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE INFO = %s", (sql,)
        )
        if rows:
            return int(rows[0][0])
        time.sleep(0.01)
    raise AssertionError(f"{sql!r} never showed up on {server}")


class Attempts:
    """A function that counts its calls and fails as told."""

    def __init__(
        self, server: Server, kill_first: int = 1, error: Exception | None = None
    ):
        self.server = server
        self.kill_first = kill_first
        self.error = error
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        if self.error is not None:
            raise self.error
        if self.calls <= self.kill_first:
            self.server.kill(self.server.session_id())
        return self.server.session_id()


def test_retry_on_disconnect_runs_again(direct_server, settings, caplog):
    """A function that loses its connection is run again, on a new one, with
    one warning per retry."""
    settings.TASK_DB = {"HEALTH_CHECKS": False}
    work = Attempts(direct_server, kill_first=2)
    with caplog.at_level(logging.WARNING, logger="django_task_db"):
        session = task_scope(retry_on_disconnect=2)(work)()
    assert work.calls == 3
    assert session in direct_server.sessions()
    retries = [r for r in caplog.records if "running it again" in r.getMessage()]
    assert len(retries) == 2


def test_retry_gives_up_after_n(direct_server, settings):
    """After N retries the last disconnect error reaches the caller."""
    settings.TASK_DB = {"HEALTH_CHECKS": False}
    work = Attempts(direct_server, kill_first=5)
    with pytest.raises(OperationalError) as raised:
        task_scope(retry_on_disconnect=1)(work)()
    assert is_disconnect(raised.value)
    assert work.calls == 2


def test_no_retry_by_default(direct_server, settings):
    """retry_on_disconnect defaults to 0: one call, the error goes through."""
    settings.TASK_DB = {"HEALTH_CHECKS": False}
    work = Attempts(direct_server, kill_first=1)
    with pytest.raises(OperationalError):
        task_scope(work)()
    assert work.calls == 1


def test_other_errors_are_not_retried(direct_server):
    """Any other exception propagates unchanged at once."""
    error = IntegrityError("duplicate")
    work = Attempts(direct_server, error=error)
    with pytest.raises(IntegrityError) as raised:
        task_scope(retry_on_disconnect=3)(work)()
    assert raised.value is error
    assert work.calls == 1


def test_no_retry_inside_an_atomic_block(direct_server, settings):
    """A scope that starts inside an outer atomic block never retries."""
    settings.TASK_DB = {"HEALTH_CHECKS": False}
    work = Attempts(direct_server, kill_first=1)
    direct_server.session_id()
    with pytest.raises(OperationalError):
        with transaction.atomic(using=direct_server.alias):
            task_scope(retry_on_disconnect=3)(work)()
    assert work.calls == 1


def test_async_retry(direct_server, settings):
    """The async decorator retries the same way."""
    settings.TASK_DB = {"HEALTH_CHECKS": False}
    work = Attempts(direct_server, kill_first=1)

    @task_scope(retry_on_disconnect=1)
    async def run() -> int:
        return await sync_to_async(work, thread_sensitive=True)()

    assert asyncio.run(run()) in direct_server.sessions()
    assert work.calls == 2


def test_bad_retry_value():
    """retry_on_disconnect must be a whole number, 0 or more."""
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match="retry_on_disconnect"):
            task_scope(retry_on_disconnect=bad)


def test_no_retry_inside_an_outer_unit(direct_server, settings):
    """A decorated call inside an outer unit never retries: only the
    outermost scope acts."""
    settings.TASK_DB = {"HEALTH_CHECKS": False}
    work = Attempts(direct_server, kill_first=1)
    with pytest.raises(OperationalError):
        with task_scope():
            task_scope(retry_on_disconnect=3)(work)()
    assert work.calls == 1
