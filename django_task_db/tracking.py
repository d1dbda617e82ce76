"""The connections each thread has open, and what the caller holds on them.

Fed by Django's ``connection_created``, which is sent in the thread (or
greenlet) that opens the connection: a boundary looks at the connections of
its own thread only, never at other threads' aliases.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary, WeakSet

from django.db import connections

from django_task_db import forks

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

_local = threading.local()

# The cursors of chunked reads (QuerySet.iterator()) not closed yet, by
# connection. Weak both ways: a cursor nobody refers to any more reads
# nothing.
_reads: WeakKeyDictionary[BaseDatabaseWrapper, WeakSet[Any]] = WeakKeyDictionary()


def track(*, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    """Receiver of Django's connection_created."""
    try:
        opened: dict[str, BaseDatabaseWrapper] = _local.opened
    except AttributeError:
        opened = _local.opened = {}
    opened[connection.alias] = connection
    forks.remember(connection)
    if "chunked_cursor" not in connection.__dict__:
        _watch_chunked_reads(connection)


def track_open_connections() -> None:
    """Track the connections this thread opened before the app was ready."""
    for connection in connections.all(initialized_only=True):
        if connection.connection is not None:
            track(connection=connection)


def open_connections() -> list[BaseDatabaseWrapper]:
    """This thread's open connections."""
    opened: dict[str, BaseDatabaseWrapper] | None = getattr(_local, "opened", None)
    if not opened:
        return []
    found = []
    for alias, connection in list(opened.items()):
        if connection.connection is None:
            del opened[alias]  # connection_created adds it again if it reopens
        else:
            found.append(connection)
    return found


ATOMIC = "it is inside an atomic block"
TRANSACTION = "autocommit is off: a transaction is open on it"
READ = "a chunked read (QuerySet.iterator()) is in progress on it"


def caller_holds(connection: BaseDatabaseWrapper) -> str | None:
    """What the caller is still using on ``connection``, in words, or None:
    an atomic block, a transaction begun with autocommit turned off, or a
    chunked read (``QuerySet.iterator()``, a server-side cursor on
    PostgreSQL). Closing the connection would lose it."""
    if connection.in_atomic_block:
        return ATOMIC
    if not connection.autocommit and connection.settings_dict["AUTOCOMMIT"]:
        return TRANSACTION
    if _reads.get(connection):
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
        reads = _reads.setdefault(connection, WeakSet())
        reads.add(cursor)
        cursor.close = functools.partial(
            _close_read, reads, weakref.ref(cursor), cursor.close
        )
        return cursor

    connection.chunked_cursor = watched_chunked_cursor  # type: ignore[method-assign]


def _close_read(
    reads: WeakSet[Any], cursor: weakref.ref[Any], close: Callable[[], None]
) -> None:
    target = cursor()
    if target is not None:
        reads.discard(target)
    close()


def forget_after_fork() -> None:
    _local.opened = {}
