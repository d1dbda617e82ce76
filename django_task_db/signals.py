"""Signals that mark the boundaries of units of work.

Any runner fires them itself; the app's receivers apply ``TASK_DB``.

- ``task_started(sender, strategy=None)``: a unit of work begins in this
  thread. ``strategy`` overrides ``TASK_DB`` for this unit.
- ``task_finished(sender, failed=False, strategy=None)``: it ended;
  ``failed`` is true when it raised.
- ``worker_process_started(sender)``: a new worker process, usually forked,
  is about to run its first unit: connections inherited from the parent
  are discarded without network IO.
- ``worker_stopping(sender)``: the worker is about to exit: every
  connection of this thread is closed, and Django's connection pools too.

Any object can be the sender, hashable or not. Sending one of these before
the app is ready raises ImproperlyConfigured: without its receivers they
would do nothing.

Sent by the app:

- ``connection_closed(sender, alias, reason)``: a connection was closed
  (``sender`` is the backend's ``DatabaseWrapper`` class). ``reason`` is
  the strategy's name, ``"failure"``, ``"query_running"`` (a query was
  still running at the end of a unit that did not fail: cancelled, then
  closed), ``"worker_stopping"``, ``"inherited"``, ``"health_check"`` or
  ``"thread_ended"``. Each close is
  also counted (``metrics.snapshot()``) and logged at DEBUG on the
  ``"django_task_db"`` logger with its alias and reason.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NoReturn

from django.core.exceptions import ImproperlyConfigured
from django.dispatch import Signal

from django_task_db import metrics, units

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger("django_task_db")


class _NoCache:
    """The sender cache of signals that do not cache. Django's Signal.send
    looks every sender up in it, and a dict would raise TypeError for an
    unhashable sender (a dict, a list): ``get`` here never hashes, and never
    answers NO_RECEIVERS."""

    __slots__ = ()
    get = staticmethod(id)

    def clear(self) -> None:
        pass


class BoundarySignal(Signal):
    """A signal that raises when sent before the app's receivers are
    connected (see receivers_ready()), as it would do nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.sender_receivers_cache = _NoCache()  # type: ignore[assignment]
        self.connect(_not_ready, dispatch_uid=_NOT_READY)


class _TaskStarted(BoundarySignal):
    def send(self, sender: Any, **named: Any) -> list[tuple[Any, Any]]:
        # A receiver that raises after the app's has started a runner's unit:
        # the runner never sees that unit, nor sends its task_finished.
        before = units.current.get()
        try:
            return Signal.send(self, sender, **named)
        except BaseException:
            started = units.current.get()
            if started is not before and started is not None:
                started.end()
                units.current.set(before)
            raise


# The dispatch_uid of the app's receivers of task_started and task_finished.
STARTED_UID = "django_task_db.started"
FINISHED_UID = "django_task_db.finished"


def only_app_receiver(signal: Signal, uid: str) -> bool:
    """Whether the app's receiver (``uid``) is the only one connected to
    ``signal``, for any sender: task_scope then calls it without sending,
    which is what sending would do, at a fraction of the cost. Django keeps
    each receiver as ((dispatch_uid or receiver id, sender id), ...) in
    Signal.receivers, from Django 4.2 to 6.1."""
    receivers = signal.receivers
    return len(receivers) == 1 and receivers[0][0][0] == uid


def require_app() -> None:
    """Raise ImproperlyConfigured, as sending a boundary signal would, until
    the app's receivers are connected."""
    if any(key[0] == _NOT_READY for key, *_ in task_started.receivers):
        _not_ready()


def receivers_ready() -> None:
    """Called by the app's ready() once its receivers are connected."""
    for signal in (
        task_started,
        task_finished,
        worker_process_started,
        worker_stopping,
    ):
        signal.disconnect(dispatch_uid=_NOT_READY)


# The first receiver of each boundary signal until the app's are connected.
_NOT_READY = "django_task_db.not_ready"


def _not_ready(**kwargs: Any) -> NoReturn:
    from django.apps import apps

    if apps.ready and not apps.is_installed("django_task_db"):
        raise ImproperlyConfigured(
            "django_task_db is not in INSTALLED_APPS, so task_scope and its "
            "signals would do nothing to the database connections. Add "
            "'django_task_db' to INSTALLED_APPS."
        )
    raise ImproperlyConfigured(
        "A django_task_db signal was sent before Django's apps were ready, so "
        "nothing would have handled it. Call django.setup() first (manage.py "
        "and Celery's Django fixup do)."
    )


task_started = _TaskStarted()
task_finished = BoundarySignal()
worker_process_started = BoundarySignal()
worker_stopping = BoundarySignal()
connection_closed = Signal()


def send_closed(connection: BaseDatabaseWrapper, reason: str) -> None:
    """Count the close, log it at DEBUG, send connection_closed; log what its
    receivers raise."""
    alias = connection.alias
    metrics.count_closed(alias, reason)
    logger.debug("Database connection %r closed: %s.", alias, reason)
    for receiver, result in connection_closed.send_robust(
        type(connection), alias=alias, reason=reason
    ):
        if isinstance(result, Exception):
            logger.error(
                "A receiver of connection_closed, %r, raised.",
                receiver,
                exc_info=result,
            )
