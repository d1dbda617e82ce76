"""Units of work: whose they are (thread, asyncio task) and how they end, as
the signals and the database server see them."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from queue import Queue
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from django_task_db import task_scope
from django_task_db.signals import task_finished, task_started
from tests.servers import Sessions
from tests.testapp.models import Item

TIMEOUT = 30
JOBS = 3


class Boom(Exception):
    pass


class Sent:
    """The task_started and task_finished sends seen during a test, any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: list[Any] = []
        self.finished: list[tuple[Any, bool]] = []

    def on_started(self, sender: Any, **kwargs: Any) -> None:
        with self.lock:
            self.started.append(sender)

    def on_finished(self, sender: Any, failed: bool = False, **kwargs: Any) -> None:
        with self.lock:
            self.finished.append((sender, failed))

    def clear(self) -> None:
        with self.lock:
            self.started.clear()
            self.finished.clear()


@pytest.fixture
def sent() -> Iterator[Sent]:
    seen = Sent()
    task_started.connect(
        seen.on_started, weak=False, dispatch_uid="tests.test_units.started"
    )
    task_finished.connect(
        seen.on_finished, weak=False, dispatch_uid="tests.test_units.finished"
    )
    yield seen
    task_started.disconnect(dispatch_uid="tests.test_units.started")
    task_finished.disconnect(dispatch_uid="tests.test_units.finished")


def own_context(test: Callable[..., None]) -> Callable[..., None]:
    """Run the test in a copy of the thread's context, so that whatever a
    context variable is left holding does not spill into the next test."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        contextvars.copy_context().run(test, *args, **kwargs)

    return run


def exceptions_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info]


# -- 1. A context copied into another thread ----------------------------------


def inner_in_the_sync_thread() -> None:
    with task_scope(sender="inner"):
        pass


def via_to_thread(job: Callable[[], None], check: Callable[[], None]) -> None:
    async def main() -> None:
        async with task_scope(sender="outer"):
            await asyncio.gather(*(asyncio.to_thread(job) for _ in range(JOBS)))
            await sync_to_async(inner_in_the_sync_thread, thread_sensitive=True)()
        check()  # the executor's threads are still alive

    asyncio.run(main())


def via_sync_to_async(job: Callable[[], None], check: Callable[[], None]) -> None:
    async def main() -> None:
        async with task_scope(sender="outer"):
            await asyncio.gather(
                *(sync_to_async(job, thread_sensitive=False)() for _ in range(JOBS))
            )
            await sync_to_async(inner_in_the_sync_thread, thread_sensitive=True)()
        check()

    asyncio.run(main())


def via_run_in_executor(job: Callable[[], None], check: Callable[[], None]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with task_scope(sender="outer"):
            await asyncio.gather(
                *(
                    loop.run_in_executor(None, contextvars.copy_context().run, job)
                    for _ in range(JOBS)
                )
            )
            await sync_to_async(inner_in_the_sync_thread, thread_sensitive=True)()
        check()

    asyncio.run(main())


def via_thread(job: Callable[[], None], check: Callable[[], None]) -> None:
    release = threading.Event()
    results: Queue[BaseException | None] = Queue()

    def job_then_hold() -> None:
        # The thread stays alive until check() has looked at the server.
        try:
            job()
        except BaseException as exc:
            results.put(exc)
        else:
            results.put(None)
        release.wait(TIMEOUT)

    threads = []
    try:
        with task_scope(sender="outer"):
            for _ in range(JOBS):
                thread = threading.Thread(
                    target=contextvars.copy_context().run, args=(job_then_hold,)
                )
                thread.start()
                threads.append(thread)
            errors = [results.get(timeout=TIMEOUT) for _ in range(JOBS)]
        assert errors == [None] * JOBS
        check()
    finally:
        release.set()
        for thread in threads:
            thread.join(TIMEOUT)


def via_thread_pool(job: Callable[[], None], check: Callable[[], None]) -> None:
    with ThreadPoolExecutor(JOBS) as executor:
        with task_scope(sender="outer"):
            futures = [
                executor.submit(contextvars.copy_context().run, job)
                for _ in range(JOBS)
            ]
            for future in futures:
                future.result(timeout=TIMEOUT)
        check()  # before the pool's threads end


WAYS = {
    "asyncio.to_thread": via_to_thread,
    "sync_to_async(thread_sensitive=False)": via_sync_to_async,
    "run_in_executor(copy_context().run)": via_run_in_executor,
    "threading.Thread(copy_context().run)": via_thread,
    "ThreadPoolExecutor(copy_context().run)": via_thread_pool,
}


@pytest.mark.parametrize("way", list(WAYS))
def test_copied_context_in_another_thread_is_a_unit(direct_server, sent, way):
    """A scope in another thread with a context copied from a unit is a unit:
    own signals, and its connection closed (CONN_MAX_AGE 0) by the server's count."""
    alias = direct_server.alias
    used: list[int] = []
    threads: list[int] = []
    lock = threading.Lock()

    @task_scope
    def job() -> None:
        Item.objects.using(alias).exists()
        with lock:
            used.append(direct_server.session_id())
            threads.append(threading.get_ident())

    sessions = Sessions(direct_server)
    left: set[int] = set()

    def check() -> None:
        left.update(sessions.wait_until_gone(set(used)))

    connections[alias].settings_dict["CONN_MAX_AGE"] = 0
    try:
        WAYS[way](job, check)
    finally:
        connections[alias].settings_dict["CONN_MAX_AGE"] = None
        sessions.close()

    assert len(used) == JOBS
    assert threading.get_ident() not in threads
    assert left == set()
    assert Counter(sent.started) == {"outer": 1, job.__wrapped__: JOBS}
    assert Counter(sent.finished) == {
        ("outer", False): 1,
        (job.__wrapped__, False): JOBS,
    }


