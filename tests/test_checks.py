"""The system checks on TASK_DB, and the same errors when a bad value reaches a task."""

from __future__ import annotations

import pytest
from django.core.checks import Error, Warning
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connections
from django.test import override_settings

from django_task_db import conf, task_scope
from django_task_db.checks import check_settings
from django_task_db.signals import task_started
from tests.testapp.models import Item

ALLOWED = conf.ALLOWED_STRATEGIES
POOL = {"pool": {"min_size": 1, "max_size": 2}}


def swapped_strategy(connection, phase):
    """Stands for a user's strategy; the tests replace it on the module."""


def one(messages):
    assert len(messages) == 1, messages
    return messages[0]


def run_checks(task_db):
    with override_settings(TASK_DB=task_db):
        return check_settings(None)


@pytest.mark.parametrize(
    "task_db",
    [
        {},
        {"STRATEGY": "close_old"},
        {"STRATEGY": "close_all", "CLOSE_CACHES": True},
        {"STRATEGY": "keep", "HEALTH_CHECKS": False, "FORK_SAFETY": False},
        {"STRATEGY": "django_task_db.strategies.keep", "CLOSE_ON_FAILURE": False},
        {"STRATEGY": swapped_strategy},
        {"ALIASES": {"default": "keep", "mysql": "close_all", "postgres": "close_old"}},
        {"ALIASES": {"default": "tests.test_checks.swapped_strategy"}},
    ],
)
def test_valid_configuration_has_no_messages(task_db):
    """Builtin names, a real dotted path, a callable, valid ALIASES: no messages."""
    assert run_checks(task_db) == []


def test_no_task_db_setting_has_no_messages():
    """Without any TASK_DB setting the defaults pass every check."""
    from django.conf import settings

    assert not hasattr(settings, "TASK_DB")
    assert check_settings(None) == []


def test_e001_task_db_not_a_dict():
    """TASK_DB as a string is E001 naming the value, its type and 'dict'."""
    error = one(run_checks("close_all"))
    assert isinstance(error, Error)
    assert error.id == "django_task_db.E001"
    assert "TASK_DB" in error.msg
    assert "'close_all'" in error.msg
    assert "(str)" in error.msg
    assert "not a dict" in error.msg
    assert error.hint and "dict" in error.hint


def test_e002_unknown_key_with_suggestion():
    """A misspelt key is E002 naming it and the likely key; the hint lists all."""
    error = one(run_checks({"STRATEGIE": "keep"}))
    assert error.id == "django_task_db.E002"
    assert "'STRATEGIE'" in error.msg
    assert "did you mean 'STRATEGY'?" in error.msg
    assert error.hint == "Allowed keys: " + ", ".join(conf.DEFAULTS) + "."


@pytest.mark.parametrize(
    ("key", "guess"), [("strategy", "STRATEGY"), ("Close_Caches", "CLOSE_CACHES")]
)
def test_e002_key_in_the_wrong_case_gets_the_right_one(key, guess):
    """Keys are upper case, like Django's settings: a key in another case is
    E002 naming the key it should be."""
    error = one(run_checks({key: "keep"}))
    assert error.id == "django_task_db.E002"
    assert f"did you mean {guess!r}?" in error.msg


def test_e002_unknown_key_without_suggestion():
    """A key resembling nothing is E002 without a guess, one error per key."""
    errors = run_checks({"ZZZ": 1, "QQQ": 2})
    assert [e.id for e in errors] == ["django_task_db.E002"] * 2
    assert "'ZZZ'" in errors[0].msg and "'QQQ'" in errors[1].msg
    assert "did you mean" not in errors[0].msg
    assert all(e.hint for e in errors)


def test_e003_unknown_strategy_name():
    """STRATEGY 'nope' is E003 naming the key, the value and the allowed values."""
    error = one(run_checks({"STRATEGY": "nope"}))
    assert isinstance(error, Error)
    assert error.id == "django_task_db.E003"
    assert "TASK_DB['STRATEGY']" in error.msg
    assert "'nope'" in error.msg
    assert ALLOWED in error.msg
    assert error.hint == conf.HINT_STRATEGY


def test_e003_unknown_strategy_name_in_aliases():
    """An unknown strategy in ALIASES is E003 naming the alias's entry."""
    error = one(run_checks({"ALIASES": {"default": "close"}}))
    assert error.id == "django_task_db.E003"
    assert "TASK_DB['ALIASES']['default']" in error.msg
    assert "'close'" in error.msg
    assert ALLOWED in error.msg
    assert error.hint


def test_e004_alias_missing_from_databases():
    """An ALIASES key that DATABASES lacks is E004, hint listing the real aliases."""
    error = one(run_checks({"ALIASES": {"replica": "keep"}}))
    assert error.id == "django_task_db.E004"
    assert "TASK_DB['ALIASES']" in error.msg
    assert "'replica'" in error.msg
    assert error.hint
    for alias in connections.settings:
        assert alias in error.hint


