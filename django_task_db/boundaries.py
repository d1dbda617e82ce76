"""What happens to database connections at the boundaries of a unit of work.

Everything here acts on the connections of the calling thread that are
already open: a connection is never opened in order to be closed.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from django.core.cache import close_caches
from django.db import Error as DatabaseError
from django.db import connections
from django.utils.connection import ConnectionDoesNotExist

from django_task_db import conf, strategies
from django_task_db.signals import connection_closed

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger("django_task_db")

# True between task_started and task_finished, so that an inner task_scope
# knows it is not the outermost one.
in_unit: ContextVar[bool] = ContextVar("django_task_db_in_unit", default=False)

# Aliases left alone at "start" because of an atomic block, so that
# "finish" does not warn about them a second time.
_local = threading.local()

# Every connection opened since the app was ready, and every connection pool
# of Django's PostgreSQL backend, with the id of the process that opened it:
# after a fork, the child finds the parent's here, whichever thread opened
# them. A pool is kept with the dict it is registered in, its alias, and its
# driver's error class.
_owners: WeakKeyDictionary[BaseDatabaseWrapper, int] = WeakKeyDictionary()
_pools: WeakKeyDictionary[Any, tuple[int, dict[str, Any], str, type[Exception]]] = (
    WeakKeyDictionary()
)

# The aliases connected so far in this process, in order: a set.
_aliases: dict[str, None] = {}

# What a forked child took from its parent and must never finalize (a pool's
# __del__ waits for worker threads that did not survive the fork).
_inherited: list[object] = []


def start_unit(strategy: conf.StrategySpec | None = None) -> None:
    """Prepare this thread's open connections for a unit of work."""
    default, per_alias = conf.strategies_for(strategy)
    health_checks = conf.get("HEALTH_CHECKS")
    in_unit.set(True)
    for connection in _open_connections():
        chosen = per_alias.get(connection.alias, default)
        if _left_in_atomic_block(connection, "start", chosen):
            continue
        if health_checks:
            # Django pings before the next query when these are set (and
            # close_if_unusable_or_obsolete, which pings itself after an
            # error, sets health_check_done): at most one ping per unit, and
            # none for a connection the unit does not use.
            connection.health_check_enabled = True  # type: ignore[attr-defined]
            connection.health_check_done = False  # type: ignore[attr-defined]
        _act(connection, "start", chosen)


def finish_unit(
    failed: bool = False, strategy: conf.StrategySpec | None = None
) -> None:
    """Clean up this thread's open connections after a unit of work."""
    default, per_alias = conf.strategies_for(strategy)
    close_on_failure = failed and conf.get("CLOSE_ON_FAILURE")
    close_caches_too = conf.get("CLOSE_CACHES")
    in_unit.set(False)
    for connection in _open_connections():
        chosen: conf.Strategy
        if close_on_failure:
            chosen, reason = _close_after_failure, "failure"
        else:
            chosen, reason = per_alias.get(connection.alias, default), None
        if not _left_in_atomic_block(connection, "finish", chosen):
            _act(connection, "finish", chosen, reason)
    if close_caches_too:
        try:
            close_caches()
        except Exception:
            logger.exception("Closing the cache connections failed.")


def stop_worker() -> None:
    """Close this thread's connections and this process's connection pools."""
    discard_inherited()
    in_unit.set(False)
    for connection in _open_connections():
        if not _left_in_atomic_block(connection, "stop", strategies.close_all):
            _act(connection, "finish", strategies.close_all, "worker_stopping")
    pid = os.getpid()
    for pool, (owner, registry, alias, _) in _snapshot(_pools):
        # The registry is shared by the threads: the one that pops a pool
        # closes it, once.
        if owner != pid or registry.get(alias) is not pool:
            continue
        if registry.pop(alias, None) is pool:
            pool.close()


def _close_after_failure(connection: BaseDatabaseWrapper, phase: conf.Phase) -> None:
    # A query interrupted on the client (a Celery soft time limit) goes on
    # running on a PostgreSQL server, holding its locks, after the client
    # closes its connection: cancel it first. psycopg 3 says it is running.
    info = getattr(connection.connection, "info", None)
    status = getattr(getattr(info, "transaction_status", None), "name", None)
    if status == "ACTIVE":
        cancel = getattr(connection.connection, "cancel_safe", None)
        with contextlib.suppress(DatabaseError, connection.Database.Error):  # type: ignore[attr-defined]
            (cancel or connection.connection.cancel)()
    connection.close()


def in_atomic_block() -> bool:
    """Whether a connection of this thread is inside an atomic block."""
    return any(c.in_atomic_block for c in connections.all(initialized_only=True))


def close_broken() -> None:
    """Close this thread's connections that errors left unusable (outside
    atomic blocks): Django pings a connection that had an error."""
    for connection in _open_connections():
        if not connection.in_atomic_block:
            _act(connection, "finish", strategies.close_old, "failure")


