from __future__ import annotations

import functools
import inspect
import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, TypeVar, overload

from asgiref.sync import iscoroutinefunction, sync_to_async

from django_task_db import boundaries
from django_task_db.boundaries import in_unit
from django_task_db.conf import StrategySpec
from django_task_db.faults import is_disconnect
from django_task_db.signals import task_finished, task_started

F = TypeVar("F", bound=Callable[..., Any])

logger = logging.getLogger("django_task_db")

# One entry per ``with`` in progress in this context (thread or asyncio task),
# innermost last: the token of the outermost, None for the others. Kept here,
# not on the scope, so one scope object may be entered again while in use.
_tokens: ContextVar[tuple[Token[bool] | None, ...]] = ContextVar(
    "django_task_db_tokens", default=()
)


class TaskScope:
    """A unit of work: fires task_started on entry and task_finished on exit.

    Only the outermost scope of a thread (or asyncio task) acts; inner ones,
    and scopes inside a unit started by a runner's own signals, run their
    body and nothing else. The body's exception is re-raised unchanged.
    """

    def __init__(
        self,
        *,
        strategy: StrategySpec | None = None,
        sender: Any = None,
        retry_on_disconnect: int = 0,
    ):
        if not isinstance(retry_on_disconnect, int) or retry_on_disconnect < 0:
            raise ValueError(
                f"retry_on_disconnect is {retry_on_disconnect!r}; allowed: a "
                "whole number of retries, 0 (the default) or more."
            )
        self.strategy = strategy
        self.sender = sender
        self.retry_on_disconnect = retry_on_disconnect

    def __enter__(self) -> None:
        self._only_decorators_retry()
        if self._push():
            try:
                task_started.send(self.sender, strategy=self.strategy)
            except BaseException:
                self._pop()
                raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._pop():
            with _unless_failed(exc):
                task_finished.send(
                    self.sender, failed=exc is not None, strategy=self.strategy
                )

    async def __aenter__(self) -> None:
        self._only_decorators_retry()
        # Django's synchronous connections live in the thread that
        # sync_to_async(thread_sensitive=True) runs in: clean up there.
        if self._push():
            try:
                await sync_to_async(task_started.send, thread_sensitive=True)(
                    self.sender, strategy=self.strategy
                )
            except BaseException:
                self._pop()
                raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._pop():
            with _unless_failed(exc):
                await sync_to_async(task_finished.send, thread_sensitive=True)(
                    self.sender, failed=exc is not None, strategy=self.strategy
                )

    def __call__(self, func: F) -> F:
        """Decorate ``func`` (a function or a coroutine function) so that each
        call runs in a scope of its own."""
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"task_scope cannot decorate the generator function {func.__name__}"
                "(): the unit would end before its body runs. Use "
                "`with task_scope():` inside it instead."
            )
        sender = func if self.sender is None else self.sender
        strategy = self.strategy
        retries = self.retry_on_disconnect

        # Retries never happen inside an outer unit (only the outermost acts)
        # nor inside an atomic block (the transaction is the caller's).
        if iscoroutinefunction(func) or iscoroutinefunction(type(func).__call__):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                in_atomic = sync_to_async(
                    boundaries.in_atomic_block, thread_sensitive=True
                )
                allowed = 0
                if retries and not in_unit.get() and not await in_atomic():
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
            if retries and not in_unit.get() and not boundaries.in_atomic_block():
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

    @staticmethod
    def _push() -> bool:
        """Enter a ``with``; return whether it is the outermost, which acts."""
        token = None if in_unit.get() else in_unit.set(True)
        _tokens.set((*_tokens.get(), token))
        return token is not None

    @staticmethod
    def _pop() -> bool:
        """Leave a ``with``; return whether it was the outermost."""
        *outer, token = _tokens.get()
        _tokens.set(tuple(outer))
        if token is None:
            return False
        in_unit.reset(token)
        return True


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


@contextmanager
def _unless_failed(exc: BaseException | None) -> Iterator[None]:
    """Let an error of the cleanup through, unless the body already failed:
    then log it, and the body's own exception goes on unchanged."""
    try:
        yield
    except Exception:
        if exc is None:
            raise
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
    scope = TaskScope(
        strategy=strategy, sender=sender, retry_on_disconnect=retry_on_disconnect
    )
    return scope if func is None else scope(func)
