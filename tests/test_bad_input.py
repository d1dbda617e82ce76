"""Bad input: a clear error naming the setting or argument, the value and what
is allowed, once, and nothing else breaks."""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import logging
import os
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_task_db import task_scope
from django_task_db.checks import check_settings
from django_task_db.signals import task_finished, task_started
from tests.names import REDIS_DB_BAD_INPUT
from tests.testapp.models import Item

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30
REDIS_DB = REDIS_DB_BAD_INPUT  # this module's Celery workers' broker

# Celery's Redis result backend still calls a method redis-py deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Call to deprecated setex:DeprecationWarning"
)


def one(messages: list[Any]) -> Any:
    assert len(messages) == 1, messages
    return messages[0]


class Sent:
    """The task_started and task_finished sends seen during a test."""

    def __init__(self) -> None:
        self.started: list[dict[str, Any]] = []
        self.finished: list[dict[str, Any]] = []

    def on_started(self, sender: Any, **kwargs: Any) -> None:
        self.started.append({"sender": sender, **kwargs})

    def on_finished(self, sender: Any, **kwargs: Any) -> None:
        self.finished.append({"sender": sender, **kwargs})


@pytest.fixture
def sent() -> Iterator[Sent]:
    seen = Sent()
    task_started.connect(
        seen.on_started, weak=False, dispatch_uid="tests.test_bad_input.started"
    )
    task_finished.connect(
        seen.on_finished, weak=False, dispatch_uid="tests.test_bad_input.finished"
    )
    try:
        yield seen
    finally:
        task_started.disconnect(dispatch_uid="tests.test_bad_input.started")
        task_finished.disconnect(dispatch_uid="tests.test_bad_input.finished")


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Write a module of a unique name into tmp_path, importable: returns its
    name; the modules are forgotten after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def make(label: str, source: str) -> str:
        name = f"helpc_{label}_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(source)
        importlib.invalidate_caches()
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


# -- 6a: the app missing from INSTALLED_APPS -----------------------------------

NOT_INSTALLED = r"""
import json
import sys

import django
from django.conf import settings

settings.configure(
    INSTALLED_APPS=[],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
)
django.setup()

import django_task_db
from django.core.exceptions import ImproperlyConfigured
from django_task_db import signals, task_scope

form = sys.argv[1]
result = {"package": django_task_db.__file__, "ran": []}


def body():
    result["ran"].append(True)


try:
    if form == "with":
        with task_scope():
            body()
    elif form == "decorator":
        decorated = task_scope(body)
        result["decorated"] = True
        decorated()
    elif form == "task_started":
        signals.task_started.send(sender=object())
        result["ran"].append(True)
except ImproperlyConfigured as exc:
    result["error"] = str(exc)
except Exception as exc:
    result["other"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(result))
"""


