"""System checks: bad TASK_DB values fail ``manage.py check``, not a task."""

from __future__ import annotations

from difflib import get_close_matches
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from django_task_db import conf

HINT_STRATEGY = f"Use {conf.ALLOWED_STRATEGIES}."


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    value = getattr(settings, "TASK_DB", {})
    if not isinstance(value, dict):
        return [
            Error(
                f"TASK_DB is {value!r} ({type(value).__name__}), not a dict.",
                hint="Set TASK_DB to a dict, such as {'STRATEGY': 'close_old'}.",
                id="django_task_db.E001",
            )
        ]
    errors: list[CheckMessage] = []
    for key in value:
        if key not in conf.DEFAULTS:
            guess = get_close_matches(str(key), conf.DEFAULTS, n=1)
            errors.append(
                Error(
                    f"TASK_DB has an unknown key {key!r}"
                    + (f" (did you mean {guess[0]!r}?)." if guess else "."),
                    hint=f"Allowed keys: {', '.join(conf.DEFAULTS)}.",
                    id="django_task_db.E002",
                )
            )
    for key in conf.BOOLEAN_KEYS:
        if key in value and not isinstance(value[key], bool):
            errors.append(
                Error(
                    f"TASK_DB[{key!r}] is {value[key]!r} "
                    f"({type(value[key]).__name__}), not a bool.",
                    hint=f"Set TASK_DB[{key!r}] to True or False.",
                    id="django_task_db.E005",
                )
            )
    if "STRATEGY" in value:
        errors += _check_strategy(value["STRATEGY"], "TASK_DB['STRATEGY']")
    aliases = value.get("ALIASES", {})
    if not isinstance(aliases, dict):
        errors.append(
            Error(
                f"TASK_DB['ALIASES'] is {aliases!r} ({type(aliases).__name__}), "
                "not a dict.",
                hint="Set TASK_DB['ALIASES'] to a dict of {alias: strategy}, "
                "such as {'replica': 'keep'}.",
                id="django_task_db.E005",
            )
        )
        aliases = {}
    for alias, strategy in aliases.items():
        if alias not in settings.DATABASES:
            errors.append(
                Error(
                    f"TASK_DB['ALIASES'] names the database alias {alias!r}, "
                    "which DATABASES lacks.",
                    hint=f"Database aliases: {', '.join(settings.DATABASES)}.",
                    id="django_task_db.E004",
                )
            )
        errors += _check_strategy(strategy, f"TASK_DB['ALIASES'][{alias!r}]")
    errors += _check_pool_health_checks(value)
    return errors


def _check_strategy(spec: Any, where: str) -> list[CheckMessage]:
    try:
        conf.load(spec, where)
    except conf.StrategyError as exc:
        return [Error(str(exc), hint=HINT_STRATEGY, id=exc.check_id)]
    return []


def _check_pool_health_checks(value: dict[str, Any]) -> list[CheckMessage]:
    if not value.get("HEALTH_CHECKS", True):
        return []
    return [
        Warning(
            f"TASK_DB['HEALTH_CHECKS'] cannot check the pooled connections of "
            f"the database alias {alias!r}: Django's PostgreSQL pool hands out "
            "connections unchecked unless CONN_HEALTH_CHECKS is True.",
            hint=f"Set DATABASES[{alias!r}]['CONN_HEALTH_CHECKS'] = True.",
            id="django_task_db.W001",
        )
        for alias, database in _databases().items()
        if database.get("OPTIONS", {}).get("pool")
        and not database.get("CONN_HEALTH_CHECKS", False)
    ]


def _databases() -> dict[str, dict[str, Any]]:
    return settings.DATABASES  # type: ignore[return-value]
