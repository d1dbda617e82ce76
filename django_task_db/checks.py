"""System checks: bad TASK_DB values fail ``manage.py check``, not a task.

The messages are those of the errors the same values raise at run time.
"""

from __future__ import annotations

import importlib.util
from difflib import get_close_matches
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from django_task_db import conf


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    try:
        value = conf.task_db()
    except conf.SettingError as exc:
        return [_error(exc)]
    errors: list[CheckMessage] = []
    for key in value:
        if key not in conf.DEFAULTS:
            guess = get_close_matches(str(key).upper(), conf.DEFAULTS, n=1)
            errors.append(
                Error(
                    f"TASK_DB has an unknown key {key!r}"
                    + (f" (did you mean {guess[0]!r}?)." if guess else "."),
                    hint=f"Allowed keys: {', '.join(conf.DEFAULTS)}.",
                    id="django_task_db.E002",
                )
            )
    for key in conf.DEFAULTS:
        try:
            conf.get(key)
        except conf.SettingError as exc:
            errors.append(_error(exc))
    aliases = value.get("ALIASES", {})
    if not isinstance(aliases, dict):
        aliases = {}
    specs = [(f"TASK_DB['ALIASES'][{a!r}]", spec) for a, spec in aliases.items()]
    if "STRATEGY" in value:
        specs.insert(0, ("TASK_DB['STRATEGY']", value["STRATEGY"]))
    for where, spec in specs:
        try:
            conf.load(spec, where)
        except conf.SettingError as exc:
            errors.append(_error(exc))
    for alias in aliases:
        if alias not in settings.DATABASES:
            errors.append(
                Error(
                    f"TASK_DB['ALIASES'] names the database alias {alias!r}, "
                    "which DATABASES lacks.",
                    hint=f"Database aliases: {', '.join(settings.DATABASES)}.",
                    id="django_task_db.E004",
                )
            )
    if value.get("HEALTH_CHECKS", True) is True:
        errors += _check_pool_health_checks()
    if (
        value.get("CELERY", True)
        and value.get("REPLACE_CELERY_FIXUP", True) is False
        and importlib.util.find_spec("celery") is not None
    ):
        errors.append(
            Warning(
                "TASK_DB['REPLACE_CELERY_FIXUP'] is False: Celery's Django fixup "
                "also closes database connections before and after every task, "
                "inside atomic blocks too; from Celery 5.6 it closes every "
                "connection, whatever TASK_DB['STRATEGY'] says.",
                hint="Remove REPLACE_CELERY_FIXUP from TASK_DB to let "
                "django-task-db take over the fixup's database handling.",
                id="django_task_db.W002",
            )
        )
    return errors


def _error(exc: conf.SettingError) -> Error:
    return Error(str(exc), hint=exc.hint, id=exc.check_id)


def _check_pool_health_checks() -> list[CheckMessage]:
    databases: dict[str, dict[str, Any]] = settings.DATABASES  # type: ignore[assignment]
    return [
        Warning(
            f"TASK_DB['HEALTH_CHECKS'] cannot check the pooled connections of "
            f"the database alias {alias!r}: Django's PostgreSQL pool hands out "
            "connections unchecked unless CONN_HEALTH_CHECKS is True.",
            hint=f"Set DATABASES[{alias!r}]['CONN_HEALTH_CHECKS'] = True.",
            id="django_task_db.W001",
        )
        for alias, database in databases.items()
        if str(database.get("ENGINE", "")).endswith("postgresql")
        and isinstance(options := database.get("OPTIONS"), dict)
        and options.get("pool")
        and not database.get("CONN_HEALTH_CHECKS", False)
    ]