def test_pool_connections_come_back_from_to_thread_jobs(pgpool):
    """Django's pool (max 4): 20 to_thread jobs inside an async unit, 5 at once,
    all get a connection: no PoolTimeout."""
    together = threading.Barrier(5)
    counter = iter(range(20))
    lock = threading.Lock()

    @task_scope
    def job() -> int:
        with lock:
            number = next(counter)
        if number < 5:  # the first five run at once, more than the pool holds
            together.wait(TIMEOUT)
        return pgpool.session_id()

    async def main() -> list[Any]:
        async with task_scope():
            return await asyncio.gather(
                *(asyncio.to_thread(job) for _ in range(20)), return_exceptions=True
            )

    try:
        results = asyncio.run(main())
    finally:
        connections["pgpool"].close_pool()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert [f"{type(e).__name__}: {e}" for e in errors] == []
    assert len(results) == 20


# -- 2a. Signals that raise ---------------------------------------------------


class Refused(Exception):
    pass


def refuse(**kwargs: Any) -> None:
    raise Refused("a receiver of the user's own")


def finish_with_a_typo() -> None:
    task_started.send(sender="runner")
    with pytest.raises(ImproperlyConfigured):
        task_finished.send(sender="runner", strategy="close-all")


def finish_alone_with_a_typo() -> None:
    with pytest.raises(ImproperlyConfigured):
        task_finished.send(sender="runner", strategy="close-all")


def start_with_a_typo() -> None:
    with pytest.raises(ImproperlyConfigured):
        task_started.send(sender="runner", strategy="nope")


def scope_with_a_typo() -> None:
    ran = []
    with pytest.raises(ImproperlyConfigured):
        with task_scope(sender="runner", strategy="nope"):
            ran.append("body")
    assert ran == []


