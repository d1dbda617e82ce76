from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import threading
from collections.abc import Callable
from contextvars import Token
from types import TracebackType
from typing import Any, TypeVar, overload

from asgiref.sync import iscoroutinefunction, sync_to_async

from django_task_db import boundaries, units
from django_task_db.conf import StrategySpec
from django_task_db.faults import is_disconnect
from django_task_db.signals import (
    FINISHED_UID,
    STARTED_UID,
    only_app_receiver,
    task_finished,
    task_started,
)
from django_task_db.units import Unit

F = TypeVar("F", bound=Callable[..., Any])

logger = logging.getLogger("django_task_db")

# What one ``with`` of a scope entered: the unit it started (None when it
# is inner), the token that made that unit current, and the thread and
# asyncio task it was entered in.
_Entry = tuple[
    Unit | None, "Token[Unit | None] | None", int, "asyncio.Task[Any] | None"
]


class TaskScope:
    """A unit of work: fires task_started on entry and task_finished on exit.

    Only a scope that is not nested in a unit of the same thread and asyncio
    task acts; inner ones, and scopes inside a unit started by a runner's own
    signals, run their body and nothing else. The body's exception is
    re-raised unchanged. A GeneratorExit (a generator closed before its end)
    is not a failure.
    """

    def __init__(
        self,
        *,
        strategy: StrategySpec | None = None,
        sender: Any = None,
        retry_on_disconnect: int = 0,
    ):
        if type(retry_on_disconnect) is not int or retry_on_disconnect < 0:
            raise ValueError(
                f"retry_on_disconnect is {retry_on_disconnect!r}; allowed: a "
                "whole number of retries, 0 (the default) or more."
            )
        self.strategy = strategy
        self.sender = sender
        self.retry_on_disconnect = retry_on_disconnect
        # One entry per ``with`` in progress: one scope object may be entered
        # again while in use, and by several threads.
        self._entries: list[_Entry] = []

    def __enter__(self) -> None:
        self._only_decorators_retry()
        thread, task = threading.get_ident(), units.current_task()
        unit = units.current.get()
        if unit is not None and unit.encloses_sync_code():
            self._enter_inner(unit, thread, task)
            return
        unit = self._new_unit(task, thread)
        _start(unit)
        self._entries.append((unit, units.current.set(unit), thread, task))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        unit = self._leave(exc)
        if unit is not None:
            try:
                _finish(unit)
            except Exception:
                _unless_failed(exc)

    async def __aenter__(self) -> None:
        self._only_decorators_retry()
        thread, task = threading.get_ident(), units.current_task()
        unit = units.current.get()
        if unit is not None and unit.encloses_async_code(task):
            self._enter_inner(unit, thread, task)
            return
        # Django's synchronous connections live in the thread that
        # sync_to_async(thread_sensitive=True) runs in: the unit starts there.
        unit = self._new_unit(task, None)
        await sync_to_async(_start, thread_sensitive=True)(unit)
        self._entries.append((unit, units.current.set(unit), thread, task))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        unit = self._leave(exc)
        if unit is not None:
            try:
                await sync_to_async(_finish, thread_sensitive=True)(unit)
            except Exception:
                _unless_failed(exc)

    def __call__(self, func: F) -> F:
        """Decorate ``func`` (a function or a coroutine function) so that each
        call runs in a scope of its own."""
        _check_decorated(func)
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"task_scope cannot decorate the generator function {func.__name__}"
                "(): the unit would end before its body runs. Use "
                "`with task_scope():` inside it instead."
            )
        if self.sender is not None:
            sender = self.sender
        else:  # a staticmethod object is no sender for Django's signals
            sender = func.__func__ if isinstance(func, staticmethod) else func
        strategy = self.strategy
        retries = self.retry_on_disconnect

        # Retries never happen inside an outer unit (only the outermost acts)
        # nor inside a transaction of the caller's.
        if iscoroutinefunction(func) or iscoroutinefunction(type(func).__call__):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                in_transaction = sync_to_async(
                    boundaries.caller_in_transaction, thread_sensitive=True
                )
                allowed = 0
                if retries and not units.in_unit() and not await in_transaction():
                    allowed = retries
                for attempt in itertools.count(1):
                    try:
                        async with TaskScope(strategy=strategy, sender=sender):
                            return await func(*args, **kwargs)
                    except Exception as exc:
                        if not _retry(func, exc, attempt, allowed):
                            raise
                    await sync_to_async(
                        boundaries.close_broken, thread_sensitive=True
                    )()

            return run_async  # type: ignore[return-value]

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            allowed = 0
            if (
                retries
                and not units.in_unit()
                and not boundaries.caller_in_transaction()
            ):
                allowed = retries
            for attempt in itertools.count(1):
                try:
                    with TaskScope(strategy=strategy, sender=sender):
                        return func(*args, **kwargs)
                except Exception as exc:
                    if not _retry(func, exc, attempt, allowed):
                        raise
                boundaries.close_broken()

        return run  # type: ignore[return-value]

    def _only_decorators_retry(self) -> None:
        if self.retry_on_disconnect:
            raise TypeError(
                "retry_on_disconnect needs task_scope as a decorator: a with "
                "block cannot be run again."
            )

    def _new_unit(self, task: asyncio.Task[Any] | None, thread: int | None) -> Unit:
        unit = Unit(task, thread)
        unit.sender, unit.strategy, unit.scopes = self.sender, self.strategy, 1
        return unit

    def _enter_inner(
        self, unit: Unit, thread: int, task: asyncio.Task[Any] | None
    ) -> None:
        unit.scopes += 1
        self._entries.append((unit, None, thread, task))

    def _leave(self, exc: BaseException | None) -> Unit | None:
        """Leave a ``with``: return its unit if that unit has ended with it
        (its last open scope), else None.

        The entry is this thread and task's latest one; failing that (a
        generator closed in another thread), the latest of all.
        """
        thread, task = threading.get_ident(), units.current_task()
        entries = self._entries
        latest = entries[-1]
        if latest[2] == thread and latest[3] is task:
            index = len(entries) - 1
        else:
            index = next(
                (
                    i
                    for i in range(len(entries) - 1, -1, -1)
                    if entries[i][2] == thread and entries[i][3] is task
                ),
                len(entries) - 1,
            )
        unit, token, _, _ = entries.pop(index)
        if token is not None and units.current.get() is unit:
            try:
                units.current.reset(token)
            except ValueError:  # the token belongs to another context
                units.current.set(None)
        if unit is None:
            return None
        unit.scopes -= 1
        # An inner scope's exception is the outer body's to handle, unless
        # the outer scope has closed already.
        if token is not None or not unit.outer_open:
            unit.failed = unit.failed or _failed(exc)
        if token is not None:
            unit.outer_open = False
        if unit.scopes or not unit.active or unit.started_by_signal:
            return None  # not over yet, or a runner's to end
        return unit


