"""Send tasks to the worker one at a time and print what each reports.

python manage.py send_orders
python manage.py send_orders --count 4 --timeout 10
"""

from collections.abc import Iterator
from typing import Any

from celery import Task
from celery.exceptions import TimeoutError
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from orders.tasks import count_orders, create_order, create_order_then_fail


def plan(count: int) -> Iterator[tuple[Task, tuple[int, ...]]]:
    """The tasks to send, in a cycle of four: two orders, a count, a failure."""
    for number in range(1, count + 1):
        if number % 4 == 3:
            yield count_orders, ()
        elif number % 4 == 0:
            yield create_order_then_fail, (number,)
        else:
            yield create_order, (number,)


def send_orders(count: int, timeout: float) -> Iterator[str]:
    """Send the tasks of ``plan(count)``, each after the previous one's
    result; yield a line per task."""
    seen: set[str] = set()  # the connections that earlier tasks reported
    for index, (task, args) in enumerate(plan(count), start=1):
        call = f"{index}. {task.name.split('.')[-1]}({', '.join(map(str, args))})"
        result = task.delay(*args)
        try:
            outcome: Any = result.get(timeout=timeout, propagate=False)
        except TimeoutError:
            queue = settings.CELERY_TASK_DEFAULT_QUEUE
            raise CommandError(
                f"{call}: no result after {timeout:g} s; is a worker running "
                f"on the queue {queue!r}?"
            ) from None
        if result.failed():
            yield f"{call}: failed: {type(outcome).__name__}: {outcome}"
            continue
        connection = outcome["connection"]
        usage = "reused" if connection in seen else "opened"
        seen.add(connection)
        yield f"{call}: {outcome['summary']}; connection {connection} {usage}"


class Command(BaseCommand):
    help = "Send order tasks to the Celery worker and print their results."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--count", type=int, default=6, help="tasks to send")
        parser.add_argument(
            "--timeout", type=float, default=30, help="seconds to wait for each"
        )

    def handle(self, *args: Any, count: int, timeout: float, **options: Any) -> None:
        for line in send_orders(count, timeout):
            self.stdout.write(line)