def start_refused_by_a_receiver() -> None:
    task_started.connect(refuse, weak=False, dispatch_uid="tests.test_units.refuse")
    try:
        with pytest.raises(Refused):
            task_started.send(sender="runner")
    finally:
        task_started.disconnect(dispatch_uid="tests.test_units.refuse")


BAD_SENDS = {
    "task_finished typo after task_started": finish_with_a_typo,
    "task_finished typo alone": finish_alone_with_a_typo,
    "task_started typo": start_with_a_typo,
    "task_scope typo": scope_with_a_typo,
    "task_started receiver raises": start_refused_by_a_receiver,
}


@pytest.mark.parametrize("bad", list(BAD_SENDS))
@own_context
def test_next_scope_after_a_send_that_raised(direct_server, sent, bad):
    """After a signal that raised, the thread's next task_scope sends both
    signals and its close_all ends the server session."""
    alias = direct_server.alias
    BAD_SENDS[bad]()
    sent.clear()
    with task_scope(sender="next", strategy="close_all"):
        session = direct_server.session_id()
    assert sent.started == ["next"]
    assert sent.finished == [("next", False)]
    assert connections[alias].connection is None
    direct_server.wait_until_gone(session)


@pytest.mark.parametrize("form", ["sync", "async"])
@own_context
def test_scope_whose_task_started_receiver_raises(direct_server, sent, form):
    """A task_started receiver that raises: the scope raises, its body does not
    run; the next scope sends both signals and acts."""
    ran: list[str] = []
    session_id = sync_to_async(direct_server.session_id, thread_sensitive=True)

    async def refused_then_next() -> int:
        with pytest.raises(Refused):
            async with task_scope(sender="refused"):
                ran.append("body")
        task_started.disconnect(dispatch_uid="tests.test_units.refuse")
        sent.clear()
        async with task_scope(sender="next", strategy="close_all"):
            return await session_id()

    task_started.connect(refuse, weak=False, dispatch_uid="tests.test_units.refuse")
    try:
        if form == "async":
            session = asyncio.run(refused_then_next())
        else:
            with pytest.raises(Refused):
                with task_scope(sender="refused"):
                    ran.append("body")
            task_started.disconnect(dispatch_uid="tests.test_units.refuse")
            sent.clear()
            with task_scope(sender="next", strategy="close_all"):
                session = direct_server.session_id()
    finally:
        task_started.disconnect(dispatch_uid="tests.test_units.refuse")
    assert ran == []
    assert sent.started == ["next"]
    assert sent.finished == [("next", False)]
    direct_server.wait_until_gone(session)


# -- 2b. Generators -----------------------------------------------------------


def produce(sender: str) -> Iterator[int]:
    with task_scope(sender=sender):
        yield 1
        yield 2


def scope_sends_its_own(sent: Sent) -> None:
    sent.clear()
    with task_scope(sender="after"):
        pass
    assert sent.started == ["after"]
    assert sent.finished == [("after", False)]


@pytest.mark.parametrize("opener", ["main thread", "worker thread"])
@own_context
def test_generator_closed_in_another_thread(sent, caplog, opener):
    """next(gen) in thread A, gen.close() in thread B: nothing raises, and
    thread A's next scope sends its own signals."""
    caplog.set_level(logging.INFO, logger="django_task_db")
    gen = produce("gen")
    errors: list[BaseException] = []

    def close() -> None:
        try:
            gen.close()
        except BaseException as exc:
            errors.append(exc)

    with ThreadPoolExecutor(1) as thread_a:
        if opener == "main thread":
            assert next(gen) == 1
            closer = threading.Thread(target=close)
            closer.start()
            closer.join(TIMEOUT)
            assert not closer.is_alive()
            assert errors == []
            scope_sends_its_own(sent)
        else:
            assert thread_a.submit(next, gen).result(timeout=TIMEOUT) == 1
            close()
            assert errors == []
            thread_a.submit(scope_sends_its_own, sent).result(timeout=TIMEOUT)
    assert exceptions_logged(caplog) == []


