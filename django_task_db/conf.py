"""The TASK_DB setting, read at the moment of use so override_settings just works."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from django_task_db import strategies

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

Phase = Literal["start", "finish"]
Strategy = Callable[["BaseDatabaseWrapper", Phase], object]
StrategySpec = str | Strategy

DEFAULTS: dict[str, Any] = {
    "STRATEGY": "close_old",
    "ALIASES": {},
    "HEALTH_CHECKS": True,
    "HEALTH_CHECK_IDLE": 1.0,
    "CLOSE_ON_FAILURE": True,
    "CLOSE_CACHES": False,
    "FORK_SAFETY": True,
    "CELERY": True,
    "REPLACE_CELERY_FIXUP": True,
}
BOOLEAN_KEYS = tuple(key for key, value in DEFAULTS.items() if isinstance(value, bool))

BUILTIN_STRATEGIES: dict[str, Strategy] = {
    "close_old": strategies.close_old,
    "close_all": strategies.close_all,
    "keep": strategies.keep,
}
ALLOWED_STRATEGIES = (
    "'close_old', 'close_all', 'keep', or the dotted path of a callable "
    "taking (connection, phase)"
)


HINT_STRATEGY = (
    "Strategy names are close_old, close_all and keep; a strategy of your own "
    "is named by its dotted path, such as 'myproject.db.close_at_finish'."
)


_DOTTED_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")

# user:password@ in a URL.
_CREDENTIALS = re.compile(r"(?<=://)([^:/@\s]*):[^@\s]*@")


def masked(text: str) -> str:
    """``text`` without the passwords of the URLs in it."""
    return _CREDENTIALS.sub(r"\1:***@", text)


def shown(value: object) -> str:
    """``value`` for an error message, without the secrets it may hold: a
    dict (such as a copy of DATABASES[alias]) by its keys, a URL without its
    password."""
    if isinstance(value, dict):
        keys = ", ".join(repr(key) for key in value)
        return f"a dict with the keys {keys}" if value else "an empty dict"
    if isinstance(value, list | tuple | set) and not all(
        isinstance(item, str | int | float | bool | None) for item in value
    ):
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return masked(text if len(text) <= 200 else text[:200] + "...")


class SettingError(ImproperlyConfigured):
    """A bad TASK_DB value, or strategy argument. ``check_id`` and ``hint``
    are those of the system check that reports the same problem."""

    def __init__(self, message: str, check_id: str, hint: str):
        super().__init__(message)
        self.check_id = check_id
        self.hint = hint


def task_db() -> dict[str, Any]:
    value = getattr(settings, "TASK_DB", {})
    if not isinstance(value, dict):
        raise SettingError(
            f"TASK_DB is {shown(value)} ({type(value).__name__}), not a dict.",
            "django_task_db.E001",
            "Set TASK_DB to a dict, such as {'STRATEGY': 'close_old'}.",
        )
    return value


# The validated value of each key and the strategies of TASK_DB are cached:
# a boundary reads several, and a setting that is absent costs an exception
# inside Django at every read. Dropped on setting_changed, with the imports.
@cache
def get(key: str) -> Any:
    value = task_db().get(key, DEFAULTS[key])
    if key in BOOLEAN_KEYS and not isinstance(value, bool):
        raise SettingError(
            f"TASK_DB[{key!r}] is {shown(value)} ({type(value).__name__}), not a bool.",
            "django_task_db.E005",
            f"Set TASK_DB[{key!r}] to True or False.",
        )
    if key == "HEALTH_CHECK_IDLE" and (
        isinstance(value, bool) or not isinstance(value, int | float) or value < 0
    ):
        raise SettingError(
            f"TASK_DB['HEALTH_CHECK_IDLE'] is {shown(value)} ({type(value).__name__}); "
            "allowed: a number of seconds, 0 or more.",
            "django_task_db.E005",
            "Set TASK_DB['HEALTH_CHECK_IDLE'] to a number of seconds, such as 1.0, "
            "or 0 to check before the first query of every unit instead.",
        )
    if key == "ALIASES" and not isinstance(value, dict):
        raise SettingError(
            f"TASK_DB['ALIASES'] is {shown(value)} ({type(value).__name__}), "
            "not a dict.",
            "django_task_db.E005",
            "Set TASK_DB['ALIASES'] to a dict of {alias: strategy}, such as "
            "{'replica': 'keep'}.",
        )
    return value


@dataclass(frozen=True, slots=True)
class Boundary:
    """What a unit's boundaries need of TASK_DB, validated: read once per
    value of the setting, not at every boundary."""

    strategy: Strategy  # STRATEGY
    aliases: dict[str, Strategy]  # ALIASES
    ping_every_unit: bool  # HEALTH_CHECKS, with HEALTH_CHECK_IDLE 0
    close_on_failure: bool  # CLOSE_ON_FAILURE
    close_caches: bool  # CLOSE_CACHES


@cache
def boundary() -> Boundary:
    """TASK_DB for the boundaries. Raises SettingError for a bad value
    (without caching it: it raises again at the next boundary)."""
    aliases = {
        alias: load(spec, f"TASK_DB['ALIASES'][{alias!r}]")
        for alias, spec in get("ALIASES").items()
    }
    return Boundary(
        strategy=load(get("STRATEGY"), "TASK_DB['STRATEGY']"),
        aliases=aliases,
        ping_every_unit=get("HEALTH_CHECKS") and get("HEALTH_CHECK_IDLE") == 0,
        close_on_failure=get("CLOSE_ON_FAILURE"),
        close_caches=get("CLOSE_CACHES"),
    )


@cache
def idle_limit() -> float:
    """Seconds of idling after which a connection is checked at its next
    use: HEALTH_CHECK_IDLE, or infinity when HEALTH_CHECKS is off, when it is
    0 (Django pings before each unit's first query instead) or invalid (the
    next boundary and the system checks report it)."""
    try:
        idle: float = get("HEALTH_CHECK_IDLE")
        if get("HEALTH_CHECKS") and idle > 0:
            return idle
    except SettingError:
        pass
    return math.inf


def strategies_for(
    override: StrategySpec | None, config: Boundary
) -> tuple[Strategy, dict[str, Strategy]]:
    """The strategies of one boundary: the default one, and those of the
    aliases that have their own. A unit's override applies to every alias.
    Resolved before any connection is touched, so a bad value raises first."""
    if override is None:
        return config.strategy, config.aliases
    return load(override, "the unit's strategy"), {}


def load(spec: StrategySpec, where: str) -> Strategy:
    """Turn a strategy name, dotted path or callable into a callable.

    ``where`` names the setting or argument the value came from, for the
    error message. Raises SettingError.
    """
    if callable(spec):
        _reject_coroutine_function(spec, where, spec)
        return spec
    if not isinstance(spec, str):
        raise SettingError(
            f"{where} is {shown(spec)} ({type(spec).__name__}); "
            f"allowed: {ALLOWED_STRATEGIES}.",
            "django_task_db.E005",
            HINT_STRATEGY,
        )
    return _load_string(spec, where)


@cache
def _load_string(spec: str, where: str) -> Strategy:
    if spec in BUILTIN_STRATEGIES:
        return BUILTIN_STRATEGIES[spec]
    if not _DOTTED_PATH.fullmatch(spec):
        raise SettingError(
            f"{where} is {shown(spec)}, which is not a strategy; "
            f"allowed: {ALLOWED_STRATEGIES}.",
            "django_task_db.E003",
            HINT_STRATEGY,
        )
    hint = "Check the module and attribute names, and that the module imports."
    strategy, error = _import(spec)
    if isinstance(error, ImportError):
        raise SettingError(
            f"{where} is {shown(spec)}, which does not import ({masked(str(error))}); "
            f"allowed: {ALLOWED_STRATEGIES}.",
            "django_task_db.E006",
            hint,
        )
    if error is not None:
        raise SettingError(
            f"{where} is {shown(spec)}, whose module raised "
            f"{type(error).__name__}: {masked(str(error))} when imported; "
            f"allowed: {ALLOWED_STRATEGIES}.",
            "django_task_db.E006",
            hint,
        )
    if not callable(strategy):
        raise SettingError(
            f"{where} is {shown(spec)}, which imports a {type(strategy).__name__}, "
            f"not a callable; allowed: {ALLOWED_STRATEGIES}.",
            "django_task_db.E006",
            hint,
        )
    _reject_coroutine_function(strategy, where, spec)
    return strategy  # type: ignore[no-any-return]


@cache
def _import(path: str) -> tuple[Any, Exception | None]:
    """Import ``path`` once, failure included: a module that raises at
    import would raise again, and run its side effects again, every time."""
    try:
        return import_string(path), None
    except Exception as exc:
        return None, exc


def _reject_coroutine_function(strategy: Any, where: str, spec: object) -> None:
    if iscoroutinefunction(strategy) or iscoroutinefunction(type(strategy).__call__):
        raise SettingError(
            f"{where} is {shown(spec)}, a coroutine function: strategies are called "
            "in the thread that owns the connection and are never awaited; "
            f"allowed: {ALLOWED_STRATEGIES}.",
            "django_task_db.E006",
            "Make the strategy a plain (synchronous) function.",
        )


def clear_cache(*, setting: str, **kwargs: Any) -> None:
    """Receiver of setting_changed: forget TASK_DB's values and imports."""
    if setting == "TASK_DB":
        _load_string.cache_clear()
        _import.cache_clear()
        get.cache_clear()
        boundary.cache_clear()
        idle_limit.cache_clear()
