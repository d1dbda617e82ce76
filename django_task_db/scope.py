from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextvars import Token
from types import TracebackType
from typing import Any, TypeVar, overload

from asgiref.sync import sync_to_async

from django_task_db.boundaries import in_unit
from django_task_db.conf import StrategySpec
from django_task_db.signals import task_finished, task_started

F = TypeVar("F", bound=Callable[..., Any])


class TaskScope:
    """A unit of work: fires task_started on entry and task_finished on exit.

    Only the outermost scope of a thread (or asyncio task) acts; inner ones,
    and scopes inside a unit started by a runner's own signals, run their
    body and nothing else. The body's exception is re-raised unchanged.
    """

    def __init__(self, *, strategy: StrategySpec | None = None, sender: Any = None):
        self.strategy = strategy
        self.sender = sender
        self._token: Token[bool] | None = None

    def __enter__(self) -> None:
        if in_unit.get():
            return
        self._token = in_unit.set(True)
        try:
            task_started.send(self.sender, strategy=self.strategy)
        except BaseException:
            self._reset()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._token is None:
            return
        try:
            task_finished.send(
                self.sender, failed=exc_type is not None, strategy=self.strategy
            )
        finally:
            self._reset()

    async def __aenter__(self) -> None:
        # Django's synchronous connections live in the thread that
        # sync_to_async(thread_sensitive=True) runs in: clean up there.
        if in_unit.get():
            return
        self._token = in_unit.set(True)
        try:
            await sync_to_async(task_started.send, thread_sensitive=True)(
                self.sender, strategy=self.strategy
            )
        except BaseException:
            self._reset()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._token is None:
            return
        try:
            await sync_to_async(task_finished.send, thread_sensitive=True)(
                self.sender, failed=exc_type is not None, strategy=self.strategy
            )
        finally:
            self._reset()

    def __call__(self, func: F) -> F:
        """Decorate ``func`` (a function or a coroutine function) so that each
        call runs in a scope of its own."""
        sender = func if self.sender is None else self.sender
        strategy = self.strategy

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                async with TaskScope(strategy=strategy, sender=sender):
                    return await func(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            with TaskScope(strategy=strategy, sender=sender):
                return func(*args, **kwargs)

        return run  # type: ignore[return-value]

    def _reset(self) -> None:
        if self._token is not None:
            in_unit.reset(self._token)
            self._token = None


@overload
def task_scope(func: F, /) -> F: ...


@overload
def task_scope(
    *, strategy: StrategySpec | None = None, sender: Any = None
) -> TaskScope: ...


def task_scope(
    func: F | None = None,
    /,
    *,
    strategy: StrategySpec | None = None,
    sender: Any = None,
) -> F | TaskScope:
    """Run a unit of work: ``with task_scope():``, ``async with task_scope():``,
    ``@task_scope`` or ``@task_scope(strategy="close_all")``.

    ``strategy`` overrides TASK_DB for this unit, for every database alias.
    ``sender`` is passed to the signals (by default, the decorated function).
    """
    scope = TaskScope(strategy=strategy, sender=sender)
    return scope if func is None else scope(func)