@pytest.mark.parametrize("first_closed", ["g1", "g2"])
@own_context
def test_two_generators_closed_in_any_order(sent, first_closed):
    """next(g1), next(g2) (inner), closed in any order: one unit, g1's; then
    the thread's next scope sends its own signals."""
    g1, g2 = produce("g1"), produce("g2")
    assert next(g1) == 1
    assert next(g2) == 1
    for gen in (g1, g2) if first_closed == "g1" else (g2, g1):
        gen.close()
    assert sent.started == ["g1"]
    assert [sender for sender, _ in sent.finished] == ["g1"]
    assert sent.finished == [("g1", False)]
    scope_sends_its_own(sent)


@pytest.mark.parametrize("how", ["break", "close()", "dropped"])
@own_context
def test_leaving_a_generator_early_is_not_a_failure(
    direct_server, settings, sent, closed, how
):
    """GeneratorExit (break, close(), dropped) is no failure: under close_old
    the next unit has the same server session; nothing closed."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    alias = direct_server.alias
    assert connections[alias].settings_dict["CONN_MAX_AGE"] is None

    def rows() -> Iterator[int]:
        with task_scope(sender="rows"):
            for _ in range(3):
                Item.objects.using(alias).exists()
                yield direct_server.session_id()

    if how == "break":
        for session in rows():
            first = session
            break
    else:
        gen = rows()
        first = next(gen)
        if how == "close()":
            gen.close()
        else:
            del gen
    assert sent.finished == [("rows", False)]
    with task_scope(sender="next"):
        again = direct_server.session_id()
    assert again == first
    assert closed == []


@own_context
def test_leaving_an_async_generator_early_is_not_a_failure(
    direct_server, settings, sent, closed
):
    """An async generator left with aclose() after a break: no failure, the
    next async unit has the same server session; nothing closed."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    session_id = sync_to_async(direct_server.session_id, thread_sensitive=True)

    async def rows():
        async with task_scope(sender="rows"):
            for _ in range(3):
                yield await session_id()

    async def main() -> tuple[int, int]:
        gen = rows()
        try:
            async for session in gen:
                first = session
                break
        finally:
            await gen.aclose()
        async with task_scope(sender="next"):
            return first, await session_id()

    first, again = asyncio.run(main())
    assert sent.finished == [("rows", False), ("next", False)]
    assert again == first
    assert closed == []


@pytest.mark.parametrize("how", ["raise", "throw()"])
@own_context
def test_exception_in_a_generator_is_a_failure(direct_server, sent, closed, how):
    """A real exception in the generator's scope: failed=True, connection closed."""
    alias = direct_server.alias

    def rows() -> Iterator[int]:
        with task_scope(sender="rows"):
            yield direct_server.session_id()
            raise Boom

    gen = rows()
    session = next(gen)
    with pytest.raises(Boom):
        if how == "raise":
            next(gen)
        else:
            gen.throw(Boom())
    assert sent.finished == [("rows", True)]
    assert closed == [(alias, "failure")]
    direct_server.wait_until_gone(session)


# -- 2c. Concurrent async units on the sync thread's connection ---------------


