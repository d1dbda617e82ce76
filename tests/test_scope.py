"""task_scope: context manager, decorator, nesting, failures, asyncio."""

from __future__ import annotations

import asyncio
import inspect
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from django_task_db import TaskScope, task_scope
from django_task_db.signals import task_finished, task_started
from django_task_db.units import in_unit
from tests.testapp.models import Item


class Boom(Exception):
    pass


class Sent:
    """The task_started and task_finished sends seen during a test."""

    def __init__(self) -> None:
        self.started: list[dict[str, Any]] = []
        self.finished: list[dict[str, Any]] = []

    def on_started(self, sender: Any, **kwargs: Any) -> None:
        self.started.append({"sender": sender, **kwargs})

    def on_finished(self, sender: Any, **kwargs: Any) -> None:
        self.finished.append({"sender": sender, **kwargs})


@pytest.fixture
def sent() -> Iterator[Sent]:
    seen = Sent()
    task_started.connect(
        seen.on_started, weak=False, dispatch_uid="tests.test_scope.started"
    )
    task_finished.connect(
        seen.on_finished, weak=False, dispatch_uid="tests.test_scope.finished"
    )
    yield seen
    task_started.disconnect(dispatch_uid="tests.test_scope.started")
    task_finished.disconnect(dispatch_uid="tests.test_scope.finished")


@pytest.fixture
def executor_thread() -> None:
    """conftest closes the executor thread's connections after every test."""


def fail_here(error: BaseException) -> None:
    raise error


# -- Context manager and decorator forms ---------------------------------------


def test_context_manager(sent):
    """with task_scope(): task_started, then task_finished(failed=False)."""
    with task_scope() as value:
        assert in_unit()
        assert len(sent.started) == 1 and sent.finished == []
    assert value is None
    assert not in_unit()
    assert sent.started == [{"sender": None, "signal": task_started, "strategy": None}]
    assert sent.finished == [
        {"sender": None, "signal": task_finished, "failed": False, "strategy": None}
    ]


def test_context_manager_with_sender_and_strategy(sent):
    """The given sender and strategy reach both signals."""
    marker = object()
    with task_scope(sender=marker, strategy="keep"):
        pass
    assert [s["sender"] for s in sent.started + sent.finished] == [marker, marker]
    assert [s["strategy"] for s in sent.started + sent.finished] == ["keep", "keep"]


def test_bare_decorator(sent):
    """@task_scope keeps name, arguments, return value; sender is the function."""

    @task_scope
    def add(a, b, *, scale=1):
        """Add, then scale."""
        assert in_unit()
        return (a + b) * scale

    assert add.__name__ == "add"
    assert add.__doc__ == "Add, then scale."
    assert inspect.signature(add) == inspect.signature(add.__wrapped__)
    assert add(1, 2) == 3
    assert add(1, b=2, scale=10) == 30
    assert len(sent.started) == len(sent.finished) == 2
    assert all(s["sender"] is add.__wrapped__ for s in sent.started + sent.finished)
    assert [s["failed"] for s in sent.finished] == [False, False]
    assert not in_unit()


def test_decorator_with_empty_parentheses(sent):
    """@task_scope() behaves as @task_scope."""

    @task_scope()
    def echo(*args, **kwargs):
        return args, kwargs

    assert echo.__name__ == "echo"
    assert echo(1, x=2) == ((1,), {"x": 2})
    assert sent.started[0]["sender"] is echo.__wrapped__
    assert sent.finished[0]["failed"] is False


def test_decorator_with_strategy_closes(sqlite, sent, closed):
    """@task_scope(strategy="close_all") passes the strategy and closes."""

    @task_scope(strategy="close_all")
    def create(name):
        return Item.objects.using(sqlite).create(name=name).name

    assert create("x") == "x"
    assert connections[sqlite].connection is None
    assert closed == [("default", "close_all")]
    assert sent.started[0]["strategy"] == sent.finished[0]["strategy"] == "close_all"


