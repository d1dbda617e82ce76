"""Three tasks, each reporting the database connection it ran on."""

from celery import shared_task

from orders import connections
from orders.models import Order


@shared_task
def create_order(number: int) -> dict[str, str]:
    """An ordinary ORM task: under close_old it reuses the worker's connection."""
    order = Order.objects.create(number=number)
    return {"summary": f"{order} saved", "connection": connections.name()}


@shared_task(db_strategy="close_all")
def count_orders() -> dict[str, str]:
    """A task with its own strategy: a fresh connection, closed when it ends
    (for a long or rare task that should not hold a connection afterwards)."""
    count = Order.objects.count()
    return {"summary": f"{count} orders", "connection": connections.name()}


@shared_task
def create_order_then_fail(number: int) -> None:
    """Writes, then fails: CLOSE_ON_FAILURE closes its connection afterwards."""
    order = Order.objects.create(number=number)
    raise RuntimeError(
        f"{order} saved on connection {connections.name()}, "
        "then the payment was refused"
    )