@pytest.mark.parametrize("ending", ["close_all", "failure"])
def test_concurrent_unit_ends_while_another_streams(direct_server, sent, ending):
    """Unit B ends (close_all, or a failure) while A streams rows with
    aiterator: A sees every row; after the last unit the session is gone."""
    alias = direct_server.alias
    names = [f"row{i}" for i in range(10)]
    Item.objects.using(alias).bulk_create(Item(name=name) for name in names)
    connections[alias].close()
    strategy = "close_all" if ending == "close_all" else None
    session_id = sync_to_async(direct_server.session_id, thread_sensitive=True)

    async def main() -> tuple[int, list[str]]:
        b_inside, a_streaming, b_ended = (asyncio.Event() for _ in range(3))

        async def unit_a() -> tuple[int, list[str]]:
            seen: list[str] = []
            async with task_scope(sender="A"):
                await asyncio.wait_for(b_inside.wait(), TIMEOUT)
                session = await session_id()
                rows = Item.objects.using(alias).order_by("pk")
                async for item in rows.aiterator(chunk_size=2):
                    seen.append(item.name)
                    if len(seen) == 1:
                        a_streaming.set()
                        await asyncio.wait_for(b_ended.wait(), TIMEOUT)
                    await asyncio.sleep(0)
            return session, seen

        async def unit_b() -> None:
            try:
                async with task_scope(sender="B", strategy=strategy):
                    b_inside.set()
                    await asyncio.wait_for(a_streaming.wait(), TIMEOUT)
                    if ending == "failure":
                        raise Boom("nothing to do with the database")
            except Boom:
                pass
            finally:
                b_ended.set()

        result, _ = await asyncio.wait_for(
            asyncio.gather(unit_a(), unit_b()), 2 * TIMEOUT
        )
        return result

    session, seen = asyncio.run(main())
    assert seen == names
    assert sorted(sent.started) == ["A", "B"]
    assert sorted(sent.finished) == [("A", False), ("B", ending == "failure")]
    direct_server.wait_until_gone(session)


# -- Found in review: interleaved generators, receiver order, senders ---------


def test_interleaved_generator_keeps_its_transaction_and_cleans_up(direct_server):
    """g2's scope starts while g1's unit is open, so it is part of that unit:
    closing g1 first neither rolls back g2's open transaction nor leaves the
    connection open once g2 is closed too (close_all)."""
    alias = direct_server.alias

    def g1() -> Iterator[int]:
        with task_scope(sender="g1", strategy="close_all"):
            yield direct_server.session_id()

    def g2() -> Iterator[None]:
        from django.db import transaction

        with task_scope(sender="g2", strategy="close_all"):
            transaction.set_autocommit(False, using=alias)
            Item.objects.using(alias).create(name="one")
            yield
            Item.objects.using(alias).create(name="two")
            transaction.commit(using=alias)
            transaction.set_autocommit(True, using=alias)
            yield

    first, second = g1(), g2()
    session = next(first)
    next(second)
    first.close()
    assert connections[alias].connection is not None  # g2 still uses it
    next(second)
    second.close()
    assert direct_server.count_rows() == 2
    assert connections[alias].connection is None
    direct_server.wait_until_gone(session)


def explode(**kwargs: Any) -> None:
    raise Boom("a task_finished receiver connected before the app's")


def test_cleanup_when_an_earlier_task_finished_receiver_raises(direct_server, sent):
    """A task_finished receiver that runs before the app's (an app listed
    before django_task_db) raises: the error reaches the caller, and the unit
    is cleaned up all the same (close_all ends the server session)."""
    from django_task_db import apps

    task_finished.disconnect(dispatch_uid="django_task_db.finished")
    task_finished.connect(explode, weak=False, dispatch_uid="tests.explode")
    apps.connect_receivers()  # the app's receiver now runs second
    try:
        with pytest.raises(Boom):
            with task_scope(sender="unit", strategy="close_all"):
                session = direct_server.session_id()
    finally:
        task_finished.disconnect(dispatch_uid="tests.explode")
    assert connections[direct_server.alias].connection is None
    direct_server.wait_until_gone(session)
    sent.clear()
    with task_scope(sender="next"):
        pass
    assert sent.started == ["next"]


def test_decorated_staticmethod(sent):
    """@task_scope above @staticmethod: the function is the sender, and the
    call runs in a unit (a staticmethod object breaks Django's signals)."""

    class Jobs:
        @task_scope
        @staticmethod
        def run(value: int) -> int:
            return value + 1

    assert Jobs.run(1) == 2
    assert len(sent.started) == 1 and len(sent.finished) == 1
