"""Which units of work are running, and where.

A unit belongs to the thread whose database connections it manages and, in
asyncio, to the task that runs it. A scope nested in the same thread and task
inside a running unit is *inner*: it is part of that unit. A scope in another
thread is a unit of its own, even when it runs in a context copied from a
unit (``asyncio.to_thread``, ``sync_to_async(thread_sensitive=False)``,
``contextvars.copy_context().run``), because its connections are that
thread's.

Several units can share one thread's connections at the same time: the
concurrent async units of an event loop all run their queries in the thread
of ``sync_to_async(thread_sensitive=True)``. The connections are prepared
when the first of them starts and cleaned up when the last one ends.

A unit ends once, whatever order units end in and whichever thread ends it
(a generator closed from another thread): its thread is then free of it, and
nothing that goes wrong in a boundary leaves a thread inside a unit.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from contextvars import ContextVar
from typing import Any

from django_task_db import metrics

_get_running_loop = asyncio._get_running_loop


def current_task() -> asyncio.Task[Any] | None:
    """The asyncio task running in this thread, or None."""
    loop = _get_running_loop()
    return None if loop is None else asyncio.current_task(loop)


class Unit:
    """One unit of work. ``thread`` is the ident of the thread whose
    connections it manages (set when it starts there), ``task`` the asyncio
    task that runs it (None for synchronous code)."""

    # Class attributes are the defaults: a unit sets only what differs
    # (a boundary creates one, and each attribute set costs).
    active = True
    # Sent by a runner's own task_started, not by task_scope.
    started_by_signal = False
    # The units of the thread it started in (see ThreadUnits).
    users: ThreadUnits | None = None
    # For a unit of task_scope: how many of its scopes (its own and the
    # inner ones) are still open, and what its task_finished will say. It
    # ends when the last one closes, in whatever order they close
    # (generators).
    scopes = 0
    sender: Any = None
    strategy: Any = None
    failed = False
    outer_open = True

    def __init__(self, task: asyncio.Task[Any] | None, thread: int | None = None):
        self.thread = thread
        self.task = task

    def end(self) -> None:
        """End the unit wherever it runs; ending it again does nothing."""
        if self.active and self.users is not None:
            self.users.remove(self)
        self.active = False

    def encloses_sync_code(self) -> bool:
        """Whether synchronous code running now is part of this unit."""
        if not self.active or self.thread != threading.get_ident():
            return False
        task = current_task()
        return self.task is None or task is None or task is self.task

    def encloses_async_code(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether coroutine code running now in ``task`` is part of this unit."""
        return self.active and task is not None and self.task is task


class ThreadUnits:
    """The units running on one thread's connections, and what the first of
    them found there. Weak, so a unit that never ended because its scope was
    lost (a coroutine destroyed mid-unit) does not hold the thread."""

    __slots__ = (
        "_units",
        "by_signal",
        "ended",
        "kept",
        "handed_over",
        "counts",
        "__weakref__",
    )

    def __init__(self) -> None:
        self._units: list[weakref.ref[Unit]] = []
        # The latest unit started by a runner's own signal, held here: such
        # a unit has no scope to keep it alive.
        self.by_signal: Unit | None = None
        # The (default strategy, per-alias strategies, failed) of each unit
        # that ended while others still ran: the last one to end cleans up
        # for them too.
        self.ended: list[tuple[Any, Any, bool]] = []
        # Aliases the caller was using when the first unit started.
        self.kept: set[str] = set()
        # The unit task_scope is starting or finishing here, for the app's
        # receivers of task_started and task_finished, which run in the
        # thread of the connections (for an async scope, in sync_to_async's).
        self.handed_over: Unit | None = None
        # What this thread's boundaries did, for metrics.snapshot(): written
        # here only, where the boundaries already have this object at hand.
        self.counts = metrics.thread_counts(self)

    def running(self) -> list[Unit]:
        units = [unit for ref in self._units if (unit := ref()) is not None]
        if len(units) != len(self._units):
            self._units = [weakref.ref(unit) for unit in units]
        return units

    def add(self, unit: Unit) -> bool:
        """Register ``unit``; return whether it is the only one running."""
        alone = not self._units or not self.running()
        self._units.append(weakref.ref(unit))
        unit.users = self
        return alone

    def remove(self, unit: Unit) -> bool:
        """Forget ``unit``; return whether no unit is running any more."""
        unit.active = False
        if self.by_signal is unit:
            self.by_signal = None
        refs = self._units
        if len(refs) == 1 and refs[0]() is unit:
            self._units = []
        else:
            self._units = [ref for ref in refs if ref() not in (unit, None)]
        return not self._units


_local = threading.local()


def here() -> ThreadUnits:
    """The units of this thread (of this greenlet, under gevent)."""
    users: ThreadUnits | None = _local.__dict__.get("units")
    if users is None:
        users = _local.units = ThreadUnits()
    return users


# The unit whose body runs in this context: set by task_scope and by a
# runner's task_started, and copied with the context, hence the checks of
# Unit.encloses_*.
current: ContextVar[Unit | None] = ContextVar("django_task_db_unit", default=None)


def in_unit() -> bool:
    """Whether the code running now is inside a unit of work."""
    unit = current.get()
    if unit is None:
        return False
    task = current_task()
    return unit.encloses_async_code(task) or unit.encloses_sync_code()


def forget_after_fork() -> None:
    """In a forked child: no unit of the parent runs here."""
    unit = current.get()
    if unit is not None:
        unit.active = False
        current.set(None)
    for unit in here().running():
        unit.active = False
    _local.units = ThreadUnits()
