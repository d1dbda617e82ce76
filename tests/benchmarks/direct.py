"""Part 3: the same one-query unit, without a broker, through task_scope.

N units run in a loop (one thread) and in a pool of 8 threads sharing them,
under each strategy, against the unit alone ("no scope", the reference) and
the peers' styles (close_old_connections() around the unit, or after it).
Every run starts in fresh threads, with no connection open, and each thread
closes its connections after its last unit, outside the timing. Django's pool
(alias "pgpool") is opened before the timing, with its min_size connections,
and closed after each run; it gets max_size 8, one connection per thread, so
that a "keep" or "no scope" thread, which holds its connection to the end,
does not leave the others waiting for the whole run (the pool grows from
min_size as threads wait; sessions seen says how far).

tasks/s is N / (the last unit's end - the start). Django connects:
``connection_created`` signals (with Django's pool, each connection taken from
it). Sessions seen and server delta as in part 2.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import close_old_connections, connections
from django.db.backends.signals import connection_created
from django.test import override_settings

from django_task_db import task_scope
from tests.benchmarks.backends import UNIT_SQL, Backend, ConnectionCounter, close_pool
from tests.benchmarks.stats import (
    progress,
    ratios,
    repetitions,
    section,
    stats,
    table,
)

# The peers' styles, on the same unit: close_old_connections() before and
# after (django_dramatiq's middleware, channels' database_sync_to_async),
# and after only.
PEERS = ("peer_before_after", "peer_after")
VARIANTS = ("none", *PEERS, "close_old", "close_old_idle_0", "close_all", "keep")
LABELS = {
    "none": "no scope",
    "peer_before_after": "close_old_connections() before and after",
    "peer_after": "close_old_connections() after only",
    "close_old": "task_scope, close_old",
    "close_old_idle_0": "task_scope, close_old, HEALTH_CHECK_IDLE 0",
    "close_all": "task_scope, close_all",
    "keep": "task_scope, keep",
}
THREADS = 8
MODES = {"loop": 1, "threads": THREADS}
MODE_LABELS = {"loop": "loop", "threads": f"{THREADS} threads"}


@dataclass(frozen=True)
class Sample:
    tasks_per_s: float
    connects: int
    sessions: int | None
    server_delta: int | None


def _unit(backend: Backend, variant: str, seen: set[Any]) -> Callable[[], None]:
    alias, sql = backend.alias, UNIT_SQL[backend.vendor]

    def query() -> None:
        with connections[alias].cursor() as cursor:
            cursor.execute(sql)
            seen.add(cursor.fetchone()[0])

    if variant == "none":
        return query
    if variant == "peer_before_after":

        def before_and_after() -> None:
            close_old_connections()
            try:
                query()
            finally:
                close_old_connections()

        return before_and_after
    if variant == "peer_after":

        def after() -> None:
            try:
                query()
            finally:
                close_old_connections()

        return after

    def unit() -> None:
        with task_scope():
            query()

    return unit


def _run_threads(count: int, units: int, unit: Callable[[], None]) -> float:
    """Run ``units`` calls of ``unit`` in ``count`` new threads; seconds from
    the start to the end of the last one."""
    taken = itertools.count()
    ends: list[int] = []
    errors: list[BaseException] = []
    ready = threading.Barrier(count + 1)

    def work() -> None:
        try:
            ready.wait()
            while next(taken) < units:
                unit()
            ends.append(time.perf_counter_ns())
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter_ns()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return (max(ends) - start) / 1e9


def _run(
    backend: Backend,
    variant: str,
    mode: str,
    units: int,
    counter: ConnectionCounter | None,
) -> Sample:
    seen: set[Any] = set()
    connects = itertools.count()

    def on_connect(**kwargs: Any) -> None:
        next(connects)

    task_db: dict[str, Any] = {}
    if variant == "close_old_idle_0":
        task_db = {"STRATEGY": "close_old", "HEALTH_CHECK_IDLE": 0}
    elif variant not in ("none", *PEERS):
        task_db = {"STRATEGY": variant}
    unit = _unit(backend, variant, seen)
    before = counter.read() if counter else None
    pool = getattr(connections[backend.alias], "pool", None)
    if pool is not None:
        pool.open(wait=True)  # its min_size connections, before the timing
    connection_created.connect(on_connect, weak=False, dispatch_uid="bench.count")
    try:
        with override_settings(TASK_DB=task_db):
            seconds = _run_threads(MODES[mode], units, unit)
    finally:
        connection_created.disconnect(dispatch_uid="bench.count")
        close_pool(backend.alias)
    after = counter.settled() if counter else None
    return Sample(
        tasks_per_s=units / seconds,
        connects=next(connects),
        sessions=len(seen) if backend.is_server else None,
        server_delta=None if before is None or after is None else after - before,
    )


def _pool_per_thread(alias: str) -> None:
    """Give Django's pool of ``alias`` one connection per thread."""
    options = connections.settings[alias].get("OPTIONS", {})
    if "pool" in options:
        pool = {
            **options["pool"],
            "max_size": max(THREADS, options["pool"].get("max_size", 0)),
        }
        connections.settings[alias] = {
            **connections.settings[alias],
            "OPTIONS": {**options, "pool": pool},
        }


