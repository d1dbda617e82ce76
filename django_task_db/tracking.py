"""The connections each thread has open, and what the caller holds on them.

Fed by Django's ``connection_created``, which is sent in the thread (or
greenlet) that opens the connection: a boundary looks at the connections of
its own thread only, never at other threads' aliases.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from weakref import WeakSet

from django.db import Error as DatabaseError
from django.db import connections

from django_task_db import conf, forks, metrics, signals, units

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger("django_task_db")

_local = threading.local()

# The attribute of a connection that holds the cursors of its chunked reads
# (QuerySet.iterator()) not closed yet, weakly: a cursor nobody refers to
# any more reads nothing.
_READS = "_django_task_db_reads"

# The attribute of a connection that a unit found open and counted as reused
# (metrics' ``reused``): the number of this thread's units that had ended
# then, so that a replacement in that same unit takes the reuse back.
REUSED_IN = "_django_task_db_reused_in"


class _Opened(dict[str, "BaseDatabaseWrapper"]):
    """One thread's (one greenlet's) connections, by alias. Dropped with the
    thread's locals when the thread ends: its connections are closed then,
    not whenever the garbage collector gets to them (Django's connection
    objects are in reference cycles)."""

    def __init__(self) -> None:
        super().__init__()
        self.pid = os.getpid()

    def __del__(self) -> None:
        # A forked child drops the parent's other threads, and their locals
        # with them: those connections are the parent's, not to be closed.
        if sys.is_finalizing() or os.getpid() != self.pid:
            return
        for connection in self.values():
            if connection.connection is None:
                continue
            try:
                # The thread is ending: no other code can use these now.
                connection.inc_thread_sharing()
                connection.close()
            except Exception as exc:  # no exception may leave __del__
                logger.info(
                    "Closing database connection %r of an ending thread failed: %s: %s",
                    connection.alias,
                    type(exc).__name__,
                    exc,
                )
            else:
                signals.send_closed(connection, "thread_ended")


def track(*, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    """Receiver of Django's connection_created."""
    try:
        opened: _Opened = _local.opened
    except AttributeError:
        opened = _local.opened = _Opened()
    opened[connection.alias] = connection
    metrics.count_opened(connection.alias)
    reused_in = vars(connection).pop(REUSED_IN, None)
    if reused_in is not None:
        counts = units.here().counts
        if reused_in == counts.units:  # the unit that counted it still runs
            counts.reused -= 1
    vars(connection).pop(_READS, None)  # a new driver connection reads nothing
    forks.remember(connection)
    if "chunked_cursor" not in connection.__dict__:
        _watch_chunked_reads(connection)
        _watch_idle_time(connection)


def track_open_connections() -> None:
    """Track the connections this thread opened before the app was ready
    (those connection_created did not bring to track() already)."""
    tracked = _local.__dict__.get("opened") or {}
    for connection in connections.all(initialized_only=True):
        if connection.connection is None or tracked.get(connection.alias) is connection:
            continue
        track(connection=connection)


def open_connections() -> tuple[BaseDatabaseWrapper, ...]:
    """This thread's open connections."""
    # Not getattr(): an attribute that is missing costs an exception.
    opened: _Opened | None = _local.__dict__.get("opened")
    if not opened:
        return ()
    found = tuple(opened.values())
    for connection in found:
        if connection.connection is None:
            # connection_created adds them again if they reopen.
            for alias in [a for a, c in opened.items() if c.connection is None]:
                del opened[alias]
            return tuple(opened.values())
    return found


ATOMIC = "it is inside an atomic block"
TRANSACTION = "autocommit is off: a transaction is open on it"
READ = "a chunked read (QuerySet.iterator()) is in progress on it"


