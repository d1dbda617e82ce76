"""Regression tests: fork safety that touches only what is provably its own,
queries still running at a unit's end, disconnect codes, and the install-time
close of Celery's Django fixup.

Each scenario forks with os.fork() (the child reports through a pipe and
leaves with os._exit, never returning into pytest) or provokes the fault on
the real servers, and checks what the server and the child really saw.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import stat
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
from celery import signals as celery_signals
from celery.exceptions import SoftTimeLimitExceeded
from django.db import OperationalError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from django_task_db import is_disconnect, task_scope
from django_task_db.signals import connection_closed, worker_process_started
from tests.celery_app import REDIS_DB, app, session_id
from tests.private_servers import add_alias, remove_alias
from tests.servers import MySQLServer, Server
from tests.testapp.models import Item
from tests.workers import Worker, sending_app, unique_queue

TIMEOUT = 30

# Celery's Redis result backend still calls a method redis-py deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Call to deprecated setex:DeprecationWarning"
)


# Forking by hand.


def wait_for_exit(pid: int) -> int:
    """waitpid with a deadline: the exit code of child ``pid``, which is
    killed if it does not exit in time."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} hung and was killed")
        time.sleep(0.01)


def read_until_eof(fd: int, timeout: float = TIMEOUT) -> bytes:
    """All that comes through ``fd`` until every writer has closed it."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("the child's report never ended")
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def in_child(body: Callable[[], Any]) -> Any:
    """Run ``body`` in a child made by os.fork(); return what it returned
    (through JSON), or fail with the child's traceback."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(reader)
            try:
                report = {"ok": body()}
            except BaseException:
                report = {"raised": traceback.format_exc()}
            os.write(writer, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    try:
        data = read_until_eof(reader)
    finally:
        os.close(reader)
        code = wait_for_exit(pid)
    assert data, f"the child said nothing (exit code {code})"
    report = json.loads(data)
    assert "raised" not in report, report["raised"]
    assert code == 0
    return report["ok"]


@contextmanager
def recording_logs() -> Iterator[list[logging.LogRecord]]:
    """Every record of the logger "django_task_db", any level, also those
    emitted in a forked child (into the child's copy of the list)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("django_task_db")
    handler = Keep(logging.DEBUG)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# 3a. A dead MariaDB connection whose file descriptor number is reused.


def pipe_ends() -> tuple[int, int, list[int]]:
    reader, writer = os.pipe()
    return reader, writer, [reader, writer]


def socketpair_ends() -> tuple[int, int, list[int]]:
    one, two = socket.socketpair()
    first, second = one.detach(), two.detach()
    return first, second, [first, second]


REUSERS = {"pipe": pipe_ends, "socketpair": socketpair_ends}


@pytest.mark.parametrize("reuser", REUSERS)
def test_fork_spares_a_descriptor_that_reuses_a_dead_connections_number(
    mysql, settings, reuser
):
    """A pipe or socket reusing a dropped MariaDB socket's fd works in a fork."""
    settings.TASK_DB = {"FORK_SAFETY": True}
    session = mysql.session_id()
    raw = connections["mysql"].connection
    stale = raw.fileno()
    mysql.kill(session)
    with pytest.raises(OperationalError) as failed:
        mysql.session_id()
    assert failed.value.args[0] in (2006, 2013)
    # mysqlclient closed the socket, and still answers its old number.
    assert connections["mysql"].connection is raw
    assert raw.fileno() == stale
    assert not os.path.exists(f"/proc/self/fd/{stale}")
    opened: list[int] = []
    try:
        while True:
            parent_end, child_end, fds = REUSERS[reuser]()
            opened += fds
            if stale in fds:
                break
            assert len(opened) < 200, f"fd {stale} was never reused"
        if reuser == "socketpair" and stale == parent_end:
            parent_end, child_end = child_end, parent_end  # the child writes on it
        identity = {fd: os.fstat(fd)[stat.ST_INO] for fd in (parent_end, child_end)}
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                mode = os.fstat(stale).st_mode
                same = all(
                    os.fstat(fd)[stat.ST_INO] == ino for fd, ino in identity.items()
                )
                kind = stat.S_ISFIFO(mode) if reuser == "pipe" else stat.S_ISSOCK(mode)
                os.write(child_end, b"intact" if same and kind else b"clobbered")
                code = 0
            finally:
                os._exit(code)
        os.close(child_end)
        opened.remove(child_end)
        message = read_until_eof(parent_end)
        code = wait_for_exit(pid)
    finally:
        for fd in opened:
            os.close(fd)
    assert message == b"intact"
    assert code == 0


# 3b. FORK_SAFETY False and Celery's worker_process_init.


def test_worker_process_init_keeps_inherited_without_fork_safety(
    direct_server, settings
):
    """FORK_SAFETY off: Celery's worker_process_init leaves the inherited as it was."""
    settings.TASK_DB = {"FORK_SAFETY": False}
    alias = direct_server.alias
    session = direct_server.session_id()
    raw = connections[alias].connection
    fd = raw.fileno()
    inode = os.fstat(fd)[stat.ST_INO]

    def child() -> dict[str, Any]:
        reasons: list[str] = []

        def record(alias: str, reason: str, **kwargs: Any) -> None:
            reasons.append(reason)

        connection_closed.connect(record, weak=False, dispatch_uid="test-3b")
        celery_signals.worker_process_init.send(sender=None)
        try:
            status = os.fstat(fd)
        except OSError as exc:
            descriptor = f"{fd} closed: {exc}"
        else:
            same_socket = stat.S_ISSOCK(status.st_mode) and status.st_ino == inode
            descriptor = "the same socket" if same_socket else "something else"
        return {
            "kept": connections[alias].connection is raw,
            "descriptor": descriptor,
            "closed": reasons,
        }

    seen = in_child(child)
    assert seen == {"kept": True, "descriptor": "the same socket", "closed": []}
    assert connections[alias].connection is raw
    assert direct_server.session_id() == session


# 3c. In-memory SQLite.

MEMORY_NAMES = {
    "memory": ":memory:",
    "shared_cache": "file:memdb_helpe_{}?mode=memory&cache=shared",
}


@pytest.fixture(params=MEMORY_NAMES)
def memory_alias(request: pytest.FixtureRequest) -> Iterator[str]:
    """An extra alias on an in-memory SQLite database, with a table of two
    rows created in this process."""
    alias = f"memdb_{request.param}"
    name = MEMORY_NAMES[request.param].format(uuid.uuid4().hex[:8])
    add_alias(alias, {"ENGINE": "django.db.backends.sqlite3", "NAME": name})
    try:
        with connections[alias].cursor() as cursor:
            cursor.execute("CREATE TABLE kept (x integer)")
            cursor.execute("INSERT INTO kept (x) VALUES (1), (2)")
        yield alias
    finally:
        # Django's close() leaves an in-memory database open: really close it.
        BaseDatabaseWrapper.close(connections[alias])
        remove_alias(alias)


@pytest.mark.parametrize("started", [False, True], ids=["fork", "worker_started"])
def test_in_memory_sqlite_survives_fork(memory_alias, settings, started):
    """A forked child still sees the parent's in-memory SQLite table."""
    settings.TASK_DB = {"FORK_SAFETY": True}

    def child() -> list[int]:
        if started:
            worker_process_started.send(sender=None)
        with task_scope():
            with connections[memory_alias].cursor() as cursor:
                cursor.execute("SELECT x FROM kept ORDER BY x")
                return [row[0] for row in cursor.fetchall()]

    assert in_child(child) == [1, 2]
    with connections[memory_alias].cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM kept")
        assert cursor.fetchone()[0] == 2


# 3d. A child forked inside the parent's atomic block.


def test_child_forked_inside_atomic_block_has_its_own_unit(direct_server, settings):
    """Forked inside an atomic block: the child's unit gets its own session."""
    settings.TASK_DB = {"FORK_SAFETY": True}
    alias = direct_server.alias
    items = Item.objects.using(alias)

    def child() -> dict[str, Any]:
        with task_scope():
            count = items.filter(name="parent's").count()
            session = direct_server.session_id()
        connections.close_all()
        return {"count": count, "session": session}

    with transaction.atomic(using=alias):
        items.create(name="parent's")
        parent = direct_server.session_id()
        seen = in_child(child)
        items.create(name="parent's")
        assert direct_server.session_id() == parent
    assert seen["count"] == 0  # the parent's rows are not committed yet
    assert seen["session"] != parent
    assert direct_server.count_rows() == 2


def test_child_forked_inside_atomic_block_logs_once(direct_server, settings):
    """That child logs once that the transaction is the parent's, and no warning."""
    settings.TASK_DB = {"FORK_SAFETY": True}
    alias = direct_server.alias

    def child() -> dict[str, Any]:
        # The records list is the child's copy: the handler was installed
        # before the fork, so the fork hook's own records are in it.
        error = None
        try:
            with task_scope():
                direct_server.session_id()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            connections.close_all()
        messages = [f"{r.levelname}: {r.getMessage()}" for r in records]
        return {"messages": messages, "error": error}

    with recording_logs() as records:
        with transaction.atomic(using=alias):
            Item.objects.using(alias).create(name="parent's")
            parent = direct_server.session_id()
            seen = in_child(child)
            assert direct_server.session_id() == parent
    messages = seen["messages"]
    assert not [m for m in messages if "would lose the transaction" in m]
    about = [m for m in messages if "transaction" in m.lower() or "atomic" in m.lower()]
    assert len(about) == 1, messages
    assert seen["error"] is None
    assert direct_server.count_rows() == 1


# 4a. A query still running when the unit ends.


class Interrupted(Exception):
    """Raised by a signal handler, as Celery's soft time limit is."""


@contextmanager
def interrupt_after(seconds: float) -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def still_running(server: Server, pid: int, tag: str) -> bool:
    return bool(
        server.query(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active' "
            "AND query LIKE %s",
            (pid, f"%{tag}%"),
        )
    )


def poll(check: Callable[[], Any], timeout: float = 5) -> Any:
    """Call ``check`` until it returns something true, or the deadline."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def can_lock(server: Server, item: int) -> bool:
    try:
        server.query(
            f"SELECT id FROM {Item._meta.db_table} WHERE id = %s FOR UPDATE NOWAIT",
            (item,),
        )
    except Exception as exc:  # psycopg's LockNotAvailable
        if getattr(exc, "sqlstate", None) == "55P03":
            return False
        raise
    return True


STRATEGIES = ["keep", "close_old", "close_all"]


@pytest.mark.parametrize("locked", [False, True], ids=["autocommit", "row_lock"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_interrupted_query_is_cancelled_when_unit_succeeds(
    postgres, settings, strategy, locked
):
    """A unit that catches its query's interruption ends with the query cancelled."""
    settings.TASK_DB = {"STRATEGY": strategy}
    tag = f"helpe_sleep_{uuid.uuid4().hex[:12]}"
    item = Item.objects.using("postgres").create(name="locked").pk
    pid = None
    try:
        with task_scope():
            pid = postgres.session_id()
            if locked:
                transaction.set_autocommit(False, using="postgres")
                with connections["postgres"].cursor() as cursor:
                    cursor.execute(
                        f"SELECT id FROM {Item._meta.db_table} WHERE id = %s "
                        "FOR UPDATE",
                        [item],
                    )
            try:
                with interrupt_after(0.3):
                    with connections["postgres"].cursor() as cursor:
                        cursor.execute(f"SELECT pg_sleep(30) /* {tag} */")
            except Interrupted:
                pass
            else:
                raise AssertionError("pg_sleep was not interrupted")
        cancelled = poll(lambda: not still_running(postgres, pid, tag))
        released = poll(lambda: can_lock(postgres, item)) if locked else None
        with task_scope():
            assert Item.objects.using("postgres").filter(pk=item).exists()
    finally:
        if pid is not None:  # leave no sleeping backend behind
            postgres.query("SELECT pg_terminate_backend(%s)", (pid,))
        with suppress(Exception):
            connections["postgres"].close()
    assert cancelled, f"SELECT pg_sleep(30) still running on {pid} after the unit"
    if locked and strategy != "keep":
        assert released, "the unit's row lock is still held"


# 4a, through a real prefork worker: Celery's soft time limit, caught.

SOFT_TIME_LIMIT = 1.0


@app.task(soft_time_limit=SOFT_TIME_LIMIT, time_limit=120)
def catch_soft_time_limit(alias: str, tag: str) -> int:
    """Sleep in a query until the soft time limit interrupts it, catch
    SoftTimeLimitExceeded and succeed: the server's id of the connection."""
    connection = connections[alias]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = int(cursor.fetchone()[0])
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT pg_sleep(30) /* {tag} */")
    except SoftTimeLimitExceeded:
        return pid
    raise AssertionError("the soft time limit did not interrupt the query")


class ThisModuleWorker(Worker):
    """A prefork worker that also loads this module's task."""

    def command(self) -> list[str]:
        return [*super().command(), "--include", __name__]


@pytest.fixture
def cancel_worker(redis_url, tmp_path) -> Iterator[Worker]:
    with sending_app(redis_url, unique_queue("helpe_cancel")) as sender:
        worker = ThisModuleWorker(
            sender, sender.conf.task_default_queue, tmp_path / "worker.log", {}, 1
        )
        worker.start()
        try:
            yield worker
        finally:
            outcome = worker.stop()
    assert not outcome["killed"], (outcome, worker.log()[-20000:])


def test_soft_time_limit_caught_in_prefork_task_cancels_query(postgres, cancel_worker):
    """A prefork task that catches SoftTimeLimitExceeded leaves no query running."""
    tag = f"helpe_soft_{uuid.uuid4().hex[:12]}"
    pid = None
    try:
        pid = cancel_worker.run(catch_soft_time_limit, "postgres", tag, timeout=60)
        cancelled = poll(lambda: not still_running(postgres, pid, tag))
        next_session = cancel_worker.run(session_id, "postgres", timeout=60)
    finally:
        if pid is not None:
            postgres.query("SELECT pg_terminate_backend(%s)", (pid,))
    assert cancelled, f"SELECT pg_sleep(30) still running on {pid} after the task"
    assert isinstance(next_session, int)


# 4b. The idle-in-transaction timeouts.


def idle_in_transaction_error(server: Server) -> Exception:
    """The error of the first query after the server's idle-in-transaction
    timeout ended the session."""
    alias = server.alias
    with connections[alias].cursor() as cursor:
        if isinstance(server, MySQLServer):
            cursor.execute("SET SESSION idle_transaction_timeout = 1")
            pause = 2.5
        else:
            cursor.execute("SET idle_in_transaction_session_timeout = '200ms'")
            pause = 1.0
    session = server.session_id()
    try:
        with transaction.atomic(using=alias):
            # MariaDB starts the transaction at the first table it reads.
            Item.objects.using(alias).count()
            time.sleep(pause)
            server.wait_until_gone(session)
            Item.objects.using(alias).count()
    except Exception as exc:
        return exc
    finally:
        connections[alias].close()
    raise AssertionError("the idle-in-transaction timeout did not end the session")


def test_idle_in_transaction_timeout_is_a_disconnect(direct_server):
    """A session ended by its idle-in-transaction timeout (25P03) is a disconnect."""
    error = idle_in_transaction_error(direct_server)
    if isinstance(direct_server, MySQLServer):
        assert error.args[0] in (2006, 2013, 4031)
    else:
        assert error.__cause__.sqlstate == "25P03"
    assert is_disconnect(error)
    assert is_disconnect(error.__cause__)


# 5. The Celery fixup's close at worker start.


@contextmanager
def forget_queue(redis_url: str, queue: str) -> Iterator[None]:
    """Delete what ``queue`` leaves in Redis once the test is done."""
    import redis

    try:
        yield
    finally:
        client = redis.Redis.from_url(f"{redis_url}/{REDIS_DB}")
        client.delete(
            queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"
        )
        client.close()


def test_in_process_worker_started_inside_atomic_block(
    direct_server, redis_url, settings
):
    """start_worker() inside an atomic block leaves its connection and rows alone."""
    from celery.contrib.testing.worker import start_worker

    settings.TASK_DB = {}
    alias = direct_server.alias
    items = Item.objects.using(alias)
    queue = unique_queue("helpe_atomic")
    with sending_app(redis_url, queue, REDIS_DB), forget_queue(redis_url, queue):
        with transaction.atomic(using=alias):
            items.create(name="before")
            session = direct_server.session_id()
            with start_worker(
                app,
                pool="solo",
                perform_ping_check=False,
                queues=[queue],
                shutdown_timeout=TIMEOUT,
            ):
                items.create(name="while")
                during = direct_server.session_id()
            items.create(name="after")
            assert direct_server.session_id() == session
    assert during == session
    assert direct_server.count_rows() == 3