def _figure(values: Sequence[float | None]) -> dict[str, Any] | None:
    if any(v is None for v in values):
        return None
    return stats([v for v in values if v is not None]).to_json()


def run(backends: Sequence[Backend], units: int, repeat: int) -> dict[str, Any]:
    results: dict[str, Any] = {"tasks": units, "repeat": repeat, "groups": []}
    for backend in backends:
        for mode in MODES:
            group: dict[str, Any] = {
                "backend": backend.label,
                "alias": backend.alias,
                "mode": MODE_LABELS[mode],
            }
            results["groups"].append(group)
            if backend.skipped:
                group["skipped"] = backend.skipped
                continue
            _pool_per_thread(backend.alias)
            close_pool(backend.alias)
            counter = ConnectionCounter(backend.alias) if backend.is_server else None
            samples: dict[str, list[Sample]] = {v: [] for v in VARIANTS}
            try:
                for index in range(repeat):
                    progress(
                        f"direct {backend.label} {mode} repetition {index + 1}/{repeat}"
                    )
                    for variant in VARIANTS:
                        samples[variant].append(
                            _run(backend, variant, mode, units, counter)
                        )
            finally:
                if counter:
                    counter.close()
            reference = [s.tasks_per_s for s in samples["none"]]
            group["variants"] = {
                variant: {
                    "label": LABELS[variant],
                    "tasks_per_s": stats([s.tasks_per_s for s in runs]).to_json(),
                    "vs_none": ratios(
                        [s.tasks_per_s for s in runs], reference
                    ).to_json(),
                    "connects": stats([s.connects for s in runs]).to_json(),
                    "sessions": _figure([s.sessions for s in runs]),
                    "server_delta": _figure([s.server_delta for s in runs]),
                }
                for variant, runs in samples.items()
            }
    return results


def _fmt(figure: dict[str, Any] | None, digits: int = 0) -> str:
    return "-" if figure is None else stats(figure["values"]).format(digits)


def render(results: dict[str, Any]) -> str:
    rows = []
    for group in results["groups"]:
        head = [group["backend"], group["mode"]]
        if "skipped" in group:
            rows.append([*head, group["skipped"], "", "", "", "", ""])
            continue
        for figures in group["variants"].values():
            rows.append(
                [
                    *head,
                    figures["label"],
                    _fmt(figures["tasks_per_s"]),
                    _fmt(figures["vs_none"], 2),
                    _fmt(figures["connects"]),
                    _fmt(figures["sessions"]),
                    _fmt(figures["server_delta"]),
                ]
            )
    return section(
        "3. Direct calls, no broker: task_scope in a loop and in 8 threads",
        [
            f"{results['tasks']:,} units of one query each per run; median "
            f"[min-max] of {repetitions(results['repeat'])}.",
            "Absolute: tasks/s, Django connects, sessions seen, server delta. "
            "Ratio: tasks/s / tasks/s of 'no scope' in the same repetition.",
            "",
            table(
                [
                    "database",
                    "mode",
                    "variant",
                    "tasks/s",
                    "x no scope",
                    "Django connects",
                    "sessions seen",
                    "server delta",
                ],
                rows,
            ),
        ],
    )