def test_decorator_with_explicit_sender(sent):
    """@task_scope(sender=...) sends the given sender, not the function."""

    @task_scope(sender="my-runner")
    def work():
        pass

    work()
    assert [s["sender"] for s in sent.started + sent.finished] == [
        "my-runner",
        "my-runner",
    ]


def test_decorated_method(sent):
    """A decorated method receives self and its arguments."""

    class Worker:
        factor = 3

        @task_scope
        def run(self, value):
            return value * self.factor

    assert Worker().run(2) == 6
    assert sent.started[0]["sender"] is Worker.run.__wrapped__


def test_scope_instance_used_again_in_sequence(sent):
    """A TaskScope instance can be entered again after it was left."""
    scope = task_scope()
    assert isinstance(scope, TaskScope)
    for _ in range(3):
        with scope:
            assert in_unit()
        assert not in_unit()
    assert len(sent.started) == len(sent.finished) == 3


def test_scope_instance_reentered_while_active(sent):
    """One TaskScope instance re-entered inside itself: only the outer use acts."""
    scope = task_scope()
    with scope:
        with scope:
            pass
        assert sent.finished == []
        assert in_unit()
    assert len(sent.started) == len(sent.finished) == 1
    assert not in_unit()


# -- Failures ------------------------------------------------------------------


def test_exception_reraised_unchanged(sent):
    """The body's exception is re-raised as is, traceback kept; failed=True."""
    error = Boom("original")
    with pytest.raises(Boom) as raised:
        with task_scope():
            fail_here(error)
    assert raised.value is error
    assert raised.value.__context__ is None
    assert raised.value.__cause__ is None
    assert [frame.name for frame in traceback.extract_tb(error.__traceback__)][
        -1
    ] == "fail_here"
    assert [s["failed"] for s in sent.finished] == [True]
    assert not in_unit()


def test_decorated_function_exception_unchanged(sent):
    """A decorated function's exception is re-raised unchanged, failed=True."""
    error = Boom("from the function")

    @task_scope
    def work():
        fail_here(error)

    with pytest.raises(Boom) as raised:
        work()
    assert raised.value is error
    assert [frame.name for frame in traceback.extract_tb(error.__traceback__)][-2:] == [
        "work",
        "fail_here",
    ]
    assert sent.finished[0]["failed"] is True
    assert sent.finished[0]["sender"] is work.__wrapped__


def test_keyboard_interrupt_counts_as_failed(sqlite, settings, sent, closed):
    """KeyboardInterrupt propagates unchanged and fails the unit (closes)."""
    settings.TASK_DB = {"STRATEGY": "keep"}
    interrupt = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt) as raised:
        with task_scope():
            Item.objects.using(sqlite).count()
            raise interrupt
    assert raised.value is interrupt
    assert sent.finished[0]["failed"] is True
    assert closed == [("default", "failure")]
    assert not in_unit()


def test_system_exit_from_decorated_function(sent):
    """SystemExit from a decorated function propagates, failed=True."""

    @task_scope
    def stop():
        raise SystemExit(3)

    with pytest.raises(SystemExit) as raised:
        stop()
    assert raised.value.code == 3
    assert sent.finished[0]["failed"] is True


def test_success_closes_nothing_under_keep(sqlite, settings, sent, closed):
    """failed=False on success: under keep the connection stays open."""
    settings.TASK_DB = {"STRATEGY": "keep"}
    with task_scope():
        Item.objects.using(sqlite).count()
    assert sent.finished[0]["failed"] is False
    assert connections[sqlite].connection is not None
    assert closed == []


# -- Nesting -------------------------------------------------------------------


