"""The built-in strategies.

A strategy is any plain (not async) callable ``strategy(connection,
phase)``, where ``connection`` is a Django ``DatabaseWrapper`` that is open
in the current thread and that the caller is not using (no atomic block, no
transaction of the caller's, no chunked read in progress), and ``phase`` is
``"start"`` or ``"finish"``. It may close the connection
(``connection.close()``) or leave it open; its return value is ignored. The
caller handles everything else: which connections are passed, what the
caller holds, errors raised while closing, health checks, closing after a
failure and the ``connection_closed`` signal.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from django_task_db.conf import Phase


def close_old(connection: BaseDatabaseWrapper, phase: Phase) -> None:
    """Do what Django does around a request: close the connection if it
    outlived CONN_MAX_AGE, had errors and fails a ping, or was left with
    autocommit in the wrong state."""
    if (
        connection.autocommit == connection.settings_dict["AUTOCOMMIT"]
        and not connection.errors_occurred
        and (connection.close_at is None or time.monotonic() < connection.close_at)
    ):
        # Nothing for close_if_unusable_or_obsolete() to close: decided here
        # as it decides (Django 4.2 to 6.1), without the ensure_connection()
        # of its get_autocommit(), most of a boundary's cost (the connection
        # is open).
        connection.health_check_done = False  # type: ignore[attr-defined]
        return
    connection.close_if_unusable_or_obsolete()


def close_all(connection: BaseDatabaseWrapper, phase: Phase) -> None:
    """Close the connection (with Django's pool: return it to the pool)."""
    connection.close()


def keep(connection: BaseDatabaseWrapper, phase: Phase) -> None:
    """Leave the connection alone."""
