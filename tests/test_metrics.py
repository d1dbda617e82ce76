"""metrics.snapshot(): exact counts after known sequences of units, checked
against what the servers saw (their session ids and counts)."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress

import pytest
from django.db import connections, transaction

from django_task_db import metrics, task_scope, tracking
from django_task_db.signals import task_finished, task_started, worker_stopping
from tests.servers import Server, Sessions, idle_past_health_check
from tests.test_fork_and_cancel import (
    Interrupted,
    in_child,
    interrupt_after,
    poll,
    still_running,
)
from tests.testapp.models import Item


@pytest.fixture
def sessions(direct_server: Server) -> Iterator[Sessions]:
    sampler = Sessions(direct_server)
    yield sampler
    sampler.close()


def zero() -> metrics.Metrics:
    return metrics.Metrics(
        opened=0,
        reused=0,
        replaced=0,
        closed={},
        units=0,
        failed_units=0,
        skipped=0,
        cancelled=0,
        aliases={},
    )


def test_known_sequence_of_units(direct_server, settings, sessions, closed):
    """Eight units and a worker stop: exact counts; one open per server session
    seen, one close per connection_closed, no session left."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    alias = direct_server.alias
    seen: list[int] = []

    def unit(fail: bool = False, **kwargs: str) -> None:
        with task_scope(**kwargs):
            seen.append(direct_server.session_id())
            if fail:
                raise ValueError("the unit fails")

    before = metrics.snapshot()
    unit()  # opens the connection
    unit()  # reuses it
    with pytest.raises(ValueError):
        unit(fail=True)  # reuses it, then closes it: failure
    unit()  # opens another
    unit(strategy="close_all")  # closes it at start, opens one, closes it at end
    with transaction.atomic(using=alias):
        seen.append(direct_server.session_id())  # opens another
        unit()  # left alone at start and at end: 2 skips
    unit()  # reuses it
    task_started.send(sender=None)  # a runner's own unit: reuses it
    task_finished.send(sender=None, failed=True)  # and closes it: failure
    worker_stopping.send(sender=None)  # nothing left to close
    delta = metrics.snapshot() - before

    assert delta.opened == 4 == len(set(seen))
    assert delta.reused == 4
    assert delta.closed == {"close_all": 2, "failure": 2}
    assert delta.units == 8
    assert delta.failed_units == 2
    assert delta.skipped == 2
    assert delta.replaced == 0
    assert delta.cancelled == 0
    assert delta.aliases == {
        alias: metrics.AliasMetrics(
            opened=4, closed={"close_all": 2, "failure": 2}, replaced=0, cancelled=0
        )
    }
    assert Counter(reason for a, reason in closed if a == alias) == delta.closed
    assert sessions.wait_for_own(0) == set()
    assert sessions.wait_until_gone(set(seen)) == set()


def test_worker_stopping_counts_its_closes_and_skips(direct_server, sessions):
    """worker_stopping closes an open connection ("worker_stopping") and skips
    one in an atomic block."""
    alias = direct_server.alias
    before = metrics.snapshot()
    with task_scope():
        first = direct_server.session_id()
    worker_stopping.send(sender=None)
    assert sessions.wait_until_gone({first}) == set()
    with transaction.atomic(using=alias):
        second = direct_server.session_id()
        worker_stopping.send(sender=None)
        assert sessions.own() == {second}
    delta = metrics.snapshot() - before

    assert delta.opened == 2
    assert delta.closed == {"worker_stopping": 1}
    assert delta.skipped == 1
    assert delta.units == 1


@pytest.mark.parametrize("idle", [None, 0], ids=["idle_default", "idle_0"])
def test_replaced_by_a_health_check(direct_server, sessions, settings, idle):
    """A connection killed between units is replaced at the next unit's first
    query: one more open, a new server session, and no reuse. With
    HEALTH_CHECK_IDLE 0 Django's own ping replaces it, unseen by the package:
    no replacement counted, but no reuse either."""
    if idle is not None:
        settings.TASK_DB = {"HEALTH_CHECK_IDLE": idle}
    before = metrics.snapshot()
    with task_scope():
        first = direct_server.session_id()
    direct_server.kill(first)
    idle_past_health_check()
    with task_scope():
        second = direct_server.session_id()
    delta = metrics.snapshot() - before

    assert second != first
    assert sessions.own() == {second}
    assert delta.opened == 2
    assert delta.reused == 0  # the dead one was found open, then replaced
    replaced = 1 if idle is None else 0
    assert delta.replaced == replaced
    assert delta.closed == ({"health_check": 1} if replaced else {})
    assert delta.aliases[direct_server.alias].replaced == replaced
    assert delta.units == 2
    assert delta.failed_units == 0


