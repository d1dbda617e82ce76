"""The benchmark's side of a Celery worker: its task, and how it runs without
Celery's Django fixup.

A ``celery worker`` subprocess imports this module with ``--include
tests.benchmarks.worker``; the benchmark process imports it too, to send the
task and to run its own in-process worker.

"No connection management at all" is TASK_DB ``{"CELERY": False}`` (the
package's bridge does nothing) plus Celery's fixup without its database
handlers: ``without_fixup`` is a ``worker_init`` receiver that disconnects
them, the same three that the package's bridge takes over
(``task_prerun``, ``task_postrun``, ``worker_process_init``). It is connected
after the fixup's own ``worker_init`` receiver (which the fixup connects when
the Celery app is created), so it runs after the fixup has connected them.
In a subprocess, the environment variable ``TASK_DB_BENCH_NO_FIXUP=1``
connects it when this module is imported (``--include`` modules are imported
before ``worker_init`` is sent).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import signals
from django.db import connections

from tests.celery_app import SESSION_ID_SQL, app

NO_FIXUP_ENV = "TASK_DB_BENCH_NO_FIXUP"
UNIT_TASK = "tests.benchmarks.worker.unit"

logger = logging.getLogger(__name__)


@app.task(name=UNIT_TASK)  # type: ignore[untyped-decorator]
def unit(alias: str) -> tuple[int, float]:
    """One small query; the server's id of the session it ran on, and when it
    ended (``time.monotonic()``: CLOCK_MONOTONIC, one clock for every process
    of the machine)."""
    connection = connections[alias]
    with connection.cursor() as cursor:
        cursor.execute(SESSION_ID_SQL[connection.vendor])
        session = int(cursor.fetchone()[0])
    return session, time.monotonic()


def without_fixup(sender: Any = None, **kwargs: Any) -> None:
    """worker_init receiver: disconnect the database handlers of Celery's
    Django fixup of the worker's app."""
    worker_app = getattr(sender, "app", None) or app
    found = False
    for fixup in getattr(worker_app, "_fixups", ()):
        worker_fixup = getattr(fixup, "_worker_fixup", None)
        if worker_fixup is None:
            continue
        signals.task_prerun.disconnect(worker_fixup.on_task_prerun)
        signals.task_postrun.disconnect(worker_fixup.on_task_postrun)
        signals.worker_process_init.disconnect(worker_fixup.on_worker_process_init)
        found = True
    if not found:
        logger.error("No Celery Django fixup to disconnect on %r.", worker_app)


if os.environ.get(NO_FIXUP_ENV) == "1":
    signals.worker_init.connect(without_fixup, weak=False)
