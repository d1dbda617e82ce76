"""Thread pools: 8 threads x 200 units of work, as the database server sees them."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import connections
from django.db.backends.signals import connection_created

from django_task_db import strategies, task_scope
from django_task_db.signals import connection_closed, worker_stopping
from tests.servers import Server, Sessions, in_every_thread
from tests.testapp.models import Item

THREADS = 8
UNITS = 200
TIMEOUT = 60


@pytest.fixture
def sessions(direct_server: Server) -> Iterator[Sessions]:
    sampler = Sessions(direct_server)
    yield sampler
    sampler.close()


@contextmanager
def receiver(signal: Any, func: Callable[..., None]) -> Iterator[None]:
    signal.connect(func, weak=False, dispatch_uid=id(func))
    try:
        yield
    finally:
        signal.disconnect(dispatch_uid=id(func))


def run_units(
    executor: ThreadPoolExecutor,
    unit: Callable[[], None],
    sample: Callable[[], int] | None = None,
) -> int:
    """Run THREADS x UNITS units; while they run, sample from this thread and
    return the highest sample."""
    futures = [executor.submit(unit) for _ in range(THREADS * UNITS)]
    peak = 0
    if sample is not None:
        deadline = time.monotonic() + TIMEOUT
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            peak = max(peak, sample())
    for future in futures:
        future.result(timeout=TIMEOUT)
    return peak


def close_in_this_thread() -> None:
    with task_scope(strategy="close_all"):
        pass


def test_close_all_in_a_thread_pool(direct_server, sessions):
    """close_all, 8x200 units: <= 8 sessions at once, closed by opener, none left."""
    alias = direct_server.alias
    opener: dict[int, int] = {}  # id() of a driver connection -> opening thread
    closings: list[tuple[int | None, int]] = []  # (opening thread, closing thread)
    signalled: list[tuple[str, int]] = []  # (reason, thread) of connection_closed
    used: set[int] = set()

    def on_created(connection, **kwargs):
        if connection.alias == alias:
            opener[id(connection.connection)] = threading.get_ident()

    def on_closed(alias, reason, **kwargs):
        if alias == direct_server.alias:
            signalled.append((reason, threading.get_ident()))

    def recording_close_all(connection, phase):
        if connection.alias == alias:
            closings.append(
                (opener.get(id(connection.connection)), threading.get_ident())
            )
        strategies.close_all(connection, phase)

    def unit():
        with task_scope(strategy=recording_close_all):
            Item.objects.using(alias).exists()
            used.add(direct_server.session_id())

    with (
        receiver(connection_created, on_created),
        receiver(connection_closed, on_closed),
    ):
        with ThreadPoolExecutor(THREADS) as executor:
            peak = run_units(executor, unit, lambda: len(sessions.own()))

    assert peak <= THREADS
    assert len(used) == THREADS * UNITS
    assert all(opened == closed for opened, closed in closings)
    assert len(closings) == THREADS * UNITS
    assert all(reason == "recording_close_all" for reason, _ in signalled)
    assert Counter(t for _, t in signalled) == Counter(t for _, t in closings)
    assert len({t for _, t in closings}) <= THREADS
    assert sessions.wait_for_own(0) == set()
    assert sessions.wait_until_gone(used) == set()


@pytest.mark.parametrize("ending", ["close_all_scope", "worker_stopping"])
def test_close_old_in_a_thread_pool(direct_server, sessions, settings, ending):
    """close_old, 8x200 units: <= 8 sessions in all; ending a thread closes its own."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    alias = direct_server.alias
    assert connections[alias].settings_dict["CONN_MAX_AGE"] is None
    used: set[int] = set()

    def unit():
        with task_scope():
            Item.objects.using(alias).exists()
            used.add(direct_server.session_id())

    lock = threading.Lock()

    def stop():
        # One thread at a time, so that each sees the server drop exactly its
        # own session (worker_stopping in several threads at once: see
        # test_worker_stopping_in_every_thread_at_once).
        with lock:
            mine = direct_server.session_id()
            before = sessions.own()
            if ending == "worker_stopping":
                worker_stopping.send(sender=None)
            else:
                close_in_this_thread()
            gone = sessions.wait_until_gone({mine}) == set()
            return mine, before, gone, sessions.own()

    with ThreadPoolExecutor(THREADS) as executor:
        peak = run_units(executor, unit, lambda: len(sessions.own()))
        assert 1 <= len(used) <= THREADS
        assert 1 <= peak <= THREADS
        assert sessions.own() == used
        stopped = in_every_thread(executor, stop)

    for mine, before, gone, after in stopped:
        assert gone
        assert after == before - {mine}
    assert used <= {mine for mine, *_ in stopped}
    assert sessions.wait_for_own(0) == set()
    assert sessions.wait_until_gone(used) == set()


def test_worker_stopping_in_every_thread_at_once(pgpool):
    """worker_stopping in 8 threads at once, Django's pool open, raises nothing."""
    errors: list[BaseException] = []

    def stop():
        try:
            worker_stopping.send(sender=None)
        except Exception as exc:
            errors.append(exc)

    pools = []
    try:
        for _ in range(3):
            pgpool.session_id()  # opens the pool
            pools.append(connections["pgpool"].pool)
            connections["pgpool"].close()  # back to the pool, which stays open
            with ThreadPoolExecutor(THREADS) as executor:
                in_every_thread(executor, stop)
    finally:
        connections["pgpool"].close_pool()
    assert errors == []
    assert all(pool.closed for pool in pools)


@pytest.mark.parametrize("strategy", ["close_old", "close_all"])
def test_sqlite_in_a_thread_pool(sqlite, settings, strategy):
    """SQLite, 8x200 units: <= 8 connections (close_old), 1600 (close_all), closed."""
    settings.TASK_DB = {"STRATEGY": strategy}
    created: list[int] = []
    closed: list[int] = []

    def on_created(connection, **kwargs):
        if connection.alias == sqlite:
            created.append(threading.get_ident())

    def on_closed(alias, reason, **kwargs):
        if alias == sqlite:
            closed.append(threading.get_ident())

    def unit():
        with task_scope():
            Item.objects.using(sqlite).count()

    with (
        receiver(connection_created, on_created),
        receiver(connection_closed, on_closed),
    ):
        with ThreadPoolExecutor(THREADS) as executor:
            run_units(executor, unit)
            opened = len(created)
            in_every_thread(executor, close_in_this_thread)

    if strategy == "close_old":
        assert 1 <= opened <= THREADS
    else:
        assert opened == THREADS * UNITS
    assert len(created) == opened
    assert Counter(closed) == Counter(created)
