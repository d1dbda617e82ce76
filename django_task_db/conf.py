"""The TASK_DB setting, read at the moment of use so override_settings just works."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

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
    "CLOSE_ON_FAILURE": True,
    "CLOSE_CACHES": False,
    "FORK_SAFETY": True,
}
BOOLEAN_KEYS = ("HEALTH_CHECKS", "CLOSE_ON_FAILURE", "CLOSE_CACHES", "FORK_SAFETY")

BUILTIN_STRATEGIES: dict[str, Strategy] = {
    "close_old": strategies.close_old,
    "close_all": strategies.close_all,
    "keep": strategies.keep,
}
ALLOWED_STRATEGIES = (
    "'close_old', 'close_all', 'keep', or the dotted path of a callable "
    "taking (connection, phase)"
)


class StrategyError(ImproperlyConfigured):
    """A strategy that cannot be used; ``check_id`` is the system check's."""

    def __init__(self, message: str, check_id: str):
        super().__init__(message)
        self.check_id = check_id


def task_db() -> dict[str, Any]:
    value = getattr(settings, "TASK_DB", {})
    if not isinstance(value, dict):
        raise ImproperlyConfigured(
            f"TASK_DB must be a dict, not {type(value).__name__}."
        )
    return value


def get(key: str) -> Any:
    return task_db().get(key, DEFAULTS[key])


def strategy_for(alias: str, override: StrategySpec | None = None) -> Strategy:
    """The strategy that applies to ``alias``: the unit's override, then
    TASK_DB["ALIASES"][alias], then TASK_DB["STRATEGY"]."""
    if override is not None:
        return load(override, "strategy")
    aliases = get("ALIASES")
    if isinstance(aliases, dict) and alias in aliases:
        return load(aliases[alias], f"TASK_DB['ALIASES'][{alias!r}]")
    return load(get("STRATEGY"), "TASK_DB['STRATEGY']")


def load(spec: StrategySpec, where: str) -> Strategy:
    """Turn a strategy name, dotted path or callable into a callable.

    ``where`` names the setting or argument the value came from, for the
    error message.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise StrategyError(
            f"{where} is {spec!r} ({type(spec).__name__}); "
            f"allowed: {ALLOWED_STRATEGIES}.",
            "django_task_db.E005",
        )
    return _load_string(spec, where)


@cache
def _load_string(spec: str, where: str) -> Strategy:
    if spec in BUILTIN_STRATEGIES:
        return BUILTIN_STRATEGIES[spec]
    if "." not in spec:
        raise StrategyError(
            f"{where} is {spec!r}, which is not a strategy; "
            f"allowed: {ALLOWED_STRATEGIES}.",
            "django_task_db.E003",
        )
    try:
        strategy = import_string(spec)
    except ImportError as exc:
        raise StrategyError(
            f"{where} is {spec!r}, which does not import ({exc}); "
            f"allowed: {ALLOWED_STRATEGIES}.",
            "django_task_db.E006",
        ) from exc
    if not callable(strategy):
        raise StrategyError(
            f"{where} is {spec!r}, which imports a {type(strategy).__name__}, "
            f"not a callable; allowed: {ALLOWED_STRATEGIES}.",
            "django_task_db.E006",
        )
    return strategy  # type: ignore[no-any-return]


def clear_cache(*, setting: str, **kwargs: Any) -> None:
    """Receiver of setting_changed: forget imported dotted paths."""
    if setting == "TASK_DB":
        _load_string.cache_clear()