def in_greenlet() -> bool:
    """Whether this code runs in a greenlet that will end (not the main
    one) with threading monkey-patched by gevent or eventlet: Django's
    connections are then that greenlet's own."""
    if "gevent.monkey" not in sys.modules and "eventlet.patcher" not in sys.modules:
        return False
    monkey = sys.modules.get("gevent.monkey")
    patched = monkey is not None and monkey.is_module_patched("threading")
    if not patched:
        patcher = sys.modules.get("eventlet.patcher")
        patched = patcher is not None and patcher.is_monkey_patched("thread")
    if not patched:
        return False
    import greenlet

    return greenlet.getcurrent().parent is not None


def caller_holds(connection: BaseDatabaseWrapper) -> str | None:
    """What the caller is still using on ``connection``, in words, or None:
    an atomic block, a transaction begun with autocommit turned off, or a
    chunked read (``QuerySet.iterator()``, a server-side cursor on
    PostgreSQL). Closing the connection would lose it."""
    if connection.in_atomic_block:
        return ATOMIC
    if not connection.autocommit and connection.settings_dict["AUTOCOMMIT"]:
        return TRANSACTION
    if vars(connection).get(_READS):
        return READ
    return None


def _watch_chunked_reads(connection: BaseDatabaseWrapper) -> None:
    # Django reads QuerySet.iterator() through chunked_cursor() and closes
    # that cursor when the iteration ends (cursor_iter). Weak references
    # only, so the connection and the cursor make no reference cycle.
    chunked_cursor = type(connection).chunked_cursor
    owner = weakref.ref(connection)

    def watched_chunked_cursor() -> Any:
        connection = owner()
        assert connection is not None  # it is calling this
        cursor: Any = chunked_cursor(connection)
        reads = vars(connection).get(_READS)
        if reads is None:
            reads = vars(connection)[_READS] = WeakSet()
        reads.add(cursor)
        cursor.close = functools.partial(
            _close_read, reads, weakref.ref(cursor), cursor.close
        )
        return cursor

    connection.chunked_cursor = watched_chunked_cursor  # type: ignore[method-assign]


def _watch_idle_time(connection: BaseDatabaseWrapper) -> None:
    # Django calls ensure_connection() before every query (and before
    # setting autocommit): the place to check a connection that idled.
    ensure_connection = type(connection).ensure_connection
    owner = weakref.ref(connection)
    # When the driver connection was last used, and which one it was
    # (weakly: a connection Django dropped must be free to go), so that a
    # connection that connect() is still setting up is not checked.
    # Installed at the end of connect(): the connection is in use from now.
    last_use: list[Any] = [time.monotonic(), _weak(connection.connection)]

    def watched_ensure_connection() -> None:
        connection = owner()
        assert connection is not None  # it is calling this
        raw = connection.connection
        now = time.monotonic()
        if (
            raw is not None
            and raw is last_use[1]()
            and now - last_use[0] > conf.idle_limit()
        ):
            _check(connection)
        ensure_connection(connection)
        if connection.connection is raw:
            last_use[0] = now
        else:
            last_use[:] = time.monotonic(), _weak(connection.connection)

    connection.ensure_connection = watched_ensure_connection  # type: ignore[method-assign]


def _no_connection() -> None:
    return None


def _weak(raw: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(raw)
    except TypeError:  # sqlite3: no server to lose, nothing to check
        return _no_connection


def _check(connection: BaseDatabaseWrapper) -> None:
    """Replace ``connection`` if it died while idle, unless the caller holds
    something on it that a new connection would not have."""
    if caller_holds(connection) is not None or connection.is_usable():
        return
    logger.info(
        "Database connection %r failed its health check after idling; replacing it.",
        connection.alias,
    )
    with contextlib.suppress(DatabaseError):
        connection.close()
    connection.connection = None
    signals.send_closed(connection, "health_check")


def _close_read(
    reads: WeakSet[Any], cursor: weakref.ref[Any], close: Callable[[], None]
) -> None:
    target = cursor()
    if target is not None:
        reads.discard(target)
    close()


def forget_after_fork() -> None:
    # The parent's connections, discarded (or left) by forks: not ours to close.
    opened = getattr(_local, "opened", None)
    if opened is not None:
        opened.clear()
