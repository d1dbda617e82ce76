"""Fork safety: a forked child never disturbs the connections of its parent.

Each test forks a child that does what a careless worker does with the
connections it inherited, then checks, on the server, that the parent's
session is still the one it had and still answers. The same scenarios with
TASK_DB["FORK_SAFETY"] off show that the child really could break them.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.db import OperationalError, connections

from django_task_db import task_scope
from django_task_db.signals import (
    connection_closed,
    task_started,
    worker_process_started,
    worker_stopping,
)
from tests.servers import Server, Sessions
from tests.testapp.models import Item

TIMEOUT = 30


def _child_main(writer: Any, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        writer.send(("ok", target(*args)))
    except BaseException:
        writer.send(("raised", traceback.format_exc()))
        raise SystemExit(1) from None


def run_child(target: Callable[..., Any], *args: Any) -> Any:
    """Run ``target(*args)`` in a child forked with multiprocessing, and return
    what it returned; fail if it raised, crashed or hung (a hung child is
    killed: no orphans)."""
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(
        target=_child_main, args=(writer, target, args), daemon=True
    )
    process.start()
    writer.close()
    try:
        report = reader.recv() if reader.poll(TIMEOUT) else ("hung", None)
    except EOFError:
        report = ("died without a word", None)
    finally:
        reader.close()
        process.join(TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join(5)
    status, value = report
    assert status == "ok", value
    assert process.exitcode == 0
    return value


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


def assert_parent_intact(server: Server, session: int) -> None:
    """The parent's connection still runs on ``session``, and it answers."""
    assert connections[server.alias].connection is not None
    assert server.session_id() == session
    Item.objects.using(server.alias).exists()
    assert session in server.sessions()


def assert_parent_broken(server: Server, session: int) -> None:
    """The child ended the parent's session: the server dropped it and the
    parent's next query fails."""
    server.wait_until_gone(session)
    with pytest.raises(OperationalError):
        server.session_id()


# What careless children do. They run in the child, after the fork.


def close_all() -> None:
    connections.close_all()


def drop_and_collect() -> None:
    for alias in django_settings.DATABASES:
        with suppress(AttributeError):  # never used in this thread
            del connections[alias]
    gc.collect()


def query_and_leave(server: Server) -> int:
    """Query through the alias and exit without closing anything."""
    Item.objects.using(server.alias).exists()
    return server.session_id()


CARELESS = {"close_all": close_all, "drop_and_collect": drop_and_collect}


@pytest.mark.parametrize("careless", CARELESS)
def test_careless_child_leaves_parent_session(direct_server, settings, careless):
    """A child closing or collecting what it inherited spares the parent's session."""
    settings.TASK_DB = {"FORK_SAFETY": True}
    session = direct_server.session_id()
    run_child(CARELESS[careless])
    assert_parent_intact(direct_server, session)


def test_child_close_all_breaks_parent_without_fork_safety(direct_server, settings):
    """With FORK_SAFETY off, the child's close_all() ends the parent's session."""
    settings.TASK_DB = {"FORK_SAFETY": False}
    session = direct_server.session_id()
    run_child(close_all)
    assert_parent_broken(direct_server, session)


def test_child_gc_breaks_parent_without_fork_safety(mysql, settings):
    """With FORK_SAFETY off, MySQLdb's finalizer in the child ends the parent's."""
    # psycopg's finalizer checks the pid and says nothing: MariaDB only.
    settings.TASK_DB = {"FORK_SAFETY": False}
    session = mysql.session_id()
    run_child(drop_and_collect)
    assert_parent_broken(mysql, session)


def test_child_queries_get_a_session_of_their_own(direct_server, settings):
    """A child that queries gets a new server session; the parent keeps its own."""
    settings.TASK_DB = {"FORK_SAFETY": True}
    session = direct_server.session_id()
    child_session = run_child(query_and_leave, direct_server)
    assert child_session != session
    direct_server.wait_until_gone(child_session)  # closed by the child's exit
    assert_parent_intact(direct_server, session)


def test_child_shares_parent_session_without_fork_safety(direct_server, settings):
    """With FORK_SAFETY off, the child's queries run on the parent's session."""
    settings.TASK_DB = {"FORK_SAFETY": False}
    session = direct_server.session_id()
    assert run_child(query_and_leave, direct_server) == session


def test_raw_os_fork_child_closes_all(direct_server, settings):
    """An os.fork() child that closes all, then os._exit()s, spares the parent."""
    settings.TASK_DB = {"FORK_SAFETY": True}
    session = direct_server.session_id()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            connections.close_all()
            code = 0 if connections[direct_server.alias].connection is None else 2
        finally:
            os._exit(code)
    assert wait_for_exit(pid) == 0
    assert_parent_intact(direct_server, session)


# Django's connection pool.


@pytest.fixture
def pool_server(pgpool: Server) -> Any:
    """pgpool, with the pool closed before and after the test."""
    connections["pgpool"].close_pool()
    yield pgpool
    with suppress(Exception):  # a broken connection going back to its pool
        connections["pgpool"].close()
    connections["pgpool"].close_pool()


def check_out_together(server: Server, count: int) -> list[int]:
    """Check out ``count`` connections of the pool at once, one per thread,
    query on each, and return them; the server session ids."""
    barrier = threading.Barrier(count)
    ids: list[int] = []
    errors: list[BaseException] = []

    def use() -> None:
        try:
            with task_scope(strategy="close_all"):
                ids.append(server.session_id())
                barrier.wait(timeout=TIMEOUT)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    return ids