def run_not_installed(form: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    done = subprocess.run(
        [sys.executable, "-c", NOT_INSTALLED, form],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["package"]).resolve().is_relative_to(ROOT)
    return result


@pytest.mark.parametrize("form", ["with", "decorator", "task_started"])
def test_app_not_in_installed_apps(form):
    """App not in INSTALLED_APPS: a unit raises ImproperlyConfigured, body skipped."""
    result = run_not_installed(form)
    assert "other" not in result, result
    if form == "decorator":
        assert result.get("decorated"), result  # decorating works; calling raises
    assert "error" in result, result
    assert "django_task_db" in result["error"]
    assert "INSTALLED_APPS" in result["error"]
    assert result["ran"] == []


# -- 6b: the strategy given positionally ---------------------------------------


@pytest.mark.parametrize("value", ["close_all", 42])
def test_positional_strategy_is_refused_at_once(sent, value):
    """task_scope('close_all') or task_scope(42): TypeError, strategy= is a keyword."""
    with pytest.raises(TypeError) as raised:
        task_scope(value)
    message = str(raised.value)
    assert "strategy=" in message
    assert repr(value) in message
    assert sent.started == []


@pytest.mark.parametrize("value", ["close_all", 42])
def test_positional_strategy_in_a_decorator_runs_no_unit(sent, value):
    """@task_scope('close_all') raises TypeError at decoration; no unit runs."""
    ran = []
    with pytest.raises(TypeError) as raised:

        @task_scope(value)
        def job():
            ran.append(True)

    assert "strategy=" in str(raised.value)
    assert repr(value) in str(raised.value)
    assert ran == []
    assert sent.started == [] and sent.finished == []


@pytest.mark.parametrize("value", ["close_all", 42])
def test_positional_strategy_in_a_with_block(sent, value):
    """with task_scope('close_all'): TypeError naming strategy=; body skipped."""
    ran = []
    with pytest.raises(TypeError) as raised:
        with task_scope(value):
            ran.append(True)
    assert "strategy=" in str(raised.value)
    assert repr(value) in str(raised.value)
    assert ran == []
    assert sent.started == []


# -- 6c: coroutine functions as strategies -------------------------------------


async def async_strategy(connection, phase):
    """A strategy written as a coroutine function: never awaited by anyone."""
    connection.close()


class AsyncCall:
    async def __call__(self, connection, phase):
        connection.close()


async_call_strategy = AsyncCall()

ASYNC_PATHS = pytest.mark.parametrize(
    "path",
    [
        "tests.test_bad_input.async_strategy",
        "tests.test_bad_input.async_call_strategy",
    ],
    ids=["async_def", "async_call"],
)
WHERE = pytest.mark.parametrize("key", ["STRATEGY", "ALIASES"])


def task_db_with(key: str, path: str) -> dict[str, Any]:
    if key == "STRATEGY":
        return {"STRATEGY": path}
    return {"ALIASES": {"default": path}}


@contextmanager
def no_unawaited_coroutines() -> Iterator[list[warnings.WarningMessage]]:
    """Record the warnings of the block, garbage collected at its end."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield caught
        finally:
            gc.collect()


def runtime_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@ASYNC_PATHS
@WHERE
def test_async_strategy_path_is_e006(settings, key, path):
    """A dotted path to a coroutine function or async __call__ is E006, "coroutine"."""
    settings.TASK_DB = task_db_with(key, path)
    error = one(check_settings(None))
    assert error.id == "django_task_db.E006"
    assert "coroutine" in error.msg
    assert repr(path) in error.msg


@ASYNC_PATHS
@WHERE
def test_async_strategy_path_is_refused_at_use(sqlite, settings, key, path):
    """A coroutine strategy in TASK_DB: the unit raises first, no RuntimeWarning."""
    Item.objects.using(sqlite).count()  # an open connection the strategy applies to
    settings.TASK_DB = task_db_with(key, path)
    ran = []
    with no_unawaited_coroutines() as caught:
        with pytest.raises(ImproperlyConfigured) as raised:
            with task_scope():
                ran.append(True)
    assert ran == []
    assert "coroutine" in str(raised.value)
    assert repr(path) in str(raised.value)
    assert runtime_warnings(caught) == []


@pytest.mark.parametrize(
    "strategy", [async_strategy, async_call_strategy], ids=["async_def", "async_call"]
)
def test_async_strategy_argument_is_refused(sqlite, sent, strategy):
    """task_scope(strategy=<coroutine function>) raises first; nothing called."""
    Item.objects.using(sqlite).count()
    ran = []
    with no_unawaited_coroutines() as caught:
        with pytest.raises(ImproperlyConfigured) as raised:
            with task_scope(strategy=strategy):
                ran.append(True)
    assert ran == []
    assert "coroutine" in str(raised.value)
    assert runtime_warnings(caught) == []


# -- 6d: a strategy module that raises at import -------------------------------

BROKEN_STRATEGY = """\
import os

import {counter}

{counter}.runs.append(1)
REGION = os.environ["HELPC_MISSING_SETTING"]


def strategy(connection, phase):
    pass
"""


@WHERE
def test_strategy_module_raising_at_import(
    sqlite, settings, make_module, key, monkeypatch
):
    """A module raising KeyError at import: E006 naming it, run once, units refused."""
    monkeypatch.delenv("HELPC_MISSING_SETTING", raising=False)
    counter = make_module("runs", "runs = []\n")
    broken = make_module("broken", BROKEN_STRATEGY.format(counter=counter))
    path = f"{broken}.strategy"
    settings.TASK_DB = task_db_with(key, path)
    ran = []

    def unit() -> str:
        Item.objects.using(sqlite).count()
        with pytest.raises(ImproperlyConfigured) as raised:
            with task_scope():
                ran.append(True)
        return str(raised.value)

    def check() -> Any:
        error = one(check_settings(None))
        assert error.id == "django_task_db.E006"
        return error

    error = check()
    assert "KeyError" in error.msg
    assert "HELPC_MISSING_SETTING" in error.msg
    assert repr(path) in error.msg
    messages = [unit(), check().msg, unit(), unit(), check().msg]
    assert messages == [error.msg] * 5
    assert ran == []
    assert importlib.import_module(counter).runs == [1]


# -- 6e: unhashable senders ----------------------------------------------------


@pytest.mark.parametrize("form", ["with", "decorator", "async_with"])
def test_unhashable_sender_of_a_scope(sent, form):
    """task_scope(sender={"topic": "orders"}): body runs, receivers get that dict."""
    sender = {"topic": "orders"}
    ran = []
    if form == "with":
        with task_scope(sender=sender):
            ran.append(True)
    elif form == "decorator":

        @task_scope(sender=sender)
        def handle():
            ran.append(True)

        handle()
    else:

        async def handle_async():
            async with task_scope(sender=sender):
                ran.append(True)

        asyncio.run(handle_async())
    assert ran == [True]
    assert len(sent.started) == 1 and len(sent.finished) == 1
    assert sent.started[0]["sender"] is sender
    assert sent.finished[0]["sender"] is sender
    assert sent.finished[0]["failed"] is False


def test_unhashable_sender_of_the_signals(sent):
    """task_started/task_finished.send(sender=[1, 2]): receivers get that list."""
    sender = [1, 2]
    in_unit = False
    try:
        task_started.send(sender=sender)
        in_unit = True
        task_finished.send(sender=sender)
        in_unit = False
    finally:
        if in_unit:  # end the unit all the same
            task_finished.send(sender=None)
    assert len(sent.started) == 1 and len(sent.finished) == 1
    assert sent.started[0]["sender"] is sender
    assert sent.finished[0]["sender"] is sender


# -- 6f: the rest --------------------------------------------------------------


def test_retry_on_disconnect_true_is_refused():
    """task_scope(retry_on_disconnect=True): ValueError naming True, a whole number."""
    with pytest.raises(ValueError) as raised:
        task_scope(retry_on_disconnect=True)
    message = str(raised.value)
    assert "retry_on_disconnect" in message
    assert "True" in message
    assert "whole number" in message


def test_retry_on_disconnect_true_refused_in_every_form(sent):
    """retry_on_disconnect=True, decorator and with: ValueError; nothing runs."""
    ran = []
    with pytest.raises(ValueError) as decorating:

        @task_scope(retry_on_disconnect=True)
        def job():
            ran.append(True)

    with pytest.raises(ValueError) as entering:
        with task_scope(retry_on_disconnect=True):
            ran.append(True)
    assert "True" in str(decorating.value) and "whole number" in str(decorating.value)
    assert str(entering.value) == str(decorating.value)
    assert ran == []
    assert sent.started == []


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_options_none_does_not_crash_the_checks(settings):
    """DATABASES[alias]["OPTIONS"] = None: the checks run and still report E003."""
    databases = dict(settings.DATABASES)
    databases["no_options_pg"] = {**databases["postgres"], "OPTIONS": None}
    databases["no_options_sqlite"] = {**databases["default"], "OPTIONS": None}
    settings.DATABASES = databases
    settings.TASK_DB = {"STRATEGY": "nope"}
    assert "django_task_db.E003" in [m.id for m in check_settings(None)]
    settings.TASK_DB = {}
    assert check_settings(None) == []


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_health_checks_of_wrong_type_is_e005_only(settings):
    """HEALTH_CHECKS "yes" with a pool lacking CONN_HEALTH_CHECKS: E005, no W001."""
    databases = dict(settings.DATABASES)
    databases["pooled"] = {
        **databases["postgres"],
        "CONN_MAX_AGE": 0,
        "CONN_HEALTH_CHECKS": False,
        "OPTIONS": {"pool": {"min_size": 1, "max_size": 2}},
    }
    settings.DATABASES = databases
    settings.TASK_DB = {"HEALTH_CHECKS": "yes"}
    assert [m.id for m in check_settings(None)] == ["django_task_db.E005"]


CLOSE_THE_OTHER = """\
from django.db import connections

calls = []
OTHER = {}


def close_the_other(connection, phase):
    calls.append((connection.alias, phase, connection.connection is not None))
    connections[OTHER[connection.alias]].close()
"""


def test_strategy_closing_another_alias(sqlite, direct_server, settings, make_module):
    """Each alias's strategy closes the other's: none is called on a closed one."""
    name = make_module("close_other", CLOSE_THE_OTHER)
    module: ModuleType = importlib.import_module(name)
    a, b = sqlite, direct_server.alias
    module.OTHER.update({a: b, b: a})
    path = f"{name}.close_the_other"
    settings.TASK_DB = {"ALIASES": {a: path, b: path}}
    Item.objects.using(a).count()
    direct_server.session_id()
    with task_scope():
        Item.objects.using(a).count()
        direct_server.session_id()
    assert {phase for _, phase, _ in module.calls} == {"start", "finish"}
    assert [call for call in module.calls if not call[2]] == []


# -- 6g: a Celery worker started with bad TASK_DB ------------------------------


@pytest.fixture
def queue(redis_url: str) -> Iterator[str]:
    """A queue of this test's own, the test app's default queue."""
    import redis

    from tests.workers import sending_app, unique_queue

    name = unique_queue("bad_input")
    with sending_app(redis_url, name, REDIS_DB):
        yield name
    client = redis.Redis.from_url(f"{redis_url}/{REDIS_DB}")
    client.delete(name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")
    client.close()


def celery_worker(queue: str) -> Any:
    """A solo worker in this process on ``queue``, stopped warmly."""
    from tests.celery_app import inprocess_worker

    return inprocess_worker(queue, timeout=TIMEOUT)


def package_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "django_task_db" or r.name.startswith("django_task_db.")
    ]


def said_by_celery(records: list[logging.LogRecord]) -> list[tuple[str, str]]:
    return [(r.name, r.getMessage()) for r in records if r.module == "celery"]


@pytest.mark.parametrize(
    "task_db, check_id, level, words",
    [
        ({"STRATEGI": "keep"}, "django_task_db.E002", logging.ERROR, "'STRATEGI'"),
        (
            {"REPLACE_CELERY_FIXUP": False},
            "django_task_db.W002",
            logging.WARNING,
            "REPLACE_CELERY_FIXUP",
        ),
    ],
    ids=["E002", "W002"],
)
def test_worker_start_logs_the_check_messages(
    settings, caplog, queue, task_db, check_id, level, words
):
    """A worker with TASK_DB problems logs each check message with its id, once."""
    from tests.celery_app import pause

    settings.TASK_DB = task_db
    expected = check_settings(None)
    assert [m.id for m in expected] == [check_id]
    caplog.set_level(logging.DEBUG, logger="django_task_db")
    with celery_worker(queue):
        at_start = package_records(caplog)
        result = pause.delay(0).get(timeout=TIMEOUT)
    matching = [r for r in at_start if check_id in r.getMessage()]
    assert [r.levelno for r in matching] == [level]
    assert words in matching[0].getMessage()
    assert result == 0
    assert said_by_celery(package_records(caplog)) == []


def test_worker_start_says_the_fixup_was_replaced(settings, caplog, queue):
    """Good settings: the worker logs one INFO record, the fixup's handlers replaced."""
    from tests.celery_app import pause

    settings.TASK_DB = {"STRATEGY": "close_old"}
    assert check_settings(None) == []
    caplog.set_level(logging.DEBUG, logger="django_task_db")
    with celery_worker(queue):
        result = pause.delay(0).get(timeout=TIMEOUT)
    records = package_records(caplog)
    replaced = [
        r
        for r in records
        if "fixup" in r.getMessage().lower()
        and "replaced" in r.getMessage().lower()
        and r.levelno >= logging.INFO
    ]
    assert [r.levelno for r in replaced] == [logging.INFO]
    assert [r for r in records if r.levelno >= logging.WARNING] == []
    assert result == 0


def test_bridge_records_are_not_attributed_to_celery(settings, caplog, queue):
    """No log record of the package says its module is "celery", as if Celery spoke."""
    from tests.celery_app import pause

    settings.TASK_DB = {"STRATEGY": "close_old"}
    caplog.set_level(logging.DEBUG, logger="django_task_db")
    with celery_worker(queue):
        pause.delay(0).get(timeout=TIMEOUT)
    records = package_records(caplog)
    assert records  # the bridge said something (that the fixup was replaced)
    assert said_by_celery(records) == []


# -- Found in review: secrets in messages, names that are not dotted paths ---

SECRET = "Sup3rS3cretPW-not-for-logs"


@pytest.mark.parametrize(
    "task_db",
    [
        {"ALIASES": {"default": {"ENGINE": "x", "PASSWORD": SECRET}}},
        {"STRATEGY": f"postgres://postgres:{SECRET}@127.0.0.1/db"},
        {"STRATEGY": f"mysql://root:{SECRET}@127.0.0.1/db.strategy"},
        {"HEALTH_CHECKS": {"PASSWORD": SECRET}},
        {"ALIASES": [{"PASSWORD": SECRET}]},
    ],
    ids=["settings dict", "dsn", "dsn with a dot", "dict as bool", "list"],
)
def test_no_secret_in_messages(sqlite, settings, caplog, task_db):
    """A value that holds a password (a copy of DATABASES[alias], a DSN) is
    named without it, in the check's message and in the error at use."""
    settings.TASK_DB = task_db
    messages = [f"{m.msg} {m.hint}" for m in check_settings()]
    assert messages
    with pytest.raises(ImproperlyConfigured) as raised:
        with task_scope():
            pass
    for text in [*messages, str(raised.value), caplog.text]:
        assert SECRET not in text


@pytest.mark.parametrize("name", ["a..b", "1abc.def", "foo bar.baz", "x/y.z", ".x"])
def test_a_name_that_is_no_dotted_path_is_e003(settings, name):
    """A strategy name that cannot be a dotted path is E003 ("not a
    strategy"), not an import error."""
    settings.TASK_DB = {"STRATEGY": name}
    assert [m.id for m in check_settings()] == ["django_task_db.E003"]
