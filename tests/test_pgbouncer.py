"""Behind a real PgBouncer (Debian's package), in session and in transaction
pooling mode, in front of the suite's PostgreSQL server.

The truth is read on both sides: the server sessions PgBouncer holds in
PostgreSQL (pg_stat_activity, by the alias's application_name, which
PgBouncer hands on to its server connections), and the client connections
PgBouncer has (its admin console's SHOW CLIENTS).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import OperationalError, connections, transaction
from django.db.backends.signals import connection_created
from psycopg.errors import InvalidCursorName

from django_task_db import diagnostics, task_scope
from django_task_db.checks import check_servers
from tests.celery_app import session_id, session_id_close_all
from tests.conftest import server_for
from tests.pgbouncer import DATABASE, PgBouncer, missing
from tests.private_servers import add_alias, remove_alias
from tests.servers import Server, idle_past_health_check, local_ports, unavailable
from tests.test_fork_and_cancel import (
    Interrupted,
    interrupt_after,
    poll,
    still_running,
    wait_for_exit,
)
from tests.testapp.models import Item
from tests.workers import Worker, sending_app, unique_queue

ALIAS = "bouncer"
MODES = ["transaction", "session"]


@pytest.fixture(scope="module")
def pgbouncers() -> Iterator[dict[str, PgBouncer]]:
    started: dict[str, PgBouncer] = {}
    yield started
    for bouncer in started.values():
        bouncer.remove()


def started(
    pgbouncers: dict[str, PgBouncer], key: str, make: Callable[[], PgBouncer]
) -> PgBouncer:
    """The module's PgBouncer ``key``, made and started if need be (a test
    may have stopped it)."""
    if key not in pgbouncers:
        pgbouncers[key] = make()
    if pgbouncers[key].process is None:
        pgbouncers[key].start()
    return pgbouncers[key]


@dataclass
class Behind:
    """The alias "bouncer", through a PgBouncer in ``pool_mode``."""

    pgbouncer: PgBouncer
    postgres: Server
    application_name: str

    @property
    def pool_mode(self) -> str:
        return self.pgbouncer.pool_mode

    def server_sessions(self) -> set[int]:
        """PgBouncer's sessions on the PostgreSQL server: those whose client
        end is a socket of the PgBouncer process (application_name is not
        enough: session mode's DISCARD ALL resets it)."""
        rows = self.postgres.query(
            "SELECT pid, client_port FROM pg_stat_activity WHERE client_port > 0"
        )
        assert self.pgbouncer.process is not None
        ports = local_ports(self.pgbouncer.process.pid)
        return {int(pid) for pid, port in rows if port in ports}


@pytest.fixture(params=MODES)
def behind(request, pgbouncers, settings) -> Iterator[Behind]:
    reason = missing()
    if reason is not None:
        unavailable("PgBouncer", reason)
    postgres = server_for("postgres")
    mode = request.param
    bouncer = started(pgbouncers, mode, lambda: PgBouncer(mode))
    name = f"{postgres.application_name}_bouncer_{mode}"
    add_alias(ALIAS, bouncer.database(name))
    yield Behind(bouncer, postgres, name)
    remove_alias(ALIAS)
    # Server connections afresh for the next test.
    bouncer.admin(f"KILL {DATABASE}")
    bouncer.admin(f"RESUME {DATABASE}")


@pytest.fixture
def opened() -> Iterator[list[int]]:
    """The ids of the connections Django opens on the alias, in order."""
    seen: list[int] = []

    def record(connection: Any, **kwargs: Any) -> None:
        if connection.alias == ALIAS:
            seen.append(id(connection.connection))

    connection_created.connect(record, weak=False)
    yield seen
    connection_created.disconnect(record)


def one_query() -> int:
    """A unit's one query: the server session that ran it."""
    with connections[ALIAS].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


UNITS = 20


@pytest.mark.parametrize(
    "strategy, client_connections",
    [("close_old", 1), ("keep", 1), ("close_all", UNITS)],
)
def test_strategies(behind, settings, opened, strategy, client_connections):
    """20 one-query units: close_old and keep reuse one client connection,
    close_all opens one per unit; either way PgBouncer runs them all on one
    server session, which it keeps after the units."""
    settings.TASK_DB = {"STRATEGY": strategy}
    backends = set()
    for _ in range(UNITS):
        with task_scope():
            backends.add(one_query())
    assert len(opened) == client_connections
    assert len(backends) == 1
    assert behind.server_sessions() == backends
    (pool,) = [
        r for r in behind.pgbouncer.admin("SHOW POOLS") if r["database"] == DATABASE
    ]
    assert pool["sv_active"] + pool["sv_idle"] + pool["sv_used"] == 1
    left = 0 if strategy == "close_all" else 1
    assert poll(lambda: behind.pgbouncer.clients() == left)


def test_health_check_replaces_a_connection_pgbouncer_dropped(behind, closed):
    """PgBouncer restarted between units (its client connections cut): the
    next unit's first query runs on a new connection, without an error."""
    with task_scope():
        one_query()
    behind.pgbouncer.restart()
    idle_past_health_check()
    with task_scope():
        one_query()
    assert (ALIAS, "health_check") in closed


def test_server_session_killed_between_units(behind, opened):
    """A server session that PostgreSQL ends (pg_terminate_backend) while
    the unit's connection idles: in transaction mode PgBouncer gives the
    next query another server session and the client connection lives on;
    in session mode the client connection is lost with it, and the health
    check replaces it before the next unit's first query."""
    with task_scope():
        first = one_query()
    behind.postgres.kill(first)
    idle_past_health_check()
    with task_scope():
        second = one_query()
    assert second != first
    assert len(opened) == (1 if behind.pool_mode == "transaction" else 2)


def test_failed_unit_closes_its_client_connection(behind, settings):
    """CLOSE_ON_FAILURE: the failed unit's client connection is closed (its
    transaction rolled back, no row left); PgBouncer keeps the server
    session for the next unit."""
    settings.TASK_DB = {"STRATEGY": "keep"}
    with pytest.raises(RuntimeError), task_scope():
        with transaction.atomic(using=ALIAS):
            Item.objects.using(ALIAS).create(name="rolled back")
            raise RuntimeError
    assert connections[ALIAS].connection is None
    assert poll(lambda: behind.pgbouncer.clients() == 0)
    assert not Item.objects.using("postgres").filter(name="rolled back").exists()
    with task_scope():
        one_query()


def test_running_query_cancelled_at_the_end_of_a_unit(behind, settings):
    """A unit that caught its query's interruption ends with the query
    cancelled on the server: the cancel request goes through PgBouncer."""
    settings.TASK_DB = {"STRATEGY": "keep"}
    tag = f"bouncer_sleep_{uuid.uuid4().hex[:12]}"
    pid = None
    try:
        with task_scope():
            pid = one_query()
            with suppress(Interrupted), interrupt_after(0.3):
                with connections[ALIAS].cursor() as cursor:
                    cursor.execute(f"SELECT pg_sleep(30) /* {tag} */")
                raise AssertionError("pg_sleep was not interrupted")
        assert poll(lambda: not still_running(behind.postgres, pid, tag))
        with task_scope():
            one_query()
    finally:
        if pid is not None:
            behind.postgres.query("SELECT pg_terminate_backend(%s)", (pid,))


def test_fork_keeps_the_parents_connection(behind):
    """A forked child discards the inherited client connection without
    closing it (PgBouncer sees no goodbye) and opens its own; the parent's
    goes on working."""
    with task_scope():
        one_query()
    parent = connections[ALIAS].connection
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            with task_scope():
                one_query()
            code = 0 if connections[ALIAS].connection is not parent else 2
        finally:
            os._exit(code)
    assert wait_for_exit(pid) == 0
    with task_scope():
        one_query()
    assert connections[ALIAS].connection is parent


def test_server_side_cursor_across_transactions(behind, settings):
    """QuerySet.iterator() with server-side cursors (DISABLE_SERVER_SIDE_CURSORS
    False) reads its chunks in transactions of their own: in session mode
    they work; in transaction mode the next chunk may run on a server
    session that lacks the cursor (what W010 warns about). Two clients
    interleave to make PgBouncer swap their server sessions."""
    Item.objects.using("postgres").bulk_create(Item(name=f"row {n}") for n in range(30))
    remove_alias(ALIAS)
    add_alias(
        ALIAS,
        behind.pgbouncer.database(
            behind.application_name, DISABLE_SERVER_SIDE_CURSORS=False
        ),
    )
    iterator = Item.objects.using(ALIAS).order_by("pk").iterator(chunk_size=10)
    with task_scope():
        next(iterator)
        # Another client holds the server session the cursor was declared on.
        other = behind.pgbouncer.connect()
        try:
            other.execute("BEGIN")
            other.execute("SELECT 1")
            if behind.pool_mode == "session":
                assert len(list(iterator)) == 29
            else:
                # Django's ProgrammingError, then psycopg's own from closing
                # the cursor, as Django's cursor_iter() does on its way out.
                with pytest.raises(
                    InvalidCursorName, match=r"cursor .* does not exist"
                ):
                    list(iterator)
        finally:
            other.close()


# What the diagnostics make of it.


def test_status_finds_pgbouncer_and_budgets_its_client_connections(behind):
    """taskdb_status reads PgBouncer's admin console: version, pool mode,
    pool_size and max_client_conn; the budget counts client connections
    against max_client_conn, not PostgreSQL's max_connections; nothing is
    left open on PgBouncer."""
    (report,) = diagnostics.status([ALIAS], diagnostics.Deployment(3, 4, 8))
    assert report.pooler == diagnostics.Pooler(
        "PgBouncer", "1.18.0", behind.pool_mode, 500, 20
    )
    assert report.budget is not None
    assert (report.budget.needed, report.budget.allowed) == (96, 500)
    assert report.budget.verdict == "fits"
    assert connections[ALIAS].connection is None
    assert poll(lambda: behind.pgbouncer.clients() == 0)


def test_w010_transaction_pooling_with_server_side_cursors(behind):
    """W010 in transaction mode while server-side cursors are on (what
    test_server_side_cursor_across_transactions shows failing); silent in
    session mode and with DISABLE_SERVER_SIDE_CURSORS."""
    remove_alias(ALIAS)
    add_alias(
        ALIAS,
        behind.pgbouncer.database(
            behind.application_name, DISABLE_SERVER_SIDE_CURSORS=False
        ),
    )
    found = [m for m in check_servers(databases=[ALIAS]) if m.id.endswith("W010")]
    if behind.pool_mode == "session":
        assert found == []
    else:
        (warning,) = found
        assert "pools by transaction" in warning.msg
        assert "DISABLE_SERVER_SIDE_CURSORS'] = True" in warning.hint
    remove_alias(ALIAS)
    add_alias(ALIAS, behind.pgbouncer.database(behind.application_name))
    assert "django_task_db.W010" not in ids(check_servers(databases=[ALIAS]))


def test_postgresql_timeout_hints_behind_pgbouncer(behind):
    """Behind PgBouncer, W004 and W005 recommend the role, not OPTIONS
    ['options'], which PgBouncer refuses (shown here)."""
    found = {m.id: m for m in check_servers(databases=[ALIAS])}
    for check_id in ("django_task_db.W004", "django_task_db.W005"):
        assert "ALTER ROLE" in found[check_id].hint
        assert "PgBouncer refuses OPTIONS['options']" in found[check_id].hint
    remove_alias(ALIAS)
    database = behind.pgbouncer.database(behind.application_name)
    database["OPTIONS"]["options"] = "-c client_connection_check_interval=10s"
    add_alias(ALIAS, database)
    with pytest.raises(OperationalError, match="unsupported startup parameter"):
        one_query()


def test_pgbouncer_without_admin_access(postgres, pgbouncers):
    """A user outside admin_users still learns that PgBouncer is there (it
    answers "not allowed"), not its pool mode: W010 says it may pool by
    transaction."""
    reason = missing()
    if reason is not None:
        unavailable("PgBouncer", reason)
    bouncer = started(
        pgbouncers, "closed", lambda: PgBouncer("transaction", admin=False)
    )
    database = bouncer.database("bouncer_no_admin", DISABLE_SERVER_SIDE_CURSORS=False)
    add_alias(ALIAS, database)
    try:
        assert diagnostics.read_pooler(ALIAS) == diagnostics.Pooler(
            "PgBouncer", None, None, None, None
        )
        (warning,) = [
            m for m in check_servers(databases=[ALIAS]) if m.id.endswith("W010")
        ]
        assert "may pool by transaction" in warning.msg
    finally:
        remove_alias(ALIAS)


def test_no_pooler_in_front_of_postgresql(postgres):
    assert diagnostics.read_pooler("postgres") is None


def ids(messages: Any) -> list[str]:
    return [message.id for message in messages]


# Celery prefork workers through PgBouncer.

TASKS = 200
CONCURRENCY = 2


@pytest.fixture(scope="module", params=MODES)
def bounced_worker(
    request, pgbouncers, redis_url, tmp_path_factory
) -> Iterator[tuple[Worker, PgBouncer]]:
    """A ``celery worker --pool=prefork -c 2`` whose alias "bouncer" goes
    through PgBouncer (TASK_DB {}: close_old, the fixup replaced)."""
    reason = missing()
    if reason is not None:
        unavailable("PgBouncer", reason)
    mode = request.param
    bouncer = started(pgbouncers, mode, lambda: PgBouncer(mode))
    database = bouncer.database(f"bouncer_worker_{mode}")
    with sending_app(redis_url, unique_queue("bouncer")) as app:
        worker = Worker(
            app,
            unique_queue(f"bouncer_{mode}"),
            tmp_path_factory.mktemp("bouncer") / "worker.log",
            task_db={},
            concurrency=CONCURRENCY,
            env={"TASK_DB_BOUNCER_DATABASE": json.dumps(database)},
        )
        try:
            worker.start()
            yield worker, bouncer
        finally:
            outcome = worker.stop()
    assert not outcome["killed"] and not outcome["left_running"], outcome


def bouncer_sessions(bouncer: PgBouncer) -> set[int]:
    postgres = server_for("postgres")
    return Behind(bouncer, postgres, "").server_sessions()


@pytest.mark.parametrize("task", [session_id, session_id_close_all])
def test_prefork_worker_through_pgbouncer(postgres, bounced_worker, task):
    """200 one-query tasks: close_old keeps one client connection per child,
    close_all opens one per task; either way they run on at most one server
    session per child, PgBouncer's, and close_all leaves no client
    connection."""
    worker, bouncer = bounced_worker
    ids = worker.run_many(task, ALIAS, count=TASKS)
    assert len(set(ids)) <= CONCURRENCY
    assert set(ids) <= bouncer_sessions(bouncer)
    clients = CONCURRENCY if task is session_id else 0
    assert poll(lambda: bouncer.clients() == clients), bouncer.admin("SHOW CLIENTS")
    print(
        f"\n[pgbouncer {bouncer.pool_mode}] {task.name}: {TASKS} tasks on "
        f"{len(set(ids))} server sessions, {bouncer.clients()} client connections left"
    )
