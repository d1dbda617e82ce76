"""The Celery app of the tests: a Redis broker and result backend, and tasks
that report what the database server sees.

The broker's database number and the queue come from the environment, so each
worker subprocess has its own and no worker takes another test's tasks.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import celery
from celery import Celery
from django.db import connections, transaction

from tests.names import REDIS_DB_IN_PROCESS, REDIS_URL

REDIS = REDIS_URL
# Set by tests/workers.py for the worker processes it starts.
REDIS_DB = int(os.environ.get("TASK_DB_WORKER_REDIS_DB", REDIS_DB_IN_PROCESS))

app = Celery("tests")
app.conf.update(
    broker_url=f"{REDIS}/{REDIS_DB}",
    result_backend=f"{REDIS}/{REDIS_DB}",
    task_default_queue=os.environ.get("TASK_DB_CELERY_QUEUE", "django_task_db_tests"),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=1,
    task_acks_late=False,
    result_expires=600,
)

# Celery 5.6 changed its Django fixup's close_database() from
# close_if_unusable_or_obsolete() (CONN_MAX_AGE decides) to close().
FIXUP_CLOSES_EVERY_CONNECTION = celery.VERSION >= (5, 6)

SESSION_ID_SQL = {
    "mysql": "SELECT CONNECTION_ID()",
    "postgresql": "SELECT pg_backend_pid()",
}


def _session_id(alias: str) -> int:
    connection = connections[alias]
    with connection.cursor() as cursor:
        cursor.execute(SESSION_ID_SQL[connection.vendor])
        return int(cursor.fetchone()[0])


@app.task
def session_id(alias: str) -> int:
    """The server's id for the connection this task ran its query on."""
    return _session_id(alias)


@app.task(db_strategy="close_all")
def session_id_close_all(alias: str) -> int:
    """The same, with a per-task strategy."""
    return _session_id(alias)


@app.task
def write_then_fail(alias: str, name: str) -> None:
    """Write a row outside autocommit, then fail before committing."""
    from tests.testapp.models import Item

    transaction.set_autocommit(False, using=alias)
    Item.objects.using(alias).create(name=name)
    raise RuntimeError(f"task failed after writing {name!r}")


@app.task
def write(alias: str, name: str) -> int:
    from tests.testapp.models import Item

    Item.objects.using(alias).create(name=name)
    return _session_id(alias)


@app.task
def sleep_in_query(alias: str, seconds: float) -> int:
    """Hold a query on the server for ``seconds``."""
    connection = connections[alias]
    with connection.cursor() as cursor:
        if connection.vendor == "mysql":
            cursor.execute("SELECT SLEEP(%s)", [seconds])
        else:
            cursor.execute("SELECT pg_sleep(%s)", [seconds])
    return _session_id(alias)


@app.task
def pause(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def uninstall_fixup() -> None:
    """Disconnect what the Django fixup connected when a worker of ``app``
    started. In a real process the worker's end is the process's; here,
    later tests would inherit the fixup's handlers (it connects them again
    at the next worker's start)."""
    from celery import signals

    for fixup in app._fixups:
        worker_fixup = getattr(fixup, "_worker_fixup", None)
        if worker_fixup is None:
            continue
        for signal, name in (
            (signals.task_prerun, "on_task_prerun"),
            (signals.task_postrun, "on_task_postrun"),
            (signals.worker_process_init, "on_worker_process_init"),
            (signals.beat_embedded_init, "close_database"),
        ):
            signal.disconnect(getattr(worker_fixup, name))


@contextmanager
def inprocess_worker(
    queue: str, pool: str = "solo", concurrency: int = 1, timeout: float = 30
) -> Iterator[Any]:
    """A worker of ``app`` in this process on ``queue``, stopped as a worker
    does on SIGTERM: a warm shutdown, which sends worker_shutdown in the
    worker's thread (start_worker alone stops it cold, which sends nothing)."""
    from celery import signals
    from celery.contrib.testing.worker import start_worker
    from celery.worker import state as worker_state

    stopped = threading.Event()

    def on_shutdown(sender: Any = None, **kwargs: Any) -> None:
        if sender is worker:
            stopped.set()

    signals.worker_shutdown.connect(on_shutdown, weak=False)
    try:
        with start_worker(
            app,
            pool=pool,
            concurrency=concurrency,
            perform_ping_check=False,
            queues=[queue],
            shutdown_timeout=timeout,
        ) as worker:
            try:
                yield worker
            finally:
                worker_state.should_stop = 0
                shut_down = stopped.wait(timeout)
        assert shut_down, "the worker did not send worker_shutdown"
    finally:
        worker_state.should_stop = None
        signals.worker_shutdown.disconnect(on_shutdown)
