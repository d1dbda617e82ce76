"""What happens to database connections at the boundaries of a unit of work.

Everything here acts on the connections of the calling thread that are
already open: a connection is never opened in order to be closed, and a
connection the caller is still using (see tracking.caller_holds) is never
closed under it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from django.core.cache import close_caches
from django.db import Error as DatabaseError

from django_task_db import conf, forks, metrics, strategies, tracking, units
from django_task_db.signals import send_closed

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger("django_task_db")


def start_unit(
    strategy: conf.StrategySpec | None = None, unit: units.Unit | None = None
) -> units.Unit:
    """Start ``unit`` (None: the one task_scope hands over, if any, else a
    runner's own task_started) in this thread and prepare its open
    connections, unless another unit is using them."""
    config = conf.boundary()
    default, per_alias = conf.strategies_for(strategy, config)
    users = units.here()
    if unit is None:
        unit = users.handed_over
    if unit is None:
        unit = units.Unit(units.current_task())
        unit.started_by_signal = True
        if users.by_signal is not None:
            # The runner's previous unit never sent task_finished.
            users.remove(users.by_signal)
        users.by_signal = unit
        units.current.set(unit)
    unit.thread = threading.get_ident()
    if not users.add(unit):
        return unit
    if users.kept:
        users.kept = set()
    users.ended.clear()
    counts = users.counts
    for connection in tracking.open_connections():
        if connection.connection is None:  # another alias's strategy closed it
            continue
        chosen = per_alias.get(connection.alias, default)
        held = tracking.caller_holds(connection)
        if held is not None:
            users.kept.add(connection.alias)
            counts.skipped += 1
            _warn_left_open(connection, "start", held, chosen)
            continue
        if config.ping_every_unit:
            # Django pings before the next query when these are set (and
            # close_if_unusable_or_obsolete, which pings itself after an
            # error, sets health_check_done): at most one ping per unit, and
            # none for a connection the unit does not use. Otherwise
            # tracking checks a connection that idled, at its next use.
            connection.health_check_enabled = True  # type: ignore[attr-defined]
            connection.health_check_done = False  # type: ignore[attr-defined]
        else:
            connection.health_check_enabled = connection.settings_dict[  # type: ignore[attr-defined]
                "CONN_HEALTH_CHECKS"
            ]
        _act(connection, "start", chosen)
        if connection.connection is not None:
            counts.reused += 1
            # Taken back if the unit replaces it (see tracking.track).
            connection.__dict__[tracking.REUSED_IN] = counts.units
    return unit


def finish_unit(
    failed: bool = False,
    strategy: conf.StrategySpec | None = None,
    unit: units.Unit | None = None,
) -> None:
    """End ``unit`` (None: the one task_scope hands over, if any, else the
    runner's unit of this thread) and clean up this thread's open
    connections, if no other unit is using them."""
    users = units.here()
    counts = users.counts
    counts.units += 1
    if failed:
        counts.failed_units += 1
    if unit is None:
        unit = users.handed_over
    if unit is None:
        # It stays units.current, ended: no code is inside it any more.
        unit = users.by_signal
    if unit is None:
        last = not users.running()
    else:
        owner = unit.users or users
        last = owner.remove(unit)
        if owner is not users:
            # Ended from another thread (a generator closed there): the
            # unit's own thread cleans up at its next unit's start.
            return
    # The unit has ended before anything can fail.
    config = conf.boundary()
    finishing = conf.strategies_for(strategy, config)
    if not last:
        # The last unit to end cleans up for this one too.
        users.ended.append((*finishing, failed))
        return
    ended = [finishing]
    if users.ended:
        failed = failed or any(failed for _, _, failed in users.ended)
        ended += [(default, per_alias) for default, per_alias, _ in users.ended]
        users.ended = []
    if tracking.in_greenlet():
        # Its connections die with the greenlet: close them with the unit
        # (what Celery's own fixup does for gevent and eventlet pools).
        ended.append((strategies.close_all, {}))
    kept = users.kept
    if kept:
        users.kept = set()
    close_on_failure = failed and config.close_on_failure
    for connection in tracking.open_connections():
        if connection.connection is None:  # another alias's strategy closed it
            continue
        chosen: list[conf.Strategy]
        if close_on_failure:
            chosen, reason = [_close_after_failure], "failure"
        elif _still_running(connection):
            chosen, reason = [_close_after_failure], "query_running"
        else:
            chosen, reason = _strategies_of(connection.alias, ended), None
        held = tracking.caller_holds(connection)
        if held is tracking.TRANSACTION and connection.alias not in kept:
            if reason is None:  # closing after a failure rolls back too
                _roll_back_left_open(connection)
        elif held is not None:
            counts.skipped += 1
            if connection.alias not in kept:
                _warn_left_open(connection, "finish", held, chosen[-1])
            continue
        for each in chosen:
            if connection.connection is not None:
                _act(connection, "finish", each, reason)
    if config.close_caches:
        try:
            close_caches()
        except Exception:
            logger.exception("Closing the cache connections failed.")


def _strategies_of(
    alias: str, ended: list[tuple[conf.Strategy, dict[str, conf.Strategy]]]
) -> list[conf.Strategy]:
    """The finish strategies of the units that ended, for ``alias``, each once."""
    if len(ended) == 1:  # the usual case, and a boundary's hot path
        default, per_alias = ended[0]
        return [per_alias.get(alias, default)]
    chosen: list[conf.Strategy] = []
    for default, per_alias in ended:
        strategy = per_alias.get(alias, default)
        if all(strategy is not other for other in chosen):
            chosen.append(strategy)
    return chosen


def stop_worker() -> None:
    """Close this thread's connections and this process's connection pools."""
    forks.discard_inherited()
    users = units.here()
    for unit in users.running():
        users.remove(unit)
    for connection in tracking.open_connections():
        held = tracking.caller_holds(connection)
        if held is not None:
            users.counts.skipped += 1
            _warn_left_open(connection, "stop", held, strategies.close_all)
        else:
            _act(connection, "finish", strategies.close_all, "worker_stopping")
    forks.close_own_pools()


def _still_running(connection: BaseDatabaseWrapper) -> bool:
    """Whether a query interrupted on the client (Celery's soft time limit,
    a signal handler that raised) still runs on the server. psycopg 3 and
    psycopg2 say so: transaction status ACTIVE (libpq's PQTRANS_ACTIVE, 1).
    An interrupted mysqlclient read resumes, so MySQL never needs this."""
    if connection.vendor != "postgresql":
        return False
    info = getattr(connection.connection, "info", None)
    return getattr(info, "transaction_status", None) == 1


def _close_after_failure(connection: BaseDatabaseWrapper, phase: conf.Phase) -> None:
    # A running PostgreSQL query goes on, holding its locks, after the
    # client closes its connection: cancel it first.
    if _still_running(connection):
        cancel = getattr(connection.connection, "cancel_safe", None)
        try:
            (cancel or connection.connection.cancel)()
        except (DatabaseError, connection.Database.Error):  # type: ignore[attr-defined]
            pass
        else:
            metrics.count_cancelled(connection.alias)
    connection.close()


def caller_in_transaction() -> bool:
    """Whether a connection of this thread is in a transaction of the
    caller's: an atomic block, or autocommit turned off."""
    return any(
        tracking.caller_holds(c) in (tracking.ATOMIC, tracking.TRANSACTION)
        for c in tracking.open_connections()
    )


def close_unheld() -> None:
    """Close this thread's connections, except those the caller holds."""
    for connection in tracking.open_connections():
        if tracking.caller_holds(connection) is None:
            _act(connection, "finish", strategies.close_all)


def close_broken() -> None:
    """Close this thread's connections that errors left unusable (unless the
    caller is using them): Django pings a connection that had an error."""
    for connection in tracking.open_connections():
        if tracking.caller_holds(connection) is None:
            _act(connection, "finish", strategies.close_old, "failure")


def _warn_left_open(
    connection: BaseDatabaseWrapper, phase: str, held: str, strategy: conf.Strategy
) -> None:
    if strategy is not strategies.keep:
        logger.warning(
            "Database connection %r left open at %s of a unit of work: %s, "
            "which closing it would lose.",
            connection.alias,
            phase,
            held,
        )


def _roll_back_left_open(connection: BaseDatabaseWrapper) -> None:
    """Roll back the transaction a unit began and left open, so that later
    units do not run inside it."""
    logger.warning(
        "Database connection %r: the unit of work ended with autocommit off "
        "and its transaction open; rolled back, and autocommit turned on again.",
        connection.alias,
    )
    try:
        connection.rollback()
        connection.set_autocommit(True)
    except DatabaseError as exc:
        logger.info(
            "Rolling back on database connection %r failed (%s: %s); closing it.",
            connection.alias,
            type(exc).__name__,
            exc,
        )
        with contextlib.suppress(DatabaseError):
            connection.close()
        if connection.connection is None:
            send_closed(connection, "failure")


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
        send_closed(connection, reason or _name(strategy))


def _name(strategy: Callable[..., object]) -> str:
    return getattr(strategy, "__name__", repr(strategy))