def test_nested_scopes_only_outermost_sends(sent):
    """Scopes and decorated calls inside a scope send nothing of their own."""

    @task_scope(strategy="close_all")
    def inner(value):
        return value + 1

    with task_scope(sender="outer"):
        with task_scope(sender="inner"):
            with task_scope():
                assert inner(1) == 2
        assert in_unit()
        with pytest.raises(Boom):
            with task_scope():
                raise Boom
        assert in_unit()
        assert sent.finished == []
    assert [s["sender"] for s in sent.started] == ["outer"]
    assert [(s["sender"], s["failed"]) for s in sent.finished] == [("outer", False)]
    assert not in_unit()


def test_nested_decorated_functions(sent):
    """A decorated function calling another: one unit, the outer function's."""

    @task_scope
    def leaf():
        return "leaf"

    @task_scope
    def root():
        return leaf() + "+root"

    assert root() == "leaf+root"
    assert [s["sender"] for s in sent.started] == [root.__wrapped__]
    assert len(sent.finished) == 1
    assert leaf() == "leaf"  # alone, it is a unit of its own
    assert [s["sender"] for s in sent.started] == [root.__wrapped__, leaf.__wrapped__]


def test_scope_inside_unit_started_by_raw_signals(sent):
    """A task_scope inside a unit begun by raw task_started sends nothing."""
    task_started.send(sender="runner")
    with task_scope():
        pass
    assert len(sent.started) == 1 and sent.finished == []
    task_finished.send(sender="runner")
    with task_scope():
        pass
    assert [s["sender"] for s in sent.started] == ["runner", None]
    assert [s["sender"] for s in sent.finished] == ["runner", None]


def test_scope_state_is_per_thread(sent):
    """A scope open in one thread does not make another thread's scope inner."""
    seen: list[bool] = []
    inside, done = threading.Event(), threading.Event()

    def other():
        with task_scope(sender="other"):
            seen.append(in_unit())
            inside.set()
            done.wait(30)

    with task_scope(sender="main"):
        thread = threading.Thread(target=other)
        thread.start()
        assert inside.wait(30)
        done.set()
        thread.join(30)
    assert seen == [True]
    assert sorted(s["sender"] for s in sent.started) == ["main", "other"]
    assert sorted(s["sender"] for s in sent.finished) == ["main", "other"]


# -- asyncio -------------------------------------------------------------------


def test_async_with(sent, executor_thread):
    """async with task_scope(): both signals sent in the sync (executor) thread."""
    threads: list[tuple[str, int]] = []

    def on_started(**kwargs):
        threads.append(("started", threading.get_ident()))

    def on_finished(**kwargs):
        threads.append(("finished", threading.get_ident()))

    async def main():
        async with task_scope(sender="coro"):
            assert in_unit()
            return await sync_to_async(threading.get_ident, thread_sensitive=True)()

    task_started.connect(on_started, weak=False, dispatch_uid="tests.thread")
    task_finished.connect(on_finished, weak=False, dispatch_uid="tests.thread")
    try:
        sync_thread = asyncio.run(main())
    finally:
        task_started.disconnect(dispatch_uid="tests.thread")
        task_finished.disconnect(dispatch_uid="tests.thread")
    assert sync_thread != threading.get_ident()
    assert threads == [("started", sync_thread), ("finished", sync_thread)]
    assert [s["sender"] for s in sent.started] == ["coro"]
    assert [(s["sender"], s["failed"]) for s in sent.finished] == [("coro", False)]
    assert not in_unit()


def test_async_decorator(sent, executor_thread):
    """@task_scope on an async def keeps a coroutine function; sender is it."""

    @task_scope
    async def fetch(name, *, suffix=""):
        """Fetch a name."""
        assert in_unit()
        return name + suffix

    assert inspect.iscoroutinefunction(fetch)
    assert fetch.__name__ == "fetch"
    assert fetch.__doc__ == "Fetch a name."
    assert asyncio.run(fetch("a", suffix="b")) == "ab"
    assert [s["sender"] for s in sent.started] == [fetch.__wrapped__]
    assert [s["failed"] for s in sent.finished] == [False]


