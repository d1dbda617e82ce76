"""The pytest plugin of django-task-db, registered by its ``pytest11`` entry
point: the connection leak check around tests (off unless turned on), and
the ``task_db_celery_worker`` fixture.

Nothing here imports Django's database layer, or reads settings, unless a
test has the check on or asks for the fixture.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from django_task_db.testing import Check  # noqa: F401  (the stash key's type)

INI = "task_db_check_connections"
MARK_ON = "task_db_check_connections"
MARK_OFF = "task_db_allow_leaks"

_check_key = pytest.StashKey["Check"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        INI,
        type="bool",
        default=False,
        help="django-task-db: fail each test that leaves a database connection "
        "open in an ended thread, inside a transaction or with a query running.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARK_ON}: fail the test if it leaves a database connection open in an "
        "ended thread, inside a transaction or with a query running "
        "(django-task-db).",
    )
    config.addinivalue_line(
        "markers",
        f"{MARK_OFF}(reason): no django-task-db connection check for this test, "
        f"even with the {INI} ini option on.",
    )


def _enabled(item: pytest.Item) -> bool:
    if item.get_closest_marker(MARK_OFF) is not None:
        return False
    if not item.config.getini(INI) and item.get_closest_marker(MARK_ON) is None:
        return False
    from django.conf import settings

    # Without Django settings there is no connection to leak.
    return settings.configured or bool(os.environ.get("DJANGO_SETTINGS_MODULE"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    if _enabled(item):
        from django_task_db.testing import Check

        # Recording starts before the test's fixtures are set up.
        check = Check()
        check.begin()
        item.stash[_check_key] = check
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    check = item.stash.get(_check_key, None)
    if check is not None:
        from django_task_db.testing import _here

        # Transactions are compared with the state the test starts in
        # (django_db's and TestCase's own atomic blocks).
        check.baseline = _here()
    result = yield  # the test's own failure goes on unchanged
    if check is not None:
        from django_task_db.testing import ConnectionLeak

        leaks = check.end()
        if leaks:
            pytest.fail(str(ConnectionLeak(leaks)), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        check = item.stash.get(_check_key, None)
        if check is not None:
            check.stop()


@pytest.fixture
def task_db_celery_app() -> Any:
    """The Celery app whose worker ``task_db_celery_worker`` runs: Celery's
    current app. Override this fixture to name yours."""
    from celery import current_app

    return current_app._get_current_object()


@pytest.fixture
def task_db_celery_worker(
    request: pytest.FixtureRequest, task_db_celery_app: Any
) -> Iterator[Any]:
    """A real Celery worker (``celery.contrib.testing.worker.start_worker``,
    solo pool) in a thread of this process, for a ``django_db`` test; see
    ``django_task_db.celery_testing.celery_worker``."""
    from django_task_db.celery_testing import celery_worker

    # The test's database fixtures first, whatever their order in the
    # test's arguments: whether the worker shares the test's connections
    # depends on the transaction they open.
    for name in ("db", "transactional_db"):
        if name in request.fixturenames:
            request.getfixturevalue(name)
    with celery_worker(task_db_celery_app) as worker:
        yield worker
