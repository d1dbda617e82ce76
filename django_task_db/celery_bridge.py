"""The Celery bridge: Celery's worker and task signals drive django-task-db's.

Imported by the app only when Celery is installed. Every receiver checks
TASK_DB["CELERY"] when it runs, logs its errors instead of raising them, and
leaves eager tasks (``task.apply()``, ``task_always_eager``) alone: they run
in the caller's thread, on the caller's connections and transaction.
"""

from __future__ import annotations

import logging
from typing import Any
from weakref import WeakSet

from celery import signals as celery_signals
from celery import states

from django_task_db import conf, forks, signals

logger = logging.getLogger("django_task_db")

# The Celery apps whose Django fixup has handed its database duties over.
_replaced: WeakSet[Any] = WeakSet()

# The app of the worker this process belongs to (set at worker_init, which
# prefork children inherit), and the errors about TASK_DB already logged.
_app: Any = None
_logged: set[str] = set()


def connect() -> None:
    for celery_signal, receiver in (
        (celery_signals.worker_init, _on_worker_init),
        (celery_signals.worker_process_init, _on_worker_process_init),
        (celery_signals.task_prerun, _on_task_prerun),
        (celery_signals.task_postrun, _on_task_postrun),
        (celery_signals.worker_process_shutdown, _on_worker_stopping),
        (celery_signals.worker_shutdown, _on_worker_stopping),
    ):
        celery_signal.connect(
            receiver,
            weak=False,
            dispatch_uid=f"{__name__}.{receiver.__name__}",
        )


def replace_fixup(app: Any, worker: Any = None) -> None:
    """Disconnect the database handlers of Celery's Django fixup for ``app``
    (its task_prerun, task_postrun and worker_process_init receivers, which
    close every connection); leave the rest of the fixup in place.

    Tried when ``worker`` starts, which works if the fixup has installed its
    handlers for that worker already (receivers run in the order they were
    connected, and Django may have been set up before the Celery app
    existed; Celery before 5.6 does not say), then in each prefork child and
    before a process's first task (``worker`` None), when it has. While
    TASK_DB is invalid the fixup stays in charge: it closes everything.
    """
    if app in _replaced or not conf.get("REPLACE_CELERY_FIXUP") or not _valid():
        return
    for fixup in getattr(app, "_fixups", ()):
        worker_fixup = getattr(fixup, "_worker_fixup", None)
        if worker_fixup is None:
            continue
        if worker is not None and getattr(worker_fixup, "worker", None) is not worker:
            return
        celery_signals.task_prerun.disconnect(worker_fixup.on_task_prerun)
        celery_signals.task_postrun.disconnect(worker_fixup.on_task_postrun)
        celery_signals.worker_process_init.disconnect(
            worker_fixup.on_worker_process_init
        )
        logger.info(
            "django-task-db replaced the database handlers of Celery's Django "
            "fixup (task_prerun, task_postrun, worker_process_init) for %r: "
            "TASK_DB decides what happens to the connections.",
            app,
        )
    _replaced.add(app)


def _valid() -> bool:
    """Whether TASK_DB can be applied; if not, say so once."""
    try:
        conf.strategies_for()
        for key in conf.DEFAULTS:
            conf.get(key)
    except conf.SettingError as exc:
        _log_invalid(exc)
        return False
    return True


def _log_invalid(exc: conf.SettingError) -> None:
    _log_once(
        f"django-task-db: TASK_DB is invalid ({exc.check_id}, logged above); "
        "Celery's Django fixup stays in charge of the connections."
    )


def _task_strategy(task: Any) -> Any:
    """The task's db_strategy, or None (TASK_DB's) when it has none or a bad one."""
    spec = getattr(task, "db_strategy", None)
    if spec is not None:
        try:
            conf.load(spec, f"db_strategy of the task {_name(task)!r}")
        except conf.SettingError as exc:
            _log_once(f"django-task-db: {exc} TASK_DB applies to that task instead.")
            return None
    return spec


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.error(message)


def _enabled() -> bool:
    try:
        return conf.get("CELERY") is True
    except conf.SettingError:  # logged by the checks at worker start
        return False


def _is_eager(task: Any) -> bool:
    return bool(getattr(getattr(task, "request", None), "is_eager", False))


def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    global _app
    try:
        _report_checks()
        if not _enabled():
            return
        _app = getattr(sender, "app", None)
        if _app is not None:
            # A new worker for this app: its fixup connects its handlers again.
            _replaced.discard(_app)
            replace_fixup(_app, worker=sender)
            for task in list(_app.tasks.values()):
                _task_strategy(task)
    except Exception:
        logger.exception("django-task-db could not set up the Celery worker.")


def _report_checks() -> None:
    """Log the package's system check messages: Celery runs the checks when
    the worker starts and drops what they say."""
    from django_task_db.checks import check_settings

    for message in check_settings():
        hint = f" HINT: {message.hint}" if message.hint else ""
        logger.log(
            logging.ERROR if message.is_serious() else logging.WARNING,
            "django-task-db system check %s: %s%s",
            message.id,
            message.msg,
            hint,
        )


def _on_worker_process_init(**kwargs: Any) -> None:
    try:
        if _enabled():
            if _app is not None:
                replace_fixup(_app)
            if forks.fork_safety():
                signals.worker_process_started.send(sender=None)
    except Exception:
        logger.exception("django-task-db failed in worker_process_init.")


def _on_task_prerun(sender: Any = None, task: Any = None, **kwargs: Any) -> None:
    task = task or sender
    try:
        if not _enabled() or _is_eager(task):
            return
        replace_fixup(task.app)
        signals.task_started.send(sender=task, strategy=_task_strategy(task))
    except conf.SettingError as exc:
        _log_invalid(exc)
    except Exception:
        logger.exception("django-task-db failed before the task %r.", _name(task))


def _on_task_postrun(
    sender: Any = None, task: Any = None, state: str | None = None, **kwargs: Any
) -> None:
    task = task or sender
    try:
        if not _enabled() or _is_eager(task):
            return
        signals.task_finished.send(
            sender=task,
            failed=state != states.SUCCESS,
            strategy=_task_strategy(task),
        )
    except conf.SettingError as exc:
        _log_invalid(exc)
    except Exception:
        logger.exception("django-task-db failed after the task %r.", _name(task))


def _on_worker_stopping(**kwargs: Any) -> None:
    try:
        if _enabled():
            signals.worker_stopping.send(sender=None)
    except Exception:
        logger.exception("django-task-db failed while the worker was stopping.")


def _name(task: Any) -> str:
    return str(getattr(task, "name", task))
