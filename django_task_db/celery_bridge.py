"""The Celery bridge: Celery's worker and task signals drive django-task-db's.

Imported by the app only when Celery is installed. Every receiver checks
TASK_DB["CELERY"] when it runs, logs its errors instead of raising them, does
nothing around tasks while TASK_DB is invalid (Celery's fixup stays in
charge), and leaves eager tasks (``task.apply()``, ``task_always_eager``)
alone: they run in the caller's thread, on the caller's connections and
transaction.
"""

from __future__ import annotations

import logging
from typing import Any
from weakref import WeakSet

from celery import signals as celery_signals
from celery import states

from django_task_db import boundaries, conf, forks, signals

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


def replace_fixup(app: Any) -> None:
    """Take over the database duties of Celery's Django fixup for ``app``:
    its task_prerun, task_postrun and worker_process_init handlers, which
    close connections (every one, from Celery 5.6), do nothing, and its
    close_database() (at worker start, and beat's) leaves alone what the
    caller holds, such as a test's atomic block. The rest of the fixup stays in place.

    Done on the fixup's worker object itself, so it holds whether the fixup
    installs its handlers before or after (receivers run in the order they
    were connected, and Django may be set up before or after the Celery app
    exists). While TASK_DB is invalid the fixup stays in charge.
    """
    if app in _replaced or not conf.get("REPLACE_CELERY_FIXUP") or not _valid():
        return
    for worker_fixup in _worker_fixups(app):
        for signal, name in _TAKEN_OVER:
            signal.disconnect(getattr(worker_fixup, name))  # if installed
            setattr(worker_fixup, name, _ignore)
        worker_fixup.close_database = worker_fixup._close_database = _close_unheld
        logger.info(
            "django-task-db replaced the database handlers of Celery's Django "
            "fixup (task_prerun, task_postrun, worker_process_init) for %r: "
            "TASK_DB decides what happens to the connections.",
            app,
        )
    _replaced.add(app)


_TAKEN_OVER = (
    (celery_signals.task_prerun, "on_task_prerun"),
    (celery_signals.task_postrun, "on_task_postrun"),
    (celery_signals.worker_process_init, "on_worker_process_init"),
)


def _worker_fixups(app: Any) -> list[Any]:
    """The DjangoWorkerFixup objects of ``app``'s Django fixups."""
    return [
        fixup.worker_fixup  # created if need be: the one worker_init installs
        for fixup in getattr(app, "_fixups", ())
        if hasattr(type(fixup), "worker_fixup")
    ]


def _restore_fixup(app: Any) -> None:
    """Give the fixup its own handlers back (the bridge is off for this
    worker, or TASK_DB is invalid): it installs them when its worker starts."""
    names = ["close_database", "_close_database"] + [n for _, n in _TAKEN_OVER]
    for worker_fixup in _worker_fixups(app):
        for name in names:
            vars(worker_fixup).pop(name, None)


def _ignore(**kwargs: Any) -> None:
    """What the fixup's replaced handlers do."""


def _close_unheld(**kwargs: Any) -> None:
    """The fixup's close_database(), minus what the caller holds."""
    boundaries.close_unheld()


def _valid() -> bool:
    """Whether TASK_DB can be applied; if not, say so once."""
    try:
        conf.boundary()
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
        app = getattr(sender, "app", None)
        if app is None:
            return
        # A new worker for this app: its fixup installs its handlers again.
        _replaced.discard(app)
        if _enabled():
            _app = app
            replace_fixup(app)
            for task in list(app.tasks.values()):
                _task_strategy(task)
        if app not in _replaced:
            _restore_fixup(app)
    except Exception:
        logger.exception("django-task-db could not set up the Celery worker.")


def _report_checks() -> None:
    """Log the package's system check messages: Celery runs the checks when
    the worker starts and drops what they say."""
    from django_task_db.checks import check_aliases, check_settings

    for message in check_settings() + check_aliases():
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
        if task.app in _replaced or _valid():
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
        if task.app in _replaced or _valid():
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
