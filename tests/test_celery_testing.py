"""django_task_db.celery_testing.celery_worker, in this process, as the
database server sees it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections, transaction
from django.db.backends.signals import connection_created

from django_task_db import tracking
from django_task_db.celery_testing import celery_worker
from tests.celery_app import session_id, uninstall_fixup
from tests.names import REDIS_DB_IN_PROCESS
from tests.servers import Server, Sessions
from tests.workers import sending_app, unique_queue


@pytest.fixture
def app(redis_url: str) -> Iterator[Any]:
    """The test Celery app on a queue of this test's own."""
    queue = unique_queue("celery_testing")
    with sending_app(redis_url, queue, REDIS_DB_IN_PROCESS) as app:
        yield app
    uninstall_fixup()


@pytest.fixture
def app_cleanup_off() -> Iterator[None]:
    """As in a project without django_task_db in INSTALLED_APPS: nothing
    closes a thread's connections when it ends."""
    connection_created.disconnect(dispatch_uid="django_task_db.track")
    yield
    connection_created.connect(tracking.track, dispatch_uid="django_task_db.track")


def test_worker_closes_its_own_connection(
    app: Any, direct_server: Server, app_cleanup_off: None
) -> None:
    """The worker's thread closes its own connection when the worker stops,
    and the test's connection, open before and after, is the same session."""
    sampler = Sessions(direct_server)
    try:
        mine = direct_server.session_id()
        with celery_worker(app, queues=[app.conf.task_default_queue]):
            theirs = session_id.delay(direct_server.alias).get(timeout=30)
            assert theirs != mine
            assert {mine, theirs} <= sampler.own()
        assert sampler.wait_until_gone({theirs}) == set()
        assert direct_server.session_id() == mine
    finally:
        sampler.close()


def test_shares_the_connection_in_an_atomic_block(
    app: Any, direct_server: Server
) -> None:
    """Inside an atomic block, tasks run on the test's own session."""
    with transaction.atomic(using=direct_server.alias):
        mine = direct_server.session_id()
        with celery_worker(app, queues=[app.conf.task_default_queue]):
            assert session_id.delay(direct_server.alias).get(timeout=30) == mine
        assert direct_server.session_id() == mine
        assert connections[direct_server.alias].in_atomic_block


def test_share_needs_the_solo_pool(app: Any, sqlite: str) -> None:
    """Sharing the test's connections with a pool of several threads is refused."""
    with transaction.atomic(using=sqlite):
        with pytest.raises(ValueError, match=r"pool='threads'.*allowed: pool='solo'"):
            with celery_worker(app, pool="threads"):
                pass
