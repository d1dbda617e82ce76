from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections

from tests.servers import UNREACHABLE, Server, make_server, unavailable
from tests.testapp.models import Item

SERVER_ALIASES = [
    alias for alias in ("mysql", "postgres", "pgpool") if alias in settings.DATABASES
]
_reachable: dict[str, str | None] = {}


@pytest.fixture(autouse=True)
def _database_access(django_db_blocker: Any) -> Iterator[None]:
    """Tests manage real connections themselves, outside pytest-django's test
    databases and transactions; each test ends with the connections of the
    main thread and of asgiref's executor thread closed."""
    with django_db_blocker.unblock():
        yield
        connections.close_all()
        # And those of the thread where asgiref runs thread-sensitive code
        # outside async_to_sync (async scopes, the async ORM).
        asyncio.run(_close_executor_connections())
    if "tests.celery_app" in sys.modules:
        from tests.celery_app import uninstall_fixup

        uninstall_fixup()


async def _close_executor_connections() -> None:
    await sync_to_async(connections.close_all, thread_sensitive=True)()


def _prepare(alias: str) -> str | None:
    """Reach the server once per session, create the test table; return why
    it failed, or None."""
    server = make_server(alias)
    try:
        server.create_database()
    except Exception as exc:  # the driver's connect error, whichever it is
        return f"{type(exc).__name__}: {exc}"
    if alias != "pgpool":  # pgpool shares the database of "postgres"
        _create_table(alias)
    return None


def _create_table(alias: str) -> None:
    connection = connections[alias]
    with connection.schema_editor() as editor:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {Item._meta.db_table}")
        editor.create_model(Item)
    connection.close()


def server_for(alias: str) -> Server:
    if alias not in _reachable:
        if alias == "pgpool":
            server_for("postgres")
        _reachable[alias] = _prepare(alias)
    server = make_server(alias)
    if _reachable[alias] is not None:
        unavailable(f"{server.name} (alias {alias!r})", str(_reachable[alias]))
    server.query(f"DELETE FROM {Item._meta.db_table}")
    return server


@pytest.fixture(params=SERVER_ALIASES)
def server(request: pytest.FixtureRequest) -> Server:
    """Each real server alias: MariaDB, PostgreSQL, PostgreSQL with Django's pool."""
    return server_for(request.param)


@pytest.fixture(params=[a for a in SERVER_ALIASES if a != "pgpool"])
def direct_server(request: pytest.FixtureRequest) -> Server:
    """MariaDB and PostgreSQL with plain (persistent) connections."""
    return server_for(request.param)


@pytest.fixture
def mysql() -> Server:
    return server_for("mysql")


@pytest.fixture
def postgres() -> Server:
    return server_for("postgres")


@pytest.fixture
def pgpool() -> Server:
    if "pgpool" not in settings.DATABASES:
        pytest.skip("Django's PostgreSQL pool needs Django 5.1 or later")
    return server_for("pgpool")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis server of the Celery tests (broker and result backend)."""
    import redis

    from tests.names import REDIS_URL as REDIS

    try:
        redis.Redis.from_url(REDIS, socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        unavailable(f"Redis at {REDIS}", f"{type(exc).__name__}: {exc}")
    return REDIS


@pytest.fixture
def sqlite() -> str:
    """The embedded default: SQLite, with the test table created afresh."""
    if "default" not in _reachable:
        _create_table("default")
        _reachable["default"] = None
    Item.objects.using("default").all().delete()
    connections["default"].close()
    return "default"


@pytest.fixture
def closed() -> Iterator[list[tuple[str, str]]]:
    """Every (alias, reason) that connection_closed reports during the test."""
    from django_task_db.signals import connection_closed

    seen: list[tuple[str, str]] = []

    def record(alias: str, reason: str, **kwargs: Any) -> None:
        seen.append((alias, reason))

    connection_closed.connect(record, weak=False)
    yield seen
    connection_closed.disconnect(record)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line at the end: how many tests were skipped for want of which
    server (the reasons come from tests.servers.unavailable)."""
    wanted: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else ""
        server, found, _ = reason.removeprefix("Skipped: ").partition(UNREACHABLE)
        if found:
            wanted[server] = wanted.get(server, 0) + 1
    if wanted:
        servers = ", ".join(f"{n} for {server}" for server, n in wanted.items())
        terminalreporter.write_line(
            f"{sum(wanted.values())} tests skipped for want of a server: {servers}"
        )
