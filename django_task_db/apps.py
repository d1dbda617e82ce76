from __future__ import annotations

import importlib.util
import os
from typing import Any

from django.apps import AppConfig
from django.core.signals import setting_changed
from django.db.backends.signals import connection_created

from django_task_db import boundaries, conf, forks, signals, tracking

_fork_hook_registered = False

# Connected when Django imports this module, before any app's ready() runs, so
# that connections opened in another app's ready() are tracked too.
connection_created.connect(tracking.track, dispatch_uid="django_task_db.track")


class TaskDbConfig(AppConfig):
    name = "django_task_db"
    verbose_name = "Task DB"

    def ready(self) -> None:
        from django_task_db import checks  # noqa: F401  (registers the checks)

        connect_receivers()
        tracking.track_open_connections()
        setting_changed.connect(
            conf.clear_cache, dispatch_uid="django_task_db.clear_cache"
        )
        register_fork_hook()
        if importlib.util.find_spec("celery") is not None:
            from django_task_db import celery_bridge

            celery_bridge.connect()


def connect_receivers() -> None:
    signals.task_started.connect(_on_task_started, dispatch_uid=signals.STARTED_UID)
    signals.task_finished.connect(_on_task_finished, dispatch_uid=signals.FINISHED_UID)
    signals.worker_process_started.connect(
        _on_worker_process_started, dispatch_uid="django_task_db.worker_process_started"
    )
    signals.worker_stopping.connect(
        _on_worker_stopping, dispatch_uid="django_task_db.worker_stopping"
    )
    signals.receivers_ready()


def register_fork_hook() -> None:
    # os.register_at_fork has no way to unregister: register once per process.
    global _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(
            before=forks.before_fork,
            after_in_parent=forks.after_fork_in_parent,
            after_in_child=forks.after_fork_in_child,
        )
        _fork_hook_registered = True


def _on_task_started(strategy: conf.StrategySpec | None = None, **kwargs: Any) -> None:
    boundaries.start_unit(strategy)


def _on_task_finished(
    failed: bool = False, strategy: conf.StrategySpec | None = None, **kwargs: Any
) -> None:
    boundaries.finish_unit(bool(failed), strategy)


def _on_worker_process_started(**kwargs: Any) -> None:
    forks.discard_inherited()


def _on_worker_stopping(**kwargs: Any) -> None:
    boundaries.stop_worker()
