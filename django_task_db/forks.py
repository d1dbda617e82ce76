"""Fork safety: a forked child drops what it inherited without network IO.

Closing an inherited connection normally would send the server a goodbye
(COM_QUIT, Terminate) on the socket the parent still uses, and the server
would hang up on the parent. So the socket's file descriptor is first pointed
at /dev/null; closing the driver's connection then tells the server nothing.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import stat
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from django_task_db import conf, signals

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger("django_task_db")

# Every connection opened since the app was imported, and every connection
# pool of Django's PostgreSQL backend, with the id of the process that opened
# it: after a fork, the child finds the parent's here, whichever thread opened
# them. A pool is kept with the dict it is registered in, its alias, and its
# driver's error class.
# A connection is kept with the identity (device, inode) of its socket, so
# that only a descriptor that is still that socket is ever touched.
_owners: WeakKeyDictionary[BaseDatabaseWrapper, tuple[int, Socket | None]] = (
    WeakKeyDictionary()
)
_pools: WeakKeyDictionary[Any, tuple[int, dict[str, Any], str, type[Exception]]] = (
    WeakKeyDictionary()
)

# What a forked child took from its parent and must never finalize (a pool's
# __del__ waits for worker threads that did not survive the fork).
_inherited: list[object] = []


Socket = tuple[int, int]


def remember(connection: BaseDatabaseWrapper) -> None:
    """Note that this process opened ``connection`` (and its pool)."""
    pid = os.getpid()
    _owners[connection] = (pid, _socket_of(connection.connection))
    if connection.vendor == "postgresql":
        # Django's PostgreSQL pools live in a class attribute, by alias.
        registry = getattr(type(connection), "_connection_pools", {})
        pool = registry.get(connection.alias)
        if pool is not None:
            error = connection.Database.Error  # type: ignore[attr-defined]
            _pools[pool] = (pid, registry, connection.alias, error)


def discard_inherited() -> None:
    """Drop the connections and connection pools that this process inherited
    from its parent, without network IO, so that the parent's keep working."""
    pid = os.getpid()
    connections_ = [
        (c, socket) for c, (owner, socket) in _snapshot(_owners) if owner != pid
    ]
    pools = [(p, info) for p, info in _snapshot(_pools) if info[0] != pid]
    if not connections_ and not pools:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for connection, socket in connections_:
            _owners.pop(connection, None)
            _discard(connection, socket, devnull)
        for pool, (_, registry, alias, error) in pools:
            _pools.pop(pool, None)
            if registry.get(alias) is pool:
                del registry[alias]
            # psycopg_pool keeps the idle connections in ``_pool``.
            for idle in list(getattr(pool, "_pool", ())):
                _detach(idle, _socket_of(idle), devnull, (OSError, error))
            _inherited.append(pool)
    finally:
        os.close(devnull)


def close_own_pools() -> None:
    """Close the Django connection pools this process opened."""
    pid = os.getpid()
    for pool, (owner, registry, alias, _) in _snapshot(_pools):
        # The registry is shared by the threads: the one that pops a pool
        # closes it, once.
        if owner != pid or registry.get(alias) is not pool:
            continue
        if registry.pop(alias, None) is pool:
            pool.close()


_gc_was_enabled = True


def before_fork() -> None:
    # A collection in the child before discard_inherited has run would
    # finalize inherited connections that only other threads referred to,
    # and their drivers would say goodbye on the parent's sockets.
    global _gc_was_enabled
    _gc_was_enabled = gc.isenabled()
    gc.disable()


def after_fork_in_parent() -> None:
    if _gc_was_enabled:
        gc.enable()


def after_fork_in_child() -> None:
    from django_task_db import tracking, units

    # The child runs none of the parent's units: its scopes act.
    units.forget_after_fork()
    tracking.forget_after_fork()
    try:
        if fork_safety():
            discard_inherited()
    finally:
        after_fork_in_parent()


def fork_safety() -> bool:
    """TASK_DB["FORK_SAFETY"]; True, after logging why, when it is invalid."""
    try:
        return conf.get("FORK_SAFETY") is True
    except conf.SettingError as exc:
        logger.error("%s Discarding inherited connections all the same.", exc)
        return True


def _snapshot(weak: WeakKeyDictionary[Any, Any]) -> list[tuple[Any, Any]]:
    """The live items of a weak dict, even while other threads add to it."""
    return [
        (key, value)
        for ref, value in weak.data.copy().items()  # type: ignore[attr-defined]
        if (key := ref()) is not None
    ]


def _socket_of(raw: Any) -> Socket | None:
    """The identity of a driver connection's socket, or None (no socket:
    SQLite; or closed)."""
    try:
        status = os.fstat(raw.fileno())
    except Exception:  # no fileno (SQLite), or the driver's error: closed
        return None
    return (status.st_dev, status.st_ino) if stat.S_ISSOCK(status.st_mode) else None


def _discard(
    connection: BaseDatabaseWrapper, socket: Socket | None, devnull: int
) -> None:
    raw = connection.connection
    if raw is None:
        return
    memory = getattr(connection, "is_in_memory_db", None)
    if memory is not None and memory():
        return  # the child's own copy of the database: nothing to protect
    error = connection.Database.Error  # type: ignore[attr-defined]
    _detach(raw, socket, devnull, (AttributeError, OSError, error))
    if connection.in_atomic_block:
        logger.warning(
            "Database connection %r: this process was forked inside an atomic "
            "block. The parent's transaction is not this process's: the "
            "connection starts afresh here, outside any atomic block.",
            connection.alias,
        )
        connection.in_atomic_block = False
        connection.closed_in_transaction = False
    connection.connection = None
    signals.send_closed(connection, "inherited")


def _detach(
    raw: Any,
    socket: Socket | None,
    devnull: int,
    errors: tuple[type[BaseException], ...],
) -> None:
    # Kept referenced, never finalized: a driver may say goodbye then too.
    _inherited.append(raw)
    try:
        fd = raw.fileno()
    except errors:
        return  # no descriptor (SQLite): dropping it is all it takes
    if socket is None or _socket_of(raw) != socket:
        # No longer the socket it was (mysqlclient keeps the number of a
        # socket its library closed when the server hung up, and the number
        # may now be another file's): neither pointed elsewhere nor closed.
        return
    os.dup2(devnull, fd)
    with contextlib.suppress(*errors):
        raw.close()
