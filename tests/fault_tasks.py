"""Celery tasks of the fault-matrix tests (tests/test_fault_matrix.py).

They live on the test Celery app (tests/celery_app.py); a worker subprocess
loads them with ``--include tests.fault_tasks``. Imported by such a worker,
this module also adds to its DATABASES the extra aliases that the test passes
as JSON in TASK_DB_FAULT_DATABASES (the security tests' alias whose PASSWORD
is a sentinel), and connects a task_postrun receiver that raises for the
task ``use_alias_then_raise_in_postrun``, so that Celery writes a "Signal
handler ... raised" line about that alias.
"""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from typing import Any

from celery import signals as celery_signals
from django.db import connections

from tests.celery_app import _session_id, app
from tests.private_servers import add_alias

DATABASES_ENV = "TASK_DB_FAULT_DATABASES"
TABLE = "django_task_db_fault_rows"
SOFT_TIME_LIMIT = 1.0
BARRIER_TIMEOUT = 30


def insert(alias: str, marker: str) -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute(f"INSERT INTO {TABLE} (marker) VALUES (%s)", [marker])


def sleep_sql(alias: str, seconds: float, marker: str) -> str:
    """A query that holds the server for ``seconds``, tagged with
    sleep_tag(marker) so that the test finds it in the server's process list."""
    if connections[alias].vendor == "mysql":
        return f"SELECT SLEEP({float(seconds)}) /* {sleep_tag(marker)} */"
    return f"SELECT pg_sleep({float(seconds)}) /* {sleep_tag(marker)} */"


def sleep_tag(marker: str) -> str:
    return f"sleep {marker}"


@app.task(soft_time_limit=SOFT_TIME_LIMIT, time_limit=120)
def sleep_past_soft_limit(alias: str, marker: str, seconds: float, write: bool) -> None:
    """Sleep in a query until Celery's soft time limit interrupts it; with
    ``write``, first write a row outside autocommit, never to be committed."""
    from django.db import transaction

    if write:
        transaction.set_autocommit(False, using=alias)
        insert(alias, marker)
    with connections[alias].cursor() as cursor:
        cursor.execute(sleep_sql(alias, seconds, marker))
    raise AssertionError("the soft time limit did not interrupt the query")


@app.task
def write_marker(alias: str, marker: str) -> dict[str, int]:
    """Write one row; this process's id and the server's id of the
    connection used."""
    insert(alias, marker)
    return {"pid": os.getpid(), "session": _session_id(alias)}


@app.task(ignore_result=True)
def soak_unit(alias: str, marker: str) -> None:
    """One unit of the soak: one row; counted on the server by the test."""
    insert(alias, marker)


@app.task
def probe(barrier_key: str, parties: int) -> dict[str, Any]:
    """This pool process's figures: pid, open file descriptors, Python's
    traced memory (tracing starts at the first probe) and Django's connection
    wrappers. Each of ``parties`` probes waits for the others at a Redis
    barrier, so that each pool process takes exactly one."""
    import gc

    import redis

    from tests.celery_app import REDIS

    client = redis.Redis.from_url(f"{REDIS}/{os.environ['TASK_DB_WORKER_REDIS_DB']}")
    try:
        client.incr(barrier_key)
        client.expire(barrier_key, 600)
        deadline = time.monotonic() + BARRIER_TIMEOUT
        while int(client.get(barrier_key) or 0) < parties:
            if time.monotonic() > deadline:
                raise AssertionError(f"probe barrier {barrier_key}: nobody came")
            time.sleep(0.01)
    finally:
        client.close()
    if not tracemalloc.is_tracing():
        tracemalloc.start()
    gc.collect()
    return {
        "pid": os.getpid(),
        "fds": len(os.listdir("/proc/self/fd")),
        "traced": tracemalloc.get_traced_memory()[0],
        "connections": len(connections.all()),
        "open": sorted(
            c.alias
            for c in connections.all(initialized_only=True)
            if c.connection is not None
        ),
    }


@app.task
def use_alias(alias: str) -> int:
    """Run a query on ``alias`` (the security tests' failing alias)."""
    return _session_id(alias)


@app.task
def use_alias_then_raise_in_postrun(alias: str) -> int:
    """The same; then _raise_in_postrun raises out of task_postrun."""
    return _session_id(alias)


def _raise_in_postrun(sender: Any = None, **kwargs: Any) -> None:
    """A user's task_postrun receiver that uses the task's alias and lets its
    error out: Celery logs "Signal handler ... raised"."""
    if getattr(sender, "name", None) == use_alias_then_raise_in_postrun.name:
        alias = kwargs["args"][0]
        _session_id(alias)


def _setup_worker() -> None:
    for alias, database in json.loads(os.environ[DATABASES_ENV]).items():
        add_alias(alias, database)
    celery_signals.task_postrun.connect(_raise_in_postrun, weak=False)


if DATABASES_ENV in os.environ:  # in a worker started by the tests
    _setup_worker()
