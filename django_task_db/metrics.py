"""Counts of what the package did to this process's database connections.

``snapshot()`` returns them. Each count is a number of events since the
process started (a child made by ``os.fork()`` starts again from zero),
summed over all its threads.

Two kinds of counters, so that a boundary that opens and closes nothing pays
next to nothing for them:

- what happens at every boundary (units, failed units, reused connections,
  skips) is counted by each thread on an object of its own, ``ThreadCounts``,
  with a plain ``+= 1``. Only that thread writes it, so no increment is lost
  without a lock (``x += 1`` on an object several threads write is a
  read-modify-write that another thread can interleave); ``snapshot()`` sums
  the objects of all threads, and keeps the sums of the threads that ended.
- what comes with a connect or a close (connections opened, closed, queries
  cancelled) is counted per alias under a lock: a connect or a close costs
  far more than the lock.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


def _freeze(counts: object, field: str) -> None:
    # Frozen dataclasses are set up through object.__setattr__ too.
    object.__setattr__(counts, field, MappingProxyType(dict(getattr(counts, field))))


@dataclass(frozen=True)
class AliasMetrics:
    """The counts of one database alias (see Metrics for each field)."""

    opened: int
    closed: Mapping[str, int]
    replaced: int
    cancelled: int

    def __post_init__(self) -> None:
        _freeze(self, "closed")


@dataclass(frozen=True)
class Metrics:
    """A snapshot of this process's counts, as returned by snapshot().

    - ``opened``: database connections opened (Django's
      ``connection_created``), by any code, in any thread.
    - ``reused``: connections found open, and left open, at the start of a
      unit, and not replaced during it: one per connection and unit that did
      not need a new one. Counted by the unit that prepares the thread's
      connections (the first of concurrent async units); a connection the
      caller holds is a skip, not a reuse.
    - ``replaced``: connections found dead after idling (HEALTH_CHECKS) and
      replaced before their next use; the same as ``closed["health_check"]``.
    - ``closed``: connections closed by the package, by the ``reason`` of
      its ``connection_closed`` signal (a strategy's name, ``"failure"``,
      ``"query_running"``, ``"worker_stopping"``, ``"inherited"``,
      ``"health_check"``, ``"thread_ended"``). Closes by other code are not
      counted.

    With Django's connection pool, ``opened`` and ``closed`` count the
    connections taken from the pool and given back to it (Django sends
    ``connection_created`` at each checkout), not the pool's server sessions.
    - ``units``: units of work that ended (each ``task_finished``, each
      outermost ``task_scope`` that exited); ``failed_units``: those of them
      that failed.
    - ``skipped``: connections left alone at a unit's start or end, or at
      ``worker_stopping``, because the caller held them (an atomic block, a
      transaction, a chunked read): one per connection and boundary, so a
      unit inside an atomic block counts 2.
    - ``cancelled``: queries still running on the server at a unit's end
      that the package cancelled (PostgreSQL).
    - ``aliases``: opened, closed, replaced and cancelled of each alias that
      has any.

    ``later - earlier`` is the Metrics of what happened in between (without
    the reasons and aliases whose counts did not change). The mappings are
    read-only (``types.MappingProxyType``).
    """

    opened: int
    reused: int
    replaced: int
    closed: Mapping[str, int]
    units: int
    failed_units: int
    skipped: int
    cancelled: int
    aliases: Mapping[str, AliasMetrics]

    def __post_init__(self) -> None:
        _freeze(self, "closed")
        _freeze(self, "aliases")

    def __sub__(self, earlier: object) -> Metrics:
        if not isinstance(earlier, Metrics):
            return NotImplemented
        aliases = {}
        for alias in {**self.aliases, **earlier.aliases}:
            now = self.aliases.get(alias, _NO_ALIAS)
            then = earlier.aliases.get(alias, _NO_ALIAS)
            change = AliasMetrics(
                opened=now.opened - then.opened,
                closed=_minus(now.closed, then.closed),
                replaced=now.replaced - then.replaced,
                cancelled=now.cancelled - then.cancelled,
            )
            if change != _NO_ALIAS:
                aliases[alias] = change
        return Metrics(
            opened=self.opened - earlier.opened,
            reused=self.reused - earlier.reused,
            replaced=self.replaced - earlier.replaced,
            closed=_minus(self.closed, earlier.closed),
            units=self.units - earlier.units,
            failed_units=self.failed_units - earlier.failed_units,
            skipped=self.skipped - earlier.skipped,
            cancelled=self.cancelled - earlier.cancelled,
            aliases=aliases,
        )


_NO_ALIAS = AliasMetrics(opened=0, closed={}, replaced=0, cancelled=0)


def _minus(now: Mapping[str, int], then: Mapping[str, int]) -> dict[str, int]:
    """``now`` minus ``then``, without the keys whose count did not change."""
    change = {key: now.get(key, 0) - then.get(key, 0) for key in {**now, **then}}
    return {key: n for key, n in sorted(change.items()) if n}


class ThreadCounts:
    """One thread's (one greenlet's) counts of what happens at boundaries,
    written by that thread only."""

    __slots__ = ("units", "failed_units", "reused", "skipped")

    def __init__(self) -> None:
        self.units = 0
        self.failed_units = 0
        self.reused = 0
        self.skipped = 0


_THREAD_FIELDS = ThreadCounts.__slots__


class _Process:
    """This process's counters."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # Each thread's counts, with (weakly) the object through which its
        # thread writes them: once that is gone, nothing writes them again.
        self.threads: list[tuple[weakref.ref[Any], ThreadCounts]] = []
        self.fold_at = 64
        self.ended = dict.fromkeys(_THREAD_FIELDS, 0)  # of the threads gone
        self.opened: dict[str, int] = {}
        self.closed: dict[tuple[str, str], int] = {}
        self.cancelled: dict[str, int] = {}

    def fold_ended(self) -> None:
        """Add up the counts of the threads that ended (with the lock held)."""
        live = []
        for entry in self.threads:
            owner, counts = entry
            if owner() is None:
                for field in _THREAD_FIELDS:
                    self.ended[field] += getattr(counts, field)
            else:
                live.append(entry)
        self.threads = live


