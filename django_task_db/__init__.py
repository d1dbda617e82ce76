"""Keep Django's database connections healthy in code that runs outside
the request/response cycle: task queues, consumers, loops and thread pools."""

from __future__ import annotations

from django_task_db.faults import is_disconnect
from django_task_db.scope import TaskScope, task_scope

__version__ = "0.1.0"

__all__ = ["TaskScope", "is_disconnect", "task_scope"]
