"""A real Celery worker in a thread of the test's process, that never closes
the test's database connections.

Celery's ``start_worker`` (and its ``celery_worker`` pytest fixture) starts
the worker in the test's thread, where Celery's Django fixup closes every
connection (its ``close_database()`` at worker init): inside pytest-django's
``django_db`` or a ``TestCase`` that is the connection of the test's
transaction, and the test's next query fails with *connection already
closed*. Imported only when used: it needs Celery.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from django.db import connections

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = ["SharedConnectionInUse", "celery_worker"]


# Seconds a test's query waits for a task that is finishing (its result is
# stored, its task_postrun not sent yet) before SharedConnectionInUse.
FINISHING = 2.0


class SharedConnectionInUse(RuntimeError):
    """The test queried a connection it shares with a task still running."""


@contextmanager
def celery_worker(
    app: Any, *, share_connections: bool | None = None, **kwargs: Any
) -> Iterator[Any]:
    """Run a worker of ``app`` (Celery's ``start_worker``, solo pool, no ping
    task) in a thread until the block ends; yield its ``WorkController``.
    ``kwargs`` go to ``start_worker`` (``queues``, ``shutdown_timeout``...).

    No ``close()`` from the worker (Celery's fixup, this package's bridge, a
    receiver of yours) reaches the connections of the test's thread while
    the worker starts, runs and stops; the worker closes its own when it
    stops.

    ``share_connections`` (default: whether a connection of the test's
    thread is in an atomic block, as in ``django_db`` without
    ``transaction=True`` and in ``TestCase``): tasks run on the test's own
    connections, inside its transaction, so that they see its data, as
    Django's ``LiveServerTestCase`` does for in-memory SQLite. Then a query
    of the test's thread while a task runs raises ``SharedConnectionInUse``:
    wait for the task's result first. Otherwise (``transaction=True``,
    ``TransactionTestCase``) tasks use connections of their own, which see
    what the test committed.
    """
    from celery import signals
    from celery.contrib.testing.worker import start_worker
    from celery.worker import state

    test_thread = threading.get_ident()
    owned = list(connections.all(initialized_only=True))
    if share_connections is None:
        share_connections = any(c.in_atomic_block for c in owned)
    shared = {c.alias: c for c in owned} if share_connections else {}
    # Set while no task runs. Celery stores a task's result (which wakes
    # the test's .get()) before it sends task_postrun: a query right after
    # .get() waits for that end, up to FINISHING seconds.
    idle, stopped = threading.Event(), threading.Event()
    idle.set()
    one_query = threading.Lock()
    protected = _Protected(app, owned, test_thread)

    def before_task(**kwargs: Any) -> None:
        if threading.get_ident() != test_thread:
            for alias, connection in shared.items():
                connections[alias] = connection
            idle.clear()

    def after_task(**kwargs: Any) -> None:
        if threading.get_ident() != test_thread:
            idle.set()

    def close_own(sender: Any = None, **kwargs: Any) -> None:
        # In the worker's thread at its warm shutdown: its own connections.
        if sender is worker:
            for connection in connections.all(initialized_only=True):
                if connection not in owned:
                    connection.close()
            stopped.set()

    def guard(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if threading.get_ident() == test_thread and not idle.wait(FINISHING):
            raise SharedConnectionInUse(
                f"The test queried database alias {context['connection'].alias!r} "
                "while a Celery task was running on it (the worker shares the "
                "test's connections, inside its transaction): wait for the "
                "task's result (.get()) before the test's next query."
            )
        with one_query:
            return execute(sql, params, many, context)

    kwargs.setdefault("perform_ping_check", False)
    kwargs.setdefault("pool", "solo")
    if share_connections and kwargs["pool"] != "solo":
        raise ValueError(
            f"celery_worker(pool={kwargs['pool']!r}) with share_connections: "
            "allowed: pool='solo' (one task at a time on the test's connections)."
        )
    with ExitStack() as stack:
        for signal, receiver in (
            (signals.task_prerun, before_task),
            (signals.task_postrun, after_task),
            (signals.worker_shutdown, close_own),
        ):
            signal.connect(receiver, weak=False)
            stack.callback(signal.disconnect, receiver)
        for connection in shared.values():
            connection.inc_thread_sharing()
            stack.callback(connection.dec_thread_sharing)
            connection.execute_wrappers.append(guard)
            stack.callback(connection.execute_wrappers.remove, guard)
        stack.enter_context(protected)
        worker = stack.enter_context(start_worker(app, **kwargs))
        stack.callback(setattr, state, "should_stop", None)
        protected.starting = False
        try:
            yield worker
        finally:
            protected.starting = True
            # A warm shutdown, as on SIGTERM: worker_shutdown is sent in the
            # worker's thread (start_worker alone stops it cold).
            state.should_stop = 0
            stopped.wait(kwargs.get("shutdown_timeout", 10.0))


class _Protected:
    """While entered, ``close()`` of the test's connections does nothing
    unless the test's own code calls it: not from another thread, nor from
    the test's thread while the worker starts or stops. Celery's fixup does
    not close their sockets either (the solo pool sends
    ``worker_process_init`` in the test's thread, where the fixup closes
    every connection's file descriptor, for a forked child's sake)."""

    def __init__(self, app: Any, owned: list[BaseDatabaseWrapper], test_thread: int):
        from django_task_db.celery_bridge import _worker_fixups

        self.fixups = _worker_fixups(app)
        self.owned = owned
        self.test_thread = test_thread
        self.starting = True

    def __enter__(self) -> _Protected:
        for connection in self.owned:
            close = type(connection).close.__get__(connection)
            connection.close = self._guarded(close)  # type: ignore[method-assign]
        for fixup in self.fixups:
            close_fd = type(fixup)._maybe_close_db_fd.__get__(fixup)
            fixup._maybe_close_db_fd = self._fd_guarded(close_fd)
        return self

    def _fd_guarded(self, close_fd: Any) -> Any:
        def guarded_close_fd(connection: BaseDatabaseWrapper) -> None:
            if connection not in self.owned:
                close_fd(connection)

        return guarded_close_fd

    def _guarded(self, close: Any) -> Any:
        def guarded_close() -> None:
            if threading.get_ident() == self.test_thread and not self.starting:
                close()

        return guarded_close

    def __exit__(self, *exc_info: object) -> None:
        for connection in self.owned:
            vars(connection).pop("close", None)
        for fixup in self.fixups:
            vars(fixup).pop("_maybe_close_db_fd", None)