def careless_pool_child(server: Server, pool: Any, query: bool) -> int | None:
    """Optionally query through pgpool, then close everything in sight: all
    connections, the alias's pool, the inherited pool object itself; then
    drop the connections and collect."""
    session = server.session_id() if query else None
    connections.close_all()
    connections[server.alias].close_pool()
    pool.close()
    drop_and_collect()
    return session


def fill_pool(server: Server) -> tuple[int, set[int], Any]:
    """Grow the pool to its max_size (4), check one connection out in this
    thread: return its session id, the idle ones' and the pool."""
    every = check_out_together(server, 4)
    assert len(set(every)) == 4
    checked_out = server.session_id()
    idle = set(every) - {checked_out}
    assert len(idle) == 3
    pool = connections[server.alias].pool
    assert len(pool._pool) == 3  # idle, in psycopg_pool's deque
    assert set(every) <= server.sessions()
    return checked_out, idle, pool


def test_pool_survives_careless_child(pool_server, settings):
    """After a careless child, the parent's checked-out and idle pooled ones work."""
    settings.TASK_DB = {"FORK_SAFETY": True}
    checked_out, idle, pool = fill_pool(pool_server)
    sessions = Sessions(pool_server)
    try:
        assert sessions.own() == idle | {checked_out}  # this process's, on the server
        child_session = run_child(careless_pool_child, pool_server, pool, True)
        assert child_session not in idle | {checked_out}
        assert pool_server.session_id() == checked_out
        assert set(check_out_together(pool_server, 3)) == idle
        assert connections["pgpool"].pool is pool
        assert not pool.closed
        assert sessions.own() == idle | {checked_out}
        pool_server.wait_until_gone(child_session)
    finally:
        sessions.close()


def test_pool_broken_by_careless_child_without_fork_safety(pool_server, settings):
    """With FORK_SAFETY off, the same child ends every pooled session of the parent."""
    settings.TASK_DB = {"FORK_SAFETY": False}
    checked_out, idle, pool = fill_pool(pool_server)
    run_child(careless_pool_child, pool_server, pool, False)
    for session in idle | {checked_out}:
        pool_server.wait_until_gone(session)
    with pytest.raises(OperationalError):
        pool_server.session_id()


# The worker signals.


def start_worker_carelessly(server: Server) -> tuple[list[str], int]:
    """Send worker_process_started, then close all, collect, and query."""
    reasons: list[str] = []

    def record(alias: str, reason: str, **kwargs: Any) -> None:
        reasons.append(reason)

    connection_closed.connect(record, weak=False)
    worker_process_started.send(sender=None)
    connections.close_all()
    drop_and_collect()
    return reasons, server.session_id()


def test_worker_process_started_discards_inherited_without_fork_safety(
    direct_server, settings
):
    """With the hook off, worker_process_started in a child discards the inherited."""
    settings.TASK_DB = {"FORK_SAFETY": False}
    session = direct_server.session_id()
    reasons, child_session = run_child(start_worker_carelessly, direct_server)
    assert reasons == ["inherited"]
    assert child_session != session
    assert_parent_intact(direct_server, session)


def test_worker_process_started_in_the_parent_is_a_noop(direct_server, closed):
    """worker_process_started sent in the parent discards none of its connections."""
    session = direct_server.session_id()
    worker_process_started.send(sender=None)
    assert closed == []
    assert_parent_intact(direct_server, session)


def stop_worker_in_child(server: Server) -> int:
    """worker_stopping (dropping what was inherited), a query on a session of
    the child's own, worker_stopping again: that session must be gone."""
    worker_stopping.send(sender=None)
    session = server.session_id()
    worker_stopping.send(sender=None)
    assert connections[server.alias].connection is None
    server.wait_until_gone(session)
    return session


@pytest.mark.parametrize("fork_safety", [True, False])
def test_worker_stopping_in_child_closes_only_its_own(
    direct_server, settings, fork_safety
):
    """worker_stopping in a forked child closes its sessions, not the parent's."""
    settings.TASK_DB = {"FORK_SAFETY": fork_safety}
    session = direct_server.session_id()
    child_session = run_child(stop_worker_in_child, direct_server)
    assert child_session != session
    assert_parent_intact(direct_server, session)


def scopes_act_in_child() -> int:
    """Count the task_started a scope of the child sends."""
    sent: list[object] = []
    task_started.connect(lambda **kw: sent.append(kw), weak=False, dispatch_uid="c")
    with task_scope():
        pass
    return len(sent)


def test_fork_inside_a_unit_child_scopes_act(sqlite):
    """A child forked inside a unit is not inside it: its own scopes act."""
    with task_scope():
        assert run_child(scopes_act_in_child) == 1


def nothing() -> None:
    """A child that does nothing at all, and exits."""


@pytest.mark.parametrize("in_child", [nothing, gc.collect])
def test_other_threads_connection_survives_fork(direct_server, in_child):
    """A connection that only another thread of the parent refers to is
    garbage in the child, where that thread is gone; collecting it there must
    not let the driver say goodbye: the parent's thread keeps its session."""
    opened, forked, done = threading.Event(), threading.Event(), threading.Event()
    sessions: list[int] = []

    def worker() -> None:
        sessions.append(direct_server.session_id())
        opened.set()
        forked.wait(TIMEOUT)
        sessions.append(direct_server.session_id())
        connections[direct_server.alias].close()
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert opened.wait(TIMEOUT)
        run_child(in_child)
    finally:
        forked.set()
        thread.join(TIMEOUT)
    assert done.is_set()
    assert sessions[0] == sessions[1]