def discard_inherited() -> None:
    """Drop the connections and connection pools that this process inherited
    from its parent, without network IO, so that the parent's keep working.

    Closing an inherited connection normally would send the server a goodbye
    on the socket the parent still uses, and the server would hang up on the
    parent. So the socket's file descriptor is first pointed at /dev/null;
    closing the driver's connection then tells the server nothing.
    """
    pid = os.getpid()
    connections_ = [c for c, owner in _snapshot(_owners) if owner != pid]
    pools = [(p, info) for p, info in _snapshot(_pools) if info[0] != pid]
    if not connections_ and not pools:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for connection in connections_:
            _owners.pop(connection, None)
            _discard(connection, devnull)
        for pool, (_, registry, alias, error) in pools:
            _pools.pop(pool, None)
            if registry.get(alias) is pool:
                del registry[alias]
            # psycopg_pool keeps the idle connections in ``_pool``.
            for idle in list(getattr(pool, "_pool", ())):
                _detach(idle, devnull, (OSError, error))
            _inherited.append(pool)
    finally:
        os.close(devnull)


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
    # The child is not inside the parent's unit of work: its scopes act.
    in_unit.set(False)
    try:
        enabled = conf.get("FORK_SAFETY")
    except conf.SettingError as exc:
        logger.error("%s Discarding inherited connections all the same.", exc)
        enabled = True
    try:
        if enabled:
            discard_inherited()
    finally:
        after_fork_in_parent()


def track(*, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    """Receiver of Django's connection_created: remember who opened it."""
    pid = os.getpid()
    _owners[connection] = pid
    _aliases[connection.alias] = None
    if connection.vendor == "postgresql":
        # Django's PostgreSQL pools live in a class attribute, by alias.
        registry = getattr(type(connection), "_connection_pools", {})
        pool = registry.get(connection.alias)
        if pool is not None:
            error = connection.Database.Error  # type: ignore[attr-defined]
            _pools[pool] = (pid, registry, connection.alias, error)


def track_open_connections() -> None:
    """Track the connections this thread opened before the app was ready."""
    for connection in connections.all(initialized_only=True):
        if connection.connection is not None and connection not in _owners:
            track(connection=connection)


def _snapshot(weak: WeakKeyDictionary[Any, Any]) -> list[tuple[Any, Any]]:
    """The live items of a weak dict, even while other threads add to it."""
    return [
        (key, value)
        for ref, value in weak.data.copy().items()  # type: ignore[attr-defined]
        if (key := ref()) is not None
    ]


def _open_connections() -> list[BaseDatabaseWrapper]:
    """This thread's open connections. Only the aliases that were ever
    connected are looked at, so that a boundary costs the same however many
    aliases DATABASES has."""
    found = []
    for alias in tuple(_aliases):
        try:
            connection = connections[alias]
        except ConnectionDoesNotExist:  # DATABASES changed, as tests do
            continue
        if connection.connection is not None:
            found.append(connection)
    return found


def _left_in_atomic_block(
    connection: BaseDatabaseWrapper, phase: str, strategy: conf.Strategy
) -> bool:
    """Whether ``connection`` is inside an atomic block, so must not be
    touched; warn once per unit if the strategy would have acted."""
    warned: set[str] = _local.__dict__.setdefault("warned", set())
    if not connection.in_atomic_block:
        warned.discard(connection.alias)
        return False
    if strategy is not strategies.keep and connection.alias not in warned:
        logger.warning(
            "Database connection %r left open at %s of a unit of work: it is "
            "inside an atomic block, and closing it would lose the transaction.",
            connection.alias,
            phase,
        )
        if phase == "start":
            warned.add(connection.alias)
    elif phase != "start":
        warned.discard(connection.alias)
    return True


def _act(
    connection: BaseDatabaseWrapper,
    phase: conf.Phase,
    strategy: conf.Strategy,
    reason: str | None = None,
) -> None:
    try:
        strategy(connection, phase)
    except DatabaseError as exc:
        # Closing a connection that the server already dropped, or that is
        # already closed, fails; Django has forgotten it all the same.
        logger.info(
            "Closing database connection %r at %s failed: %s: %s",
            connection.alias,
            phase,
            type(exc).__name__,
            exc,
        )
    except Exception:
        logger.exception(
            "Strategy %r failed on database connection %r at %s.",
            _name(strategy),
            connection.alias,
            phase,
        )
    if connection.connection is None:
        _send_closed(connection, reason or _name(strategy))


def _discard(connection: BaseDatabaseWrapper, devnull: int) -> None:
    raw = connection.connection
    if raw is None:
        return
    error = connection.Database.Error  # type: ignore[attr-defined]
    _detach(raw, devnull, (AttributeError, OSError, error))
    if connection.in_atomic_block:
        connection.closed_in_transaction = True
        connection.needs_rollback = True
    else:
        connection.connection = None
    _send_closed(connection, "inherited")


def _detach(raw: Any, devnull: int, errors: tuple[type[BaseException], ...]) -> None:
    # Kept referenced, never finalized: a driver may say goodbye then too.
    _inherited.append(raw)
    try:
        fd = raw.fileno()
    except errors:
        # No descriptor to point elsewhere (PyMySQL, SQLite...): closing it
        # could still talk to the server, so it is only dropped.
        return
    os.dup2(devnull, fd)
    with contextlib.suppress(*errors):
        raw.close()


def _send_closed(connection: BaseDatabaseWrapper, reason: str) -> None:
    for receiver, result in connection_closed.send_robust(
        type(connection), alias=connection.alias, reason=reason
    ):
        if isinstance(result, Exception):
            logger.error(
                "A receiver of connection_closed, %r, raised.",
                receiver,
                exc_info=result,
            )


def _name(strategy: Callable[..., object]) -> str:
    return getattr(strategy, "__name__", repr(strategy))