def test_cancelled_query(postgres, settings):
    """A query still running at the end of a unit that succeeded is cancelled
    on the server and counted, with its connection's close
    ("query_running"): the unit did not fail."""
    settings.TASK_DB = {"STRATEGY": "keep"}
    tag = f"metrics_sleep_{uuid.uuid4().hex[:12]}"
    pid = None
    before = metrics.snapshot()
    try:
        with task_scope():
            pid = postgres.session_id()
            with suppress(Interrupted):
                with interrupt_after(0.3):
                    with connections["postgres"].cursor() as cursor:
                        cursor.execute(f"SELECT pg_sleep(30) /* {tag} */")
        delta = metrics.snapshot() - before
        stopped = poll(lambda: not still_running(postgres, pid, tag))
    finally:
        if pid is not None:  # leave no sleeping backend behind
            postgres.query("SELECT pg_terminate_backend(%s)", (pid,))
    assert stopped
    assert delta.cancelled == 1
    assert delta.aliases["postgres"].cancelled == 1
    assert delta.closed == {"query_running": 1}
    assert delta.failed_units == 0  # the unit caught the interruption


THREADS = 8


def test_threads_on_a_server(direct_server, sessions):
    """8 threads x 25 units: 8 opens, one per server session; each thread's
    connection closed when the thread ends ("thread_ended")."""
    alias = direct_server.alias
    seen: set[int] = set()

    def units() -> None:
        for _ in range(25):
            with task_scope():
                seen.add(direct_server.session_id())

    before = metrics.snapshot()
    with ThreadPoolExecutor(THREADS) as executor:
        for future in [executor.submit(units) for _ in range(THREADS)]:
            future.result(timeout=60)
    assert sessions.wait_for_own(0) == set()
    delta = poll(lambda: ended(metrics.snapshot() - before, THREADS, alias))

    assert delta, metrics.snapshot() - before
    assert len(seen) <= THREADS
    assert delta.opened == len(seen)
    assert delta.units == THREADS * 25
    assert delta.reused == THREADS * 25 - len(seen)
    assert delta.closed == {"thread_ended": len(seen)}


def ended(delta: metrics.Metrics, threads: int, alias: str) -> metrics.Metrics | None:
    """``delta`` once every connection the threads opened is closed."""
    counts = delta.aliases.get(alias)
    if counts is None or sum(counts.closed.values()) < counts.opened:
        return None
    return delta


@pytest.fixture
def switching() -> Iterator[None]:
    """Threads switch as often as CPython lets them."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


UNITS = 500


def test_counts_are_exact_across_threads(sqlite, settings, switching):
    """8 threads x 500 units at once, every 10th failing, then 100 short-lived
    threads of one unit each: no count is lost, and the counts of threads
    that ended stay."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    barrier = threading.Barrier(THREADS)

    def units() -> None:
        barrier.wait(timeout=30)
        for number in range(UNITS):
            with suppress(ValueError):
                with task_scope():
                    Item.objects.using(sqlite).exists()
                    if number % 10 == 5:
                        raise ValueError("the unit fails")

    def one_unit() -> None:
        with task_scope():
            pass

    before = metrics.snapshot()
    with ThreadPoolExecutor(THREADS) as executor:
        for future in [executor.submit(units) for _ in range(THREADS)]:
            future.result(timeout=120)
    for _ in range(100):
        thread = threading.Thread(target=one_unit)
        thread.start()
        thread.join(timeout=30)
    delta = poll(lambda: ended(metrics.snapshot() - before, THREADS, sqlite))

    assert delta, metrics.snapshot() - before
    failures = THREADS * UNITS // 10
    opens = THREADS + failures  # a thread's first unit, and each after a failure
    assert delta.units == THREADS * UNITS + 100
    assert delta.failed_units == failures
    assert delta.opened == opens
    assert delta.reused == THREADS * UNITS - opens
    assert delta.closed == {"failure": failures, "thread_ended": THREADS}


def test_async_units(sqlite):
    """Async units count in the thread of Django's connections: 3 units, 1
    open, 2 reuses."""

    async def main() -> None:
        for _ in range(3):
            async with task_scope():
                await Item.objects.using(sqlite).aexists()

    before = metrics.snapshot()
    asyncio.run(main())
    delta = metrics.snapshot() - before
    assert (delta.units, delta.opened, delta.reused) == (3, 1, 2)


def test_forked_child_starts_from_zero(direct_server):
    """A forked child counts its own: the inherited connection's discard and
    its own units; the parent's counts are not the child's."""
    with task_scope():
        parent = direct_server.session_id()
    before = metrics.snapshot()
    assert before.units > 0

    def child() -> dict[str, object]:
        start = metrics.snapshot()
        with task_scope():
            session = direct_server.session_id()
        with task_scope():
            direct_server.session_id()
        now = metrics.snapshot()
        return {
            "start": [start.units, start.opened, dict(start.closed)],
            "now": [now.units, now.opened, now.reused, dict(now.closed)],
            "session": session,
        }

    report = in_child(child)
    assert report["start"] == [0, 0, {"inherited": 1}]
    assert report["now"] == [2, 1, 1, {"inherited": 1}]
    assert report["session"] != parent
    assert direct_server.session_id() == parent
    assert metrics.snapshot() - before == zero()


