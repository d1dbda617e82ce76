"""Part 4: memory and growth over many boundaries.

For each strategy, in a thread of its own with one open SQLite connection:
``with task_scope(): pass`` a number of times (after a warm-up), twice: once
to read the process's RSS before and after, once under tracemalloc to read
the Python memory still allocated after, garbage collected. Also the size of
``connections.all()`` and the number of open connections, before and after.
All figures are absolute, from one pass.
"""

from __future__ import annotations

import gc
import os
import threading
import tracemalloc
from typing import Any

from django.db import connections
from django.test import override_settings

from django_task_db import task_scope
from tests.benchmarks.stats import progress, section, table

STRATEGIES = ("close_old", "close_all", "keep")
WARMUP = 1_000


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as file:
            pages = int(file.read().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _boundaries(count: int) -> None:
    for _ in range(count):
        with task_scope():
            pass


def _connections() -> tuple[int, int]:
    """connections.all()'s size, and how many of them are open."""
    every = connections.all()
    return len(every), sum(c.connection is not None for c in every)


def _measure(strategy: str, count: int) -> dict[str, Any]:
    with override_settings(TASK_DB={"STRATEGY": strategy}):
        connections["default"].ensure_connection()
        _boundaries(WARMUP)
        gc.collect()
        size_before, open_before = _connections()
        rss_before = rss_bytes()
        _boundaries(count)
        gc.collect()
        rss_after = rss_bytes()
        size_after, open_after = _connections()
        tracemalloc.start()
        try:
            gc.collect()
            traced_before = tracemalloc.get_traced_memory()[0]
            _boundaries(count)
            gc.collect()
            traced_after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    return {
        "boundaries": count,
        "tracemalloc_delta_bytes": traced_after - traced_before,
        "rss_delta_bytes": None
        if rss_before is None or rss_after is None
        else rss_after - rss_before,
        "connections_all": [size_before, size_after],
        "open": [open_before, open_after],
    }


def run(count: int) -> dict[str, Any]:
    results: dict[str, Any] = {"boundaries": count, "strategies": {}}
    for strategy in STRATEGIES:
        progress(f"memory {strategy}")
        outcome: dict[str, Any] = {}

        def work(strategy: str = strategy, outcome: dict[str, Any] = outcome) -> None:
            try:
                outcome["result"] = _measure(strategy, count)
            except BaseException as exc:
                outcome["error"] = exc
            finally:
                connections.close_all()

        thread = threading.Thread(target=work, name=f"memory-{strategy}")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        results["strategies"][strategy] = outcome["result"]
    return results


def _bytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value:+,d} B"


def render(results: dict[str, Any]) -> str:
    rows = []
    for strategy, figures in results["strategies"].items():
        size, opened = figures["connections_all"], figures["open"]
        rows.append(
            [
                strategy,
                _bytes(figures["tracemalloc_delta_bytes"]),
                _bytes(figures["rss_delta_bytes"]),
                f"{size[0]} -> {size[1]}",
                f"{opened[0]} -> {opened[1]}",
            ]
        )
    return section(
        f"4. Memory and growth: {results['boundaries']:,} boundaries "
        "(with task_scope(): pass)",
        [
            "Absolute, one pass each, after a warm-up of "
            f"{WARMUP:,} boundaries; one SQLite connection open at the start.",
            "",
            table(
                [
                    "strategy",
                    "tracemalloc delta",
                    "RSS delta",
                    "connections.all()",
                    "open connections",
                ],
                rows,
            ),
        ],
    )
