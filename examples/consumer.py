"""A Kafka-style consumer loop on SQLite, with django-task-db.

Messages come from an in-process queue (standing in for a Kafka topic);
each is handled in a ``task_scope``. For every message the loop prints
whether the unit reused the database connection or opened one; at the end,
how many connections were opened, closed and left open.

    python examples/consumer.py
    python examples/consumer.py --strategy close_all --messages 5
"""

from __future__ import annotations

import argparse
import queue
import tempfile
from collections import Counter
from pathlib import Path

import django
from django.conf import settings
from django.core.checks import run_checks


def configure(database: Path, strategy: str) -> None:
    settings.configure(
        INSTALLED_APPS=["django_task_db"],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(database),
                "CONN_MAX_AGE": 60,
            }
        },
        TASK_DB={"STRATEGY": strategy},
        USE_TZ=True,
    )
    django.setup()
    # A worker runs the system checks at startup, as manage.py does: a bad
    # TASK_DB stops it here, not in the middle of a message.
    errors = [message for message in run_checks() if message.is_serious()]
    if errors:
        raise SystemExit("\n".join(str(error) for error in errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--strategy", default="close_old", help="close_old, close_all or keep"
    )
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument(
        "--fail-every", type=int, default=4, help="every Nth message raises (0: none)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        configure(Path(folder) / "consumer.sqlite3", args.strategy)
        consume(args.messages, args.fail_every)


def consume(count: int, fail_every: int) -> None:
    from django.db import connection
    from django.db.backends.signals import connection_created

    from django_task_db import task_scope
    from django_task_db.signals import connection_closed, worker_stopping

    events: list[str] = []
    totals: Counter[str] = Counter()
    connection_created.connect(lambda **kw: events.append("opened"), weak=False)
    connection_closed.connect(
        lambda reason, **kw: events.append(f"closed ({reason})"), weak=False
    )

    @task_scope
    def handle(number: int, payload: str) -> None:
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE IF NOT EXISTS events (payload TEXT)")
            cursor.execute("INSERT INTO events (payload) VALUES (%s)", [payload])
        if fail_every and number % fail_every == 0:
            raise ValueError(f"cannot process {payload!r}")

    topic: queue.Queue[str | None] = queue.Queue()
    for number in range(1, count + 1):
        topic.put(f"order-{number}")
    topic.put(None)  # end of the topic

    print(f"strategy {settings.TASK_DB['STRATEGY']!r}, {count} messages")
    number = 0
    while (payload := topic.get()) is not None:
        number += 1
        events.clear()
        outcome = "ok"
        try:
            handle(number, payload)
        except ValueError as exc:
            outcome = f"failed: {exc}"
        usage = "opened" if "opened" in events else "reused"
        closes = [e for e in events if e.startswith("closed")]
        print(
            f"message {number} ({payload}): {outcome}; connection {usage}"
            + (f", then {', '.join(closes)}" if closes else "")
        )
        totals.update(events)

    events.clear()
    worker_stopping.send(sender=None)
    print(f"worker stopping: {', '.join(events) or 'nothing to close'}")
    totals.update(events)
    opened = totals["opened"]
    closed = sum(n for event, n in totals.items() if event.startswith("closed"))
    still_open = int(connection.connection is not None)
    print(f"connections: opened {opened}, closed {closed}, left open {still_open}")


if __name__ == "__main__":
    main()
