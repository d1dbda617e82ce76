"""Name the database connections, and log when they open and close.

Each connection a worker process opens gets a name, ``<pid>#<n>``: the
process id and how many connections the process had opened. Two tasks that
report the same name ran on the same connection.
"""

import itertools
import logging
import os
from typing import Any
from weakref import WeakKeyDictionary

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created

from django_task_db.signals import connection_closed

logger = logging.getLogger(__name__)

_counter = itertools.count(1)
_numbers: WeakKeyDictionary[BaseDatabaseWrapper, int] = WeakKeyDictionary()


def _restart_count() -> None:
    """In a forked pool process, count its own connections from 1 (the main
    process opens one when Celery runs Django's checks at start)."""
    global _counter
    _counter = itertools.count(1)


os.register_at_fork(after_in_child=_restart_count)


def name(alias: str = "default") -> str:
    """The name of this thread's connection to ``alias``."""
    return f"{os.getpid()}#{_numbers.get(connections[alias], 0)}"


def _opened(connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    _numbers[connection] = next(_counter)
    logger.info("connection %s opened (%s)", name(connection.alias), connection.alias)


def _closed(alias: str, reason: str, **kwargs: Any) -> None:
    # Sent by django_task_db each time it closes a connection; reason is the
    # strategy ("close_old", "close_all"), "failure" or "worker_stopping".
    logger.info("connection %s closed (%s)", name(alias), reason)


def log_opened_and_closed() -> None:
    connection_created.connect(_opened, dispatch_uid="orders.opened")
    connection_closed.connect(_closed, dispatch_uid="orders.closed")