def test_async_decorator_with_strategy(sent, executor_thread):
    """@task_scope(strategy=...) on an async def passes the strategy."""

    @task_scope(strategy="keep")
    async def work():
        return 1

    assert asyncio.run(work()) == 1
    assert sent.started[0]["strategy"] == sent.finished[0]["strategy"] == "keep"


def test_async_close_all_on_a_server(
    direct_server, settings, sent, closed, executor_thread
):
    """close_all in an async scope ends the sync thread's server session."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    alias = direct_server.alias

    def query():
        Item.objects.using(alias).create(name="async")
        return direct_server.session_id()

    async def main():
        async with task_scope():
            first = await sync_to_async(query, thread_sensitive=True)()
            assert direct_server.sessions() == {first}
        return first

    session = asyncio.run(main())
    direct_server.wait_until_gone(session)
    assert direct_server.wait_for_count(0) == 0
    assert closed == [(alias, "close_all")]
    assert direct_server.count_rows() == 1


def test_async_scope_start_closes_connection_left_open(
    direct_server, settings, closed, executor_thread
):
    """An async close_all scope closes a left-open session at its start."""
    settings.TASK_DB = {"STRATEGY": "keep"}
    alias = direct_server.alias
    session_id = sync_to_async(direct_server.session_id, thread_sensitive=True)

    async def main():
        async with task_scope():
            left_open = await session_id()
        assert direct_server.sessions() == {left_open}
        async with task_scope(strategy="close_all"):
            assert left_open not in direct_server.sessions()
            return left_open, await session_id()

    left_open, fresh = asyncio.run(main())
    assert fresh != left_open
    assert closed == [(alias, "close_all")] * 2
    assert direct_server.wait_for_count(0) == 0


def test_async_decorated_close_all_on_a_server(
    direct_server, settings, closed, executor_thread
):
    """An async def under @task_scope(strategy="close_all") ends each session."""
    alias = direct_server.alias

    @task_scope(strategy="close_all")
    async def work():
        return await sync_to_async(direct_server.session_id, thread_sensitive=True)()

    sessions = [asyncio.run(work()) for _ in range(2)]
    assert sessions[0] != sessions[1]
    assert direct_server.wait_for_count(0) == 0
    assert closed == [(alias, "close_all")] * 2


def test_async_exception_reraised_unchanged(
    sqlite, settings, sent, closed, executor_thread
):
    """The async body's exception is re-raised as is; failed; closed."""
    settings.TASK_DB = {"STRATEGY": "keep"}
    error = Boom("async original")

    async def main():
        async with task_scope():
            await sync_to_async(
                Item.objects.using(sqlite).count, thread_sensitive=True
            )()
            fail_here(error)

    with pytest.raises(Boom) as raised:
        asyncio.run(main())
    assert raised.value is error
    assert raised.value.__context__ is None
    assert [frame.name for frame in traceback.extract_tb(error.__traceback__)][
        -1
    ] == "fail_here"
    assert [s["failed"] for s in sent.finished] == [True]
    assert closed == [("default", "failure")]


def test_async_decorated_exception_reraised_unchanged(sent, executor_thread):
    """An async decorated function's exception is re-raised unchanged, failed=True."""
    error = Boom("async function")

    @task_scope
    async def work():
        fail_here(error)

    with pytest.raises(Boom) as raised:
        asyncio.run(work())
    assert raised.value is error
    assert sent.finished[0]["failed"] is True


def test_async_nested_scopes_only_outermost_sends(sent, executor_thread):
    """Scopes nested in an async scope, async or via sync_to_async, send nothing."""

    @task_scope
    async def inner():
        return "inner"

    def sync_part():
        with task_scope():
            return in_unit()

    async def main():
        async with task_scope(sender="outer"):
            async with task_scope():
                assert await inner() == "inner"
            return await sync_to_async(sync_part, thread_sensitive=True)()

    assert asyncio.run(main()) is True
    assert [s["sender"] for s in sent.started] == ["outer"]
    assert [s["sender"] for s in sent.finished] == ["outer"]