_process = _Process()


def _start_afresh() -> None:
    # In a forked child: the parent's counts are not this process's, and the
    # lock may have been held by a thread that does not exist here.
    global _process
    _process = _Process()


# Registered when the package is imported (units imports this module), so it
# runs before the app's own fork hook, which starts the child's counts.
os.register_at_fork(after_in_child=_start_afresh)


def thread_counts(owner: object) -> ThreadCounts:
    """New counts for a thread, written through ``owner`` (its ThreadUnits)."""
    counts = ThreadCounts()
    process = _process
    with process.lock:
        process.threads.append((weakref.ref(owner), counts))
        if len(process.threads) >= process.fold_at:
            # Threads that start and end keep coming: keep the list short.
            process.fold_ended()
            process.fold_at = 2 * len(process.threads) + 64
    return counts


def count_opened(alias: str) -> None:
    process = _process
    with process.lock:
        process.opened[alias] = process.opened.get(alias, 0) + 1


def count_closed(alias: str, reason: str) -> None:
    process = _process
    key = (alias, reason)
    with process.lock:
        process.closed[key] = process.closed.get(key, 0) + 1


def count_cancelled(alias: str) -> None:
    process = _process
    with process.lock:
        process.cancelled[alias] = process.cancelled.get(alias, 0) + 1


def snapshot() -> Metrics:
    """This process's counts now (see Metrics), summed over its threads.

    Each count is exact; counts taken while other threads run units may be
    between two of a unit's counts (its ``units`` counted, its close not yet).

    Raises ImproperlyConfigured when the app is not in INSTALLED_APPS (or
    Django is not set up): nothing would have been counted.
    """
    from django_task_db import signals  # signals imports this module

    signals.require_app()
    process = _process
    with process.lock:
        process.fold_ended()
        totals = dict(process.ended)
        for _, counts in process.threads:
            for field in _THREAD_FIELDS:
                totals[field] += getattr(counts, field)
        opened = dict(process.opened)
        closed = dict(process.closed)
        cancelled = dict(process.cancelled)
    by_alias: dict[str, dict[str, int]] = {}
    for (alias, reason), count in sorted(closed.items()):
        by_alias.setdefault(alias, {})[reason] = count
    aliases = {
        alias: AliasMetrics(
            opened=opened.get(alias, 0),
            closed=by_alias.get(alias, {}),
            replaced=by_alias.get(alias, {}).get("health_check", 0),
            cancelled=cancelled.get(alias, 0),
        )
        for alias in sorted({*opened, *by_alias, *cancelled})
    }
    reasons: dict[str, int] = {}
    for alias_closed in by_alias.values():
        for reason, count in alias_closed.items():
            reasons[reason] = reasons.get(reason, 0) + count
    return Metrics(
        opened=sum(opened.values()),
        reused=totals["reused"],
        replaced=reasons.get("health_check", 0),
        closed=dict(sorted(reasons.items())),
        units=totals["units"],
        failed_units=totals["failed_units"],
        skipped=totals["skipped"],
        cancelled=sum(cancelled.values()),
        aliases=aliases,
    )