def test_e004_and_e003_for_the_same_entry():
    """A missing alias with a bad strategy reports both problems."""
    errors = run_checks({"ALIASES": {"replica": "nope"}})
    assert sorted(e.id for e in errors) == [
        "django_task_db.E003",
        "django_task_db.E004",
    ]


@pytest.mark.parametrize("key", conf.BOOLEAN_KEYS)
@pytest.mark.parametrize("value", ["no", 1, 0, None])
def test_e005_boolean_key_of_wrong_type(key, value):
    """Each boolean key set to a non-bool is E005 naming the key, value and 'bool'."""
    error = one(run_checks({key: value}))
    assert error.id == "django_task_db.E005"
    assert f"TASK_DB[{key!r}]" in error.msg
    assert f"{value!r} ({type(value).__name__})" in error.msg
    assert "not a bool" in error.msg
    assert error.hint and "True or False" in error.hint


@pytest.mark.parametrize("aliases", [["default"], "default", None])
def test_e005_aliases_not_a_dict(aliases):
    """ALIASES that is not a dict is E005 naming ALIASES, its value and 'dict'."""
    error = one(run_checks({"ALIASES": aliases}))
    assert error.id == "django_task_db.E005"
    assert "TASK_DB['ALIASES']" in error.msg
    assert repr(aliases) in error.msg
    assert "not a dict" in error.msg
    assert error.hint and "dict" in error.hint


@pytest.mark.parametrize("value", [42, None, ["close_all"], b"close_all"])
def test_e005_strategy_of_wrong_type(value):
    """STRATEGY neither str nor callable is E005 naming key, value and allowed."""
    error = one(run_checks({"STRATEGY": value}))
    assert error.id == "django_task_db.E005"
    assert "TASK_DB['STRATEGY']" in error.msg
    assert f"{value!r} ({type(value).__name__})" in error.msg
    assert ALLOWED in error.msg
    assert error.hint


def test_e005_alias_strategy_of_wrong_type():
    """An ALIASES entry neither str nor callable is E005 naming the entry."""
    error = one(run_checks({"ALIASES": {"mysql": 3}}))
    assert error.id == "django_task_db.E005"
    assert "TASK_DB['ALIASES']['mysql']" in error.msg
    assert "3 (int)" in error.msg
    assert error.hint


@pytest.mark.parametrize(
    "path, words",
    [
        ("django_task_db.strategies.nope", "does not import"),
        ("no_such_package_xyz.strategy", "does not import"),
        ("django_task_db.conf.ALLOWED_STRATEGIES", "imports a str, not a callable"),
        ("django_task_db.conf.DEFAULTS", "imports a dict, not a callable"),
    ],
)
def test_e006_dotted_path(path, words):
    """A dotted path that fails to import or isn't callable is E006."""
    error = one(run_checks({"STRATEGY": path}))
    assert error.id == "django_task_db.E006"
    assert "TASK_DB['STRATEGY']" in error.msg
    assert repr(path) in error.msg
    assert words in error.msg
    assert ALLOWED in error.msg
    assert error.hint


def test_several_problems_are_all_reported():
    """Every bad key is reported at once, not only the first."""
    errors = run_checks(
        {
            "STRATEGY": "nope",
            "HEALTH_CHECKS": "yes",
            "ALIASES": {"replica": "keep"},
            "X": 1,
        }
    )
    assert sorted(e.id for e in errors) == [
        "django_task_db.E002",
        "django_task_db.E003",
        "django_task_db.E004",
        "django_task_db.E005",
    ]


def databases_with(alias, base="default", **extra):
    return {**connections.settings, alias: {**connections.settings[base], **extra}}


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_w001_pool_without_conn_health_checks(settings):
    """A PostgreSQL pool alias lacking CONN_HEALTH_CHECKS is W001 while
    HEALTH_CHECKS is on."""
    settings.DATABASES = databases_with(
        "pooled", "postgres", OPTIONS=POOL, CONN_HEALTH_CHECKS=False
    )
    for task_db in ({}, {"HEALTH_CHECKS": True}):
        settings.TASK_DB = task_db
        warning = one(check_settings(None))
        assert isinstance(warning, Warning)
        assert warning.id == "django_task_db.W001"
        assert "'pooled'" in warning.msg
        assert "CONN_HEALTH_CHECKS" in warning.msg
        assert warning.hint == "Set DATABASES['pooled']['CONN_HEALTH_CHECKS'] = True."


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
@pytest.mark.parametrize(
    "task_db, extra",
    [
        ({"HEALTH_CHECKS": False}, {"OPTIONS": POOL}),
        ({}, {"OPTIONS": POOL, "CONN_HEALTH_CHECKS": True}),
        ({}, {"OPTIONS": {"pool": False}}),
        ({}, {}),
    ],
)
def test_w001_not_raised(settings, task_db, extra):
    """No W001 with HEALTH_CHECKS off, with CONN_HEALTH_CHECKS on, or without a pool."""
    settings.DATABASES = databases_with("other", **extra)
    settings.TASK_DB = task_db
    assert check_settings(None) == []


