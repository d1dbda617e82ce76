"""django-task-db's counts, exported with prometheus-client.

Runs a few units of work on SQLite (one of them fails, one uses
``close_all``), then prints what a Prometheus server scraping this process
would read:

    python -m pip install prometheus-client   # or the package's "metrics" extra
    python examples/metrics.py
    python examples/metrics.py --units 10
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from pathlib import Path

import django
from django.conf import settings
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily

from django_task_db import metrics


class TaskDbCollector:
    """django-task-db's counts for this process, read at each scrape."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        m = metrics.snapshot()
        for name, value, text in [
            ("units", m.units, "Units of work that ended."),
            ("failed_units", m.failed_units, "Units of work that failed."),
            ("connections_reused", m.reused, "Connections a unit found open."),
            ("skipped", m.skipped, "Connections left to the caller at a boundary."),
        ]:
            yield CounterMetricFamily(f"django_task_db_{name}", text, value)
        opened = CounterMetricFamily(
            "django_task_db_connections_opened", "Connections opened.", labels=["alias"]
        )
        closed = CounterMetricFamily(
            "django_task_db_connections_closed",
            "Connections closed, by reason.",
            labels=["alias", "reason"],
        )
        cancelled = CounterMetricFamily(
            "django_task_db_queries_cancelled", "Queries cancelled.", labels=["alias"]
        )
        for alias, counts in m.aliases.items():
            opened.add_metric([alias], counts.opened)
            cancelled.add_metric([alias], counts.cancelled)
            for reason, count in counts.closed.items():
                closed.add_metric([alias, reason], count)
        yield from (opened, closed, cancelled)


def configure(database: Path) -> None:
    settings.configure(
        INSTALLED_APPS=["django_task_db"],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(database),
                "CONN_MAX_AGE": 60,
            }
        },
        USE_TZ=True,
    )
    django.setup()


def run_units(count: int) -> None:
    """``count`` units of one query each; the 4th fails, the last uses
    close_all."""
    from django.db import connection

    from django_task_db import task_scope

    for number in range(1, count + 1):
        strategy = "close_all" if number == count else None
        try:
            with task_scope(strategy=strategy):
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
                if number == 4:
                    raise ValueError(f"unit {number} fails")
        except ValueError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        configure(Path(folder) / "metrics.sqlite3")
        run_units(args.units)
    registry = CollectorRegistry()
    registry.register(TaskDbCollector())
    print(generate_latest(registry).decode(), end="")


if __name__ == "__main__":
    main()
