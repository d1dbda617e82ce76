"""System checks: bad TASK_DB values fail ``manage.py check``, not a task.

The messages are those of the errors the same values raise at run time.
The checks tagged ``database`` ask the servers (``manage.py check
--database ALIAS``, and ``migrate`` for its alias).
"""

from __future__ import annotations

import importlib.util
from difflib import get_close_matches
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.db import connections

from django_task_db import conf, diagnostics, strategies


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


@register()
def check_aliases(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Settings of an alias that defeat its strategy (no server needed)."""
    try:
        config = conf.boundary()
    except conf.SettingError:
        return []  # check_settings reports it
    databases: dict[str, dict[str, Any]] = settings.DATABASES  # type: ignore[assignment]
    messages: list[CheckMessage] = []
    for alias, database in databases.items():
        strategy = config.aliases.get(alias, config.strategy)
        age = database.get("CONN_MAX_AGE", 0)
        pool = diagnostics.pool_of(alias)
        health_checks = conf.get("HEALTH_CHECKS") or database.get("CONN_HEALTH_CHECKS")
        if (
            strategy is strategies.close_old
            and age is None
            and not health_checks
            and connections[alias].vendor != "sqlite"  # no server to drop it
        ):
            messages.append(
                Warning(
                    f"The database alias {alias!r} keeps its connection forever "
                    "(CONN_MAX_AGE None) with health checks off: close_old never "
                    "replaces a connection the server dropped (its idle timeout, a "
                    "restart), and the next unit of work fails on it.",
                    hint="Leave TASK_DB['HEALTH_CHECKS'] on, set "
                    f"DATABASES[{alias!r}]['CONN_HEALTH_CHECKS'] = True, or set "
                    "CONN_MAX_AGE below the server's idle timeout.",
                    id="django_task_db.W006",
                )
            )
        if strategy is strategies.close_all and pool is None and age != 0:
            messages.append(
                Warning(
                    f"The database alias {alias!r} has the strategy close_all, which "
                    "closes its connection at every unit of work's start and end: "
                    f"CONN_MAX_AGE {age} keeps connections between requests only, "
                    "never from one unit to the next.",
                    hint="Use close_old to reuse connections across units (it still "
                    "closes those older than CONN_MAX_AGE), or set CONN_MAX_AGE to 0.",
                    id="django_task_db.W007",
                )
            )
        if strategy is strategies.keep and pool is not None:
            messages.append(
                Warning(
                    f"The database alias {alias!r} uses Django's PostgreSQL pool "
                    "with the strategy keep: a thread never returns its pooled "
                    "connection, so at most OPTIONS['pool']['max_size'] "
                    f"({pool.max_size}) threads per process can work and the others "
                    "wait for the pool's timeout.",
                    hint="Use close_old or close_all, which return the connection "
                    "to the pool at the end of each unit.",
                    id="django_task_db.W008",
                )
            )
    return messages


@register(Tags.database)
def check_servers(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[CheckMessage]:
    """Server settings that break connections kept between units, for the
    aliases named (``check --database``); leaves no connection open."""
    messages: list[CheckMessage] = []
    for alias in databases or ():
        try:
            server = diagnostics.read_server(connections[alias])
        except Exception as exc:  # the driver's error, whichever it is
            text = diagnostics.without_secrets(str(exc).strip(), alias)
            messages.append(
                Warning(
                    f"The server of the database alias {alias!r} could not be "
                    f"asked for its settings: {type(exc).__name__}: {text}",
                    id="django_task_db.W009",
                )
            )
            continue
        if server is not None:
            messages += _check_idle_timeout(alias, server)
            if connections[alias].vendor == "postgresql":
                pooler = diagnostics.read_pooler(alias)
                messages += _check_postgresql_timeouts(alias, server, pooler)
                messages += _check_pooler(alias, pooler)
    return messages


def _check_idle_timeout(alias: str, server: diagnostics.Server) -> list[CheckMessage]:
    timeout = server.idle_timeout
    if timeout is None:
        return []
    name = server.idle_timeout_setting
    pool = diagnostics.pool_of(alias)
    if pool is not None:
        if pool.max_idle < timeout:
            return []
        return [
            Warning(
                f"Django's pool of the database alias {alias!r} keeps unused "
                f"connections for {pool.max_idle:g} s (max_idle), and the server "
                f"closes them after {timeout:g} s ({name}): the pool hands out "
                "connections the server has dropped.",
                hint=f"Set DATABASES[{alias!r}]['OPTIONS']['pool']['max_idle'] "
                f"below {timeout:g}, or raise {name}.",
                id="django_task_db.W003",
            )
        ]
    age = diagnostics.database_settings(alias).get("CONN_MAX_AGE", 0)
    if age is not None and age < timeout:
        return []
    return [
        Warning(
            f"The database alias {alias!r} keeps connections "
            f"{'forever' if age is None else f'for {age:g} s'} (CONN_MAX_AGE), and the "
            f"server closes those idle for {timeout:g} s ({name}, as this alias's "
            "session sees it): a connection kept between units of work can be "
            "dropped before its next use.",
            hint=f"Set DATABASES[{alias!r}]['CONN_MAX_AGE'] below {timeout:g}, "
            f"or raise {name}.",
            id="django_task_db.W003",
        )
    ]


def _check_postgresql_timeouts(
    alias: str, server: diagnostics.Server, pooler: diagnostics.Pooler | None
) -> list[CheckMessage]:
    # PgBouncer refuses the startup parameter "options" (unless told to
    # ignore it, when it is lost): behind it, settings go on the role.
    where = (
        "on the server or for the role (ALTER ROLE ... SET; PgBouncer refuses "
        "OPTIONS['options'])"
        if pooler is not None
        else "on the server, for the role (ALTER ROLE ... SET), or for the alias"
    )
    messages: list[CheckMessage] = []
    if server.client_connection_check_interval is None:
        major = int(server.version.split(".")[0])
        hint = (
            "Needs PostgreSQL 14 or later."
            if major < 14
            else "Set client_connection_check_interval to a few seconds, such as "
            f"'10s', {where}"
            + (
                ""
                if pooler is not None
                else f": DATABASES[{alias!r}]['OPTIONS']['options'] = "
                "'-c client_connection_check_interval=10s'"
            )
            + "."
        )
        messages.append(
            Warning(
                "PostgreSQL's client_connection_check_interval is off for the "
                f"database alias {alias!r}: the query of a worker that was killed "
                "(SIGKILL, the OOM killer, Celery's hard time limit) keeps running, "
                "with its locks, until it finishes and tries to send its result.",
                hint=hint,
                id="django_task_db.W004",
            )
        )
    if server.idle_in_transaction_session_timeout is None:
        messages.append(
            Warning(
                "PostgreSQL's idle_in_transaction_session_timeout is off for the "
                f"database alias {alias!r}: a worker that stalls inside a "
                "transaction (waiting on a network call in an atomic block), or "
                "whose host vanished, holds the transaction's locks until it "
                "resumes or its TCP connection times out.",
                hint="Set idle_in_transaction_session_timeout above the longest "
                f"pause your code makes inside a transaction, such as '5min', {where}"
                + ("." if pooler is not None else " (OPTIONS['options'])."),
                id="django_task_db.W005",
            )
        )
    return messages


def _check_pooler(alias: str, pooler: diagnostics.Pooler | None) -> list[CheckMessage]:
    if pooler is None or pooler.pool_mode == "session":
        return []
    if diagnostics.database_settings(alias).get("DISABLE_SERVER_SIDE_CURSORS"):
        return []
    mode = (
        f"pools by {pooler.pool_mode}"
        if pooler.pool_mode is not None
        else "may pool by transaction (its admin console would not say)"
    )
    return [
        Warning(
            f"The database alias {alias!r} goes through PgBouncer, which {mode}: "
            "QuerySet.iterator() reads through a server-side cursor, chunk by "
            "chunk, and the next chunk may run on a server session that lacks the "
            "cursor (cursor ... does not exist).",
            hint=f"Set DATABASES[{alias!r}]['DISABLE_SERVER_SIDE_CURSORS'] = True "
            "(Django's documentation, Transaction pooling and server-side cursors).",
            id="django_task_db.W010",
        )
    ]