def test_check_command_runs_the_checks(settings):
    """manage.py check fails with the id: the checks are registered."""
    settings.TASK_DB = {"STRATEGY": "nope"}
    with pytest.raises(SystemCheckError) as raised:
        call_command("check")
    assert "django_task_db.E003" in str(raised.value)
    assert "'nope'" in str(raised.value)


def test_check_command_passes_on_a_valid_configuration(settings):
    """manage.py check passes with a valid TASK_DB."""
    settings.TASK_DB = {"STRATEGY": "close_all", "ALIASES": {"default": "keep"}}
    call_command("check")


def test_scope_with_unknown_strategy_raises_before_the_body():
    """task_scope(strategy='nope') raises on entry; body skipped; next scope ok."""
    ran = []
    starts = []
    with pytest.raises(ImproperlyConfigured) as raised:
        with task_scope(strategy="nope"):
            ran.append(True)
    assert ran == []
    message = str(raised.value)
    assert "'nope'" in message
    assert ALLOWED in message
    assert raised.value.check_id == "django_task_db.E003"

    def record(**kwargs):
        starts.append(kwargs)

    task_started.connect(record)
    try:
        with task_scope():
            ran.append(True)
    finally:
        task_started.disconnect(record)
    assert ran == [True]
    assert len(starts) == 1


@pytest.mark.parametrize(
    "strategy, check_id",
    [
        (42, "django_task_db.E005"),
        ("django_task_db.strategies.nope", "django_task_db.E006"),
        ("django_task_db.conf.ALLOWED_STRATEGIES", "django_task_db.E006"),
    ],
)
def test_scope_with_bad_strategy_argument(strategy, check_id):
    """task_scope(strategy=<bad>) raises ImproperlyConfigured before the body."""
    ran = []
    with pytest.raises(ImproperlyConfigured) as raised:
        with task_scope(strategy=strategy):
            ran.append(True)
    assert ran == []
    assert repr(strategy) in str(raised.value)
    assert ALLOWED in str(raised.value)
    assert raised.value.check_id == check_id


@pytest.mark.parametrize(
    "task_db",
    [
        {"STRATEGY": "nope"},
        {"STRATEGY": 42},
        {"STRATEGY": "django_task_db.strategies.nope"},
        {"STRATEGY": "django_task_db.conf.ALLOWED_STRATEGIES"},
        {"ALIASES": {"default": "nope"}},
        {"ALIASES": {"default": None}},
    ],
)
def test_bad_setting_at_task_time_has_the_check_message(sqlite, settings, task_db):
    """A bad TASK_DB strategy at task time raises with the check's exact message."""
    expected = one(run_checks(task_db))
    Item.objects.using(sqlite).count()  # an open connection the strategy applies to
    settings.TASK_DB = task_db
    ran = []
    with pytest.raises(ImproperlyConfigured) as raised:
        with task_scope():
            ran.append(True)
    assert ran == []
    assert str(raised.value) == expected.msg
    assert raised.value.check_id == expected.id


def test_task_db_not_a_dict_at_task_time(settings):
    """TASK_DB not a dict raises ImproperlyConfigured on entry; body skipped."""
    settings.TASK_DB = ["close_all"]
    ran = []
    with pytest.raises(ImproperlyConfigured) as raised:
        with task_scope():
            ran.append(True)
    assert ran == []
    assert "TASK_DB" in str(raised.value)
    assert "list" in str(raised.value)


def test_dotted_path_cache_dropped_when_task_db_changes(settings, monkeypatch):
    """A dotted path is imported once, then re-imported after TASK_DB changes."""
    import tests.test_checks as module

    path = "tests.test_checks.swapped_strategy"
    settings.TASK_DB = {"STRATEGY": path}
    first = conf.boundary().strategy
    assert first is swapped_strategy

    def replacement(connection, phase):
        pass

    monkeypatch.setattr(module, "swapped_strategy", replacement)
    assert conf.boundary().strategy is first  # cached
    settings.UNRELATED_SETTING = True  # another setting: the cache stays
    assert conf.boundary().strategy is first
    settings.TASK_DB = {"STRATEGY": path, "CLOSE_CACHES": True}
    assert conf.boundary().strategy is replacement


def test_dotted_path_cache_dropped_by_override_settings(monkeypatch):
    """Leaving an override_settings(TASK_DB=...) also drops the imported paths."""
    import tests.test_checks as module

    path = "tests.test_checks.swapped_strategy"
    with override_settings(TASK_DB={"STRATEGY": path}):
        assert conf.boundary().strategy is swapped_strategy

    def replacement(connection, phase):
        pass

    monkeypatch.setattr(module, "swapped_strategy", replacement)
    with override_settings(TASK_DB={"STRATEGY": path}):
        assert conf.boundary().strategy is replacement