def test_two_concurrent_async_scopes(direct_server, settings, sent, executor_thread):
    """Two concurrent async scopes (asyncio.gather) both complete, then close."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    alias = direct_server.alias
    both_inside = asyncio.Event()
    arrived: list[str] = []

    async def unit(name):
        async with task_scope(sender=name):
            await sync_to_async(
                Item.objects.using(alias).create, thread_sensitive=True
            )(name=name)
            arrived.append(name)
            if len(arrived) == 2:
                both_inside.set()
            await both_inside.wait()
            count = await sync_to_async(
                Item.objects.using(alias).count, thread_sensitive=True
            )()
        return name, count

    async def main():
        return await asyncio.wait_for(asyncio.gather(unit("a"), unit("b")), 30)

    assert asyncio.run(main()) == [("a", 2), ("b", 2)]
    assert sorted(s["sender"] for s in sent.started) == ["a", "b"]
    assert sorted((s["sender"], s["failed"]) for s in sent.finished) == [
        ("a", False),
        ("b", False),
    ]
    assert direct_server.wait_for_count(0) == 0
    assert direct_server.count_rows() == 2


def test_generator_function_cannot_be_decorated():
    """Decorating a generator function is a TypeError: the unit would end
    before the body runs."""

    def produce():
        yield 1

    async def produce_async():
        yield 1

    for func in (produce, produce_async):
        with pytest.raises(TypeError, match="generator function"):
            task_scope(func)


def test_cleanup_error_does_not_hide_the_body_exception(sqlite, settings, caplog):
    """When the body failed and cleanup fails too, the body's exception reaches
    the caller and the cleanup's is logged."""
    error = ValueError("the body's")

    def failing_receiver(**kwargs):
        raise RuntimeError("the cleanup's")

    task_finished.connect(failing_receiver, dispatch_uid="failing_receiver")
    try:
        with pytest.raises(ValueError) as raised:
            with task_scope():
                raise error
        assert raised.value is error
        assert "the cleanup's" in caplog.text
        with pytest.raises(RuntimeError, match="the cleanup's"):
            with task_scope():
                pass
    finally:
        task_finished.disconnect(dispatch_uid="failing_receiver")


def test_bad_setting_raises_before_the_body_without_open_connections(sqlite, settings):
    """A bad TASK_DB value raises at entry even when no connection is open, so
    the body never runs and nothing is left half cleaned."""
    ran = []
    for bad in ({"STRATEGY": "nope"}, {"HEALTH_CHECKS": "false"}, {"ALIASES": []}):
        settings.TASK_DB = bad
        assert connections[sqlite].connection is None
        with pytest.raises(ImproperlyConfigured, match="TASK_DB"):
            with task_scope():
                ran.append(bad)
    assert ran == []


def test_retry_needs_the_decorator_form():
    """retry_on_disconnect in a with block is a TypeError: a block cannot be
    run again."""
    with pytest.raises(TypeError, match="decorator"):
        with task_scope(retry_on_disconnect=1):
            pass

    async def enter() -> None:
        async with task_scope(retry_on_disconnect=1):
            pass

    with pytest.raises(TypeError, match="decorator"):
        asyncio.run(enter())


def test_async_callable_object_runs_inside_its_unit(sent):
    """An object with an async __call__ is decorated as a coroutine function:
    its body runs between task_started and task_finished."""
    order: list[str] = []

    class Handler:
        async def __call__(self) -> None:
            order.append("body")

    task_started.connect(
        lambda **kw: order.append("started"), weak=False, dispatch_uid="o1"
    )
    task_finished.connect(
        lambda **kw: order.append("finished"), weak=False, dispatch_uid="o2"
    )
    try:
        asyncio.run(task_scope(Handler())())
    finally:
        task_started.disconnect(dispatch_uid="o1")
        task_finished.disconnect(dispatch_uid="o2")
    assert order == ["started", "body", "finished"]