def test_debug_line_for_each_close(direct_server, caplog):
    """Each close is logged at DEBUG with its alias and reason, nothing more."""
    alias = direct_server.alias
    with caplog.at_level(logging.DEBUG, logger="django_task_db"):
        with task_scope(strategy="close_all"):
            direct_server.session_id()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert lines == [f"Database connection {alias!r} closed: close_all."]


def test_connections_tracked_again_are_not_counted_again(direct_server):
    """The app's ready() tracks what is already open: nothing opened twice."""
    with task_scope():
        direct_server.session_id()
    before = metrics.snapshot()
    tracking.track_open_connections()
    assert metrics.snapshot() - before == zero()


def test_a_delta_names_what_changed():
    """later - earlier subtracts every count, per alias and reason too, and
    leaves out what did not change."""
    earlier = metrics.Metrics(
        opened=1,
        reused=2,
        replaced=0,
        closed={"failure": 1},
        units=3,
        failed_units=1,
        skipped=0,
        cancelled=0,
        aliases={
            "default": metrics.AliasMetrics(
                opened=1, closed={"failure": 1}, replaced=0, cancelled=0
            )
        },
    )
    later = metrics.Metrics(
        opened=3,
        reused=5,
        replaced=1,
        closed={"failure": 1, "health_check": 1},
        units=6,
        failed_units=1,
        skipped=2,
        cancelled=1,
        aliases={
            "default": metrics.AliasMetrics(
                opened=2, closed={"failure": 1}, replaced=0, cancelled=0
            ),
            "replica": metrics.AliasMetrics(
                opened=1, closed={"health_check": 1}, replaced=1, cancelled=1
            ),
        },
    )
    assert later - earlier == metrics.Metrics(
        opened=2,
        reused=3,
        replaced=1,
        closed={"health_check": 1},
        units=3,
        failed_units=0,
        skipped=2,
        cancelled=1,
        aliases={
            "default": metrics.AliasMetrics(
                opened=1, closed={}, replaced=0, cancelled=0
            ),
            "replica": metrics.AliasMetrics(
                opened=1, closed={"health_check": 1}, replaced=1, cancelled=1
            ),
        },
    )


def test_a_delta_keeps_what_only_the_earlier_has():
    """An alias or reason counted only in the earlier snapshot (``earlier -
    later``, or snapshots of two processes) is in the delta, negative."""
    earlier = metrics.Metrics(
        opened=1,
        reused=0,
        replaced=0,
        closed={"failure": 1},
        units=1,
        failed_units=1,
        skipped=0,
        cancelled=0,
        aliases={
            "replica": metrics.AliasMetrics(
                opened=1, closed={"failure": 1}, replaced=0, cancelled=0
            )
        },
    )
    delta = zero() - earlier
    assert delta.opened == -1
    assert delta.closed == {"failure": -1}
    assert delta.aliases == {
        "replica": metrics.AliasMetrics(
            opened=-1, closed={"failure": -1}, replaced=0, cancelled=0
        )
    }


def test_a_snapshot_cannot_be_changed():
    """A snapshot is frozen all the way down: its mappings too."""
    with task_scope(strategy="close_all"):
        connections["default"].ensure_connection()
    m = metrics.snapshot()
    with pytest.raises(TypeError):
        m.closed["close_all"] = 0  # type: ignore[index]
    with pytest.raises(TypeError):
        m.aliases["default"] = m.aliases["default"]  # type: ignore[index]
    with pytest.raises(TypeError):
        m.aliases["default"].closed["close_all"] = 0  # type: ignore[index]
    with pytest.raises(TypeError):
        (m - m).closed["x"] = 1  # type: ignore[index]


def test_only_a_snapshot_can_be_subtracted():
    with pytest.raises(TypeError):
        metrics.snapshot() - 1  # type: ignore[operator]


def test_pool_counts_checkouts(pgpool, settings):
    """With Django's pool, ``opened`` and ``closed`` count connections taken
    from and given back to the pool (Django sends connection_created at
    each checkout), not server sessions: the pool keeps one open."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    before = metrics.snapshot()
    seen = set()
    for _ in range(10):
        with task_scope():
            seen.add(pgpool.session_id())
    delta = metrics.snapshot() - before
    # At most the pool's max_size (4, tests/settings.py) sessions served all.
    assert len(seen) <= 4
    assert delta.opened == 10
    assert delta.closed == {"close_all": 10}


def test_a_snapshot_without_the_app_raises(pytester):
    """Without the app nothing is counted: snapshot() says so rather than
    answer zeros."""
    pytester.makepyfile(
        """
        import django
        import pytest
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured

        def test_it():
            settings.configure(
                INSTALLED_APPS=[],
                DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                                       "NAME": ":memory:"}},
            )
            django.setup()
            from django_task_db import metrics
            with pytest.raises(ImproperlyConfigured, match="INSTALLED_APPS"):
                metrics.snapshot()
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:django", "-p", "no:django_task_db", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1)