def _failed(exc: BaseException | None) -> bool:
    # A generator closed early (a consumer's break) ends its unit normally.
    return exc is not None and not isinstance(exc, GeneratorExit)


def _start(unit: Unit) -> None:
    """Send ``unit``'s task_started, in the thread of its connections; the
    app's receiver takes the unit from ``handed_over``. If sending fails,
    the unit is over: nothing leaves its thread inside a unit."""
    users = units.here()
    previous, users.handed_over = users.handed_over, unit
    try:
        if only_app_receiver(task_started, STARTED_UID):
            boundaries.start_unit(unit.strategy, unit)
        else:
            task_started.send(unit.sender, strategy=unit.strategy)
    except BaseException:
        unit.end()
        raise
    finally:
        users.handed_over = previous


def _finish(unit: Unit) -> None:
    """Send ``unit``'s task_finished, in the thread of its connections. If a
    receiver that runs before the app's raises, clean up all the same."""
    users = units.here()
    previous, users.handed_over = users.handed_over, unit
    try:
        if only_app_receiver(task_finished, FINISHED_UID):
            boundaries.finish_unit(unit.failed, unit.strategy, unit)
        else:
            task_finished.send(unit.sender, failed=unit.failed, strategy=unit.strategy)
    except BaseException:
        if unit.active:  # the app's receiver did not get to run
            try:
                boundaries.finish_unit(unit.failed, unit.strategy, unit)
            except Exception:
                logger.exception("Cleaning up after a unit of work failed.")
        raise
    finally:
        users.handed_over = previous
        unit.end()


def _check_decorated(func: Any) -> None:
    if isinstance(func, str) or not callable(func):
        raise TypeError(
            f"task_scope got {func!r} ({type(func).__name__}) as a positional "
            "argument, which must be the function to decorate; its options are "
            f"keyword arguments only. For a strategy: task_scope(strategy={func!r})."
        )


def _retry(
    func: Callable[..., Any], exc: Exception, attempt: int, allowed: int
) -> bool:
    """Whether to run ``func`` again after it raised ``exc`` on ``attempt``."""
    if attempt > allowed or not is_disconnect(exc):
        return False
    logger.warning(
        "%s lost its database connection (%s: %s); running it again, retry %d of %d.",
        getattr(func, "__qualname__", repr(func)),
        type(exc).__name__,
        exc,
        attempt,
        allowed,
    )
    return True


def _unless_failed(exc: BaseException | None) -> None:
    """Called in the handler of an error of the cleanup: let it through,
    unless the body already failed: then log it, and the body's own
    exception goes on unchanged."""
    if exc is None:
        raise  # the error being handled
    logger.exception("Cleaning up after a failed unit of work failed too.")


@overload
def task_scope(func: F, /) -> F: ...


@overload
def task_scope(
    *,
    strategy: StrategySpec | None = None,
    sender: Any = None,
    retry_on_disconnect: int = 0,
) -> TaskScope: ...


def task_scope(
    func: F | None = None,
    /,
    *,
    strategy: StrategySpec | None = None,
    sender: Any = None,
    retry_on_disconnect: int = 0,
) -> F | TaskScope:
    """Run a unit of work: ``with task_scope():``, ``async with task_scope():``,
    ``@task_scope`` or ``@task_scope(strategy="close_all")``.

    ``strategy`` overrides TASK_DB for this unit, for every database alias.
    ``sender`` is passed to the signals (by default, the decorated function).
    ``retry_on_disconnect``, for a decorated function that is idempotent
    only: run it again, up to that many times, when it fails because the
    database connection was lost (see is_disconnect), unless it was called
    inside an atomic block.
    """
    if func is not None:
        _check_decorated(func)
    scope = TaskScope(
        strategy=strategy, sender=sender, retry_on_disconnect=retry_on_disconnect
    )
    return scope if func is None else scope(func)
