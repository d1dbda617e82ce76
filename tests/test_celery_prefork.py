"""The Celery bridge in real prefork workers (``celery worker --pool=prefork -c 2``).

Each worker is a subprocess started by tests/workers.py on the test Celery
app, with its own TASK_DB, queue and node name, on a Redis database of its
own; the test process sends the tasks and checks, on the database server, the
sessions the tasks ran on. One worker per TASK_DB is shared by the tests of a
class. Run with ``-s`` to see the measurements.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import OperationalError

from tests.celery_app import (
    FIXUP_CLOSES_EVERY_CONNECTION,
    session_id,
    session_id_close_all,
    sleep_in_query,
    write,
    write_then_fail,
)
from tests.servers import MySQLServer, Server, Sessions, idle_past_health_check
from tests.workers import (
    Worker,
    read_hooks,
    sending_app,
    unique_queue,
    wait_for_hook,
)

TASKS = 200  # the measurement's number of tasks, sent at once
CONCURRENCY = 2
POOL_MAX_SIZE = 4  # OPTIONS["pool"]["max_size"] of the pgpool alias
TIMEOUT = 60

measurements: dict[str, dict[str, Any]] = {}


class _ShowWorkerLogs:
    """Append the logs of the running workers to the report of a failed test."""

    def __init__(self) -> None:
        self.workers: list[Worker] = []

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: Any, call: Any) -> Any:
        report = yield
        if report.failed and item.module.__name__ == __name__:
            for worker in self.workers:
                report.sections.append(
                    (f"log of {worker} ({worker.log_path})", worker.log()[-20000:])
                )
        return report


@pytest.fixture(scope="module")
def app(redis_url: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """The test Celery app, sending to the workers' Redis database."""
    logs = _ShowWorkerLogs()
    request.config.pluginmanager.register(logs)
    with sending_app(redis_url, unique_queue("default")) as app:
        app._show_logs = logs
        yield app
    request.config.pluginmanager.unregister(logs)
    for name, numbers in measurements.items():
        print(f"\n[prefork measurement] {name}: {numbers}")


def start_worker(
    app: Any, tmp_path_factory: pytest.TempPathFactory, label: str, **kwargs: Any
) -> Iterator[Worker]:
    """Start a worker, yield it, stop it: SIGTERM must suffice and leave no
    process of its group running."""
    directory = tmp_path_factory.mktemp(label)
    worker = Worker(
        app,
        unique_queue(label),
        directory / "worker.log",
        concurrency=CONCURRENCY,
        **kwargs,
    )
    app._show_logs.workers.append(worker)
    try:
        worker.start()
        yield worker
    finally:
        outcome = worker.stop()
        app._show_logs.workers.remove(worker)
    assert not outcome["killed"], (outcome, worker.log()[-20000:])
    assert not outcome["left_running"], (outcome, worker.log()[-20000:])


def run_timed(worker: Worker, task: Any, *args: Any) -> tuple[list[int], float]:
    """Send TASKS tasks at once; their results and the seconds they took."""
    started = time.monotonic()
    results = worker.run_many(task, *args, count=TASKS, timeout=120)
    return results, time.monotonic() - started


def record(name: str, ids: list[int], seconds: float) -> None:
    measurements[name] = {
        "tasks": len(ids),
        "distinct_sessions": len(set(ids)),
        "seconds": round(seconds, 2),
    }
    print(f"\n[prefork measurement] {name}: {measurements[name]}")


def gone(server: Server, ids: set[int], timeout: float = 10) -> set[int]:
    """Poll until none of ``ids`` is a session on the server; those left."""
    sampler = Sessions(server)
    try:
        return sampler.wait_until_gone(ids, timeout)
    finally:
        sampler.close()


def poll(check: Callable[[], Any], timeout: float = 30) -> Any:
    """Call ``check`` until it returns something true, or the deadline."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


class TestCloseOld:
    """TASK_DB {}: close_old, Celery's fixup replaced; persistent connections."""

    @pytest.fixture(scope="class")
    @classmethod
    def worker(cls, app: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
        yield from start_worker(app, tmp_path_factory, "close_old", task_db={})

    def test_close_old_reuses_one_session_per_child(self, worker, direct_server):
        """200 tasks under close_old run on at most one session per child."""
        alias = direct_server.alias
        ids, seconds = run_timed(worker, session_id, alias)
        record(f"{direct_server.name} close_old", ids, seconds)
        assert len(ids) == TASKS
        assert len(set(ids)) <= CONCURRENCY
        # Still open on the server, held by the worker's children.
        assert set(ids) <= worker.sessions(direct_server)

    def test_close_all_task_opens_a_session_per_task(self, worker, direct_server):
        """200 tasks with db_strategy="close_all" run on 200 sessions, all closed."""
        alias = direct_server.alias
        ids, seconds = run_timed(worker, session_id_close_all, alias)
        record(f"{direct_server.name} close_all", ids, seconds)
        assert len(set(ids)) == TASKS
        assert gone(direct_server, set(ids)) == set()

    def test_failing_task_commits_nothing(self, worker, direct_server):
        """A task failing with uncommitted writes commits none; the next tasks do."""
        # Rows and transactions are told apart by name and by session: other
        # test runs may share the table (and empty it when their tests start).
        alias, lost, kept = direct_server.alias, unique("lost"), unique("kept")
        result = worker.send(write_then_fail, alias, lost)
        with pytest.raises(RuntimeError, match=f"task failed after writing '{lost}'"):
            result.get(timeout=TIMEOUT)
        assert result.state == "FAILURE"
        assert isinstance(result.result, RuntimeError)
        # Rolled back, not left pending on a connection of the worker.
        assert poll(lambda: not open_transactions(worker, direct_server))
        assert rows_named(direct_server, lost) == 0
        ids = worker.run_many(write, alias, kept, count=10, timeout=TIMEOUT)
        assert len(ids) == 10
        # Committed: no transaction of the worker is left open.
        assert poll(lambda: not open_transactions(worker, direct_server))
        assert rows_named(direct_server, lost) == 0

    def test_session_killed_while_idle(self, worker, direct_server):
        """After the worker's idle sessions are killed, tasks succeed on new ones."""
        alias = direct_server.alias
        before = set(worker.run_many(session_id, alias, count=20, timeout=TIMEOUT))
        held = worker.sessions(direct_server)
        assert before <= held
        for session in held:
            direct_server.kill(session)
        idle_past_health_check()
        after = set(worker.run_many(session_id, alias, count=20, timeout=TIMEOUT))
        assert after
        assert not after & held
        assert after <= worker.sessions(direct_server)

    def test_session_killed_mid_query(self, worker, direct_server):
        """A task whose session is killed mid-query fails with the driver's error."""
        alias = direct_server.alias
        result = worker.send(sleep_in_query, alias, 30)
        session = poll(lambda: sleeping_session(worker, direct_server))
        assert session
        direct_server.kill(session)
        with pytest.raises(OperationalError) as raised:
            result.get(timeout=TIMEOUT)
        assert result.state == "FAILURE"
        if isinstance(direct_server, MySQLServer):
            assert "2013" in str(raised.value)
            assert "Lost connection" in str(raised.value)
        else:
            assert "terminating connection due to administrator command" in str(
                raised.value
            )
        after = worker.run_many(session_id, alias, count=10, timeout=TIMEOUT)
        assert session not in after

    def test_pool_survives_task_boundaries(self, worker, pgpool):
        """200 tasks on Django's pool recur on at most max_size sessions per child."""
        ids, seconds = run_timed(worker, session_id, pgpool.alias)
        record("PostgreSQL pool close_old", ids, seconds)
        distinct = set(ids)
        assert len(distinct) <= CONCURRENCY * POOL_MAX_SIZE
        assert len(ids) == TASKS
        assert distinct <= worker.sessions(pgpool)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def rows_named(server: Server, name: str) -> int:
    rows = server.query(
        "SELECT COUNT(*) FROM django_task_db_item WHERE name = %s", (name,)
    )
    return int(rows[0][0])


def open_transactions(worker: Worker, server: Server) -> set[int]:
    """The worker's sessions with a transaction open on the server."""
    if isinstance(server, MySQLServer):
        rows = server.query(
            "SELECT trx_mysql_thread_id FROM information_schema.INNODB_TRX"
        )
    else:
        rows = server.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
            "AND state LIKE 'idle in transaction%%'",
            (server.application_name,),  # type: ignore[attr-defined]
        )
    return {int(row[0]) for row in rows} & worker.sessions(server)


def sleeping_session(worker: Worker, server: Server) -> int | None:
    """The worker's session running sleep_in_query's query, if any."""
    if isinstance(server, MySQLServer):
        rows = server.query(
            "SELECT ID FROM information_schema.PROCESSLIST "
            "WHERE DB = %s AND INFO LIKE 'SELECT SLEEP%%'",
            (server.settings["NAME"],),
        )
    else:
        rows = server.query(
            "SELECT pid FROM pg_stat_activity "
            "WHERE application_name = %s AND query LIKE 'SELECT pg_sleep%%'",
            (server.application_name,),  # type: ignore[attr-defined]
        )
    mine = {int(row[0]) for row in rows} & worker.sessions(server)
    return min(mine) if mine else None


class TestCeleryFixupAlone:
    """TASK_DB {"REPLACE_CELERY_FIXUP": False}: Celery's fixup closes too."""

    @pytest.fixture(scope="class")
    @classmethod
    def worker(cls, app: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
        yield from start_worker(
            app, tmp_path_factory, "fixup", task_db={"REPLACE_CELERY_FIXUP": False}
        )

    def test_fixup_opens_a_session_per_task(self, worker, direct_server):
        """With Celery's fixup left in place, 200 tasks run on 200 sessions
        (Celery 5.6+); before 5.6 the fixup keeps them (CONN_MAX_AGE None)."""
        ids, seconds = run_timed(worker, session_id, direct_server.alias)
        record(f"{direct_server.name} Celery fixup alone", ids, seconds)
        if FIXUP_CLOSES_EVERY_CONNECTION:
            assert len(set(ids)) == TASKS
            assert gone(direct_server, set(ids)) == set()
        else:
            assert len(set(ids)) <= CONCURRENCY
            assert set(ids) <= direct_server.sessions()


def parent_sessions(worker: Worker) -> dict[str, Any]:
    """Ask the worker's main process, by remote control, for the session ids
    of the connections it opened at worker_init (queried now)."""
    replies = worker.app.control.broadcast(
        "task_db_parent_sessions",
        destination=[worker.node],
        reply=True,
        timeout=10,
    )
    answers = [reply[worker.node] for reply in replies if worker.node in reply]
    assert len(answers) == 1, replies
    return answers[0]


def fork_worker(
    app: Any, tmp_path_factory: pytest.TempPathFactory, label: str, task_db: Any
) -> Iterator[Worker]:
    """A worker whose main process opens a connection on mysql and postgres
    at worker_init, before the pool forks its children."""
    hooks = tmp_path_factory.mktemp(f"{label}_hooks") / "hooks.jsonl"
    yield from start_worker(
        app,
        tmp_path_factory,
        label,
        task_db=task_db,
        hooks=hooks,
        hook_aliases=("mysql", "postgres"),
    )


def parent_session_at(worker: Worker, event: str, alias: str) -> dict[str, Any]:
    records = wait_for_hook(worker.hooks, event)
    assert len(records) == 1, records
    return {"pid": records[0]["pid"], "thread": records[0]["thread"]} | records[0][
        "sessions"
    ][alias]


def check_parent_and_children(worker: Worker, server: Server) -> dict[str, Any]:
    """Run tasks in the children, then ask the parent about its connection;
    what was seen, for the test to assert."""
    alias = server.alias
    at_init = parent_session_at(worker, "worker_init", alias)
    at_ready = parent_session_at(worker, "worker_ready", alias)
    children = worker.run_many(session_id, alias, count=20, timeout=TIMEOUT)
    now = parent_sessions(worker)
    return {
        "at_init": at_init,
        "at_ready": at_ready,
        "children": children,
        "now": {"pid": now["pid"], "thread": now["thread"]} | now["sessions"][alias],
        "on_server": server.sessions(),
    }


class TestForkSafety:
    """TASK_DB {}: the children discard what they inherit from the main process."""

    @pytest.fixture(scope="class")
    @classmethod
    def worker(cls, app: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
        yield from fork_worker(app, tmp_path_factory, "fork_safe", {})

    def test_children_spare_parent_connection(self, worker, direct_server):
        """Children run on their own sessions; the parent's keeps working."""
        seen = check_parent_and_children(worker, direct_server)
        parent = seen["at_init"]["session"]
        assert seen["at_ready"] == seen["at_init"]  # after the fork
        assert parent not in seen["children"]
        assert len(set(seen["children"])) <= CONCURRENCY
        assert seen["now"] == seen["at_init"]  # same process, thread, session
        assert parent in seen["on_server"]


class TestForkSafetyOff:
    """The same without the package's protection: TASK_DB {"FORK_SAFETY":
    False, "REPLACE_CELERY_FIXUP": False}, and then with the bridge off too
    ("CELERY": False), which leaves Celery's fixup alone."""

    @pytest.fixture(
        scope="class",
        params=[
            {"FORK_SAFETY": False, "REPLACE_CELERY_FIXUP": False},
            {"FORK_SAFETY": False, "REPLACE_CELERY_FIXUP": False, "CELERY": False},
        ],
        ids=["fixup_and_bridge", "fixup_alone"],
    )
    @classmethod
    def worker(
        cls,
        app: Any,
        tmp_path_factory: pytest.TempPathFactory,
        request: pytest.FixtureRequest,
    ) -> Any:
        label = "fork_unsafe" if request.param.get("CELERY", True) else "fork_fixup"
        yield from fork_worker(app, tmp_path_factory, label, request.param)

    def test_parent_connection_without_fork_safety(self, worker, direct_server):
        """Without the at-fork hook the parent's session survives all the same.

        With the bridge on, its worker_process_init receiver (connected before
        the fixup's) still discards the inherited connections: FORK_SAFETY
        only governs the at-fork hook. With the bridge off, Celery's fixup
        os.close()s each inherited connection's socket in the child before it
        close()s the connection, so the driver's goodbye goes nowhere either.
        Either way the children open their own sessions: one per task from
        Celery 5.6 (the fixup closes them before and after each task), one per
        child before (the fixup closes by CONN_MAX_AGE, None here).
        """
        seen = check_parent_and_children(worker, direct_server)
        parent = seen["at_init"]["session"]
        assert seen["at_ready"] == seen["at_init"]
        assert parent not in seen["children"]
        if FIXUP_CLOSES_EVERY_CONNECTION:
            assert len(set(seen["children"])) == len(seen["children"])
        else:
            assert len(set(seen["children"])) <= CONCURRENCY
        assert seen["now"] == seen["at_init"]
        assert parent in seen["on_server"]


class TestShutdown:
    """SIGTERM: the worker stops, with its children and its server sessions."""

    @pytest.fixture(scope="class")
    @classmethod
    def stopped(
        cls,
        app: Any,
        tmp_path_factory: pytest.TempPathFactory,
        django_db_blocker: Any,
    ) -> Iterator[dict[str, Any]]:
        """A close_old worker that ran tasks on every server alias, then was
        stopped with SIGTERM: what was seen before and after."""
        from tests.conftest import SERVER_ALIASES, server_for

        hooks = tmp_path_factory.mktemp("shutdown_hooks") / "hooks.jsonl"
        starting = start_worker(
            app, tmp_path_factory, "shutdown", task_db={}, hooks=hooks
        )
        worker = next(starting)
        try:
            # server_for may create the test table through Django, the
            # first time.
            with django_db_blocker.unblock():
                seen = cls.run_and_stop(worker, hooks, SERVER_ALIASES, server_for)
        except BaseException:
            starting.close()  # stops the worker
            raise
        yield seen
        next(starting, None)  # asserts that it stopped cleanly

    @staticmethod
    def run_and_stop(
        worker: Worker, hooks: Path, aliases: list[str], server_for: Any
    ) -> dict[str, Any]:
        seen: dict[str, Any] = {"sessions": {}}
        for alias in aliases:
            try:
                server = server_for(alias)
            except pytest.skip.Exception:  # its tests skip through `server`
                continue
            ids = worker.run_many(session_id, alias, count=20, timeout=TIMEOUT)
            seen["sessions"][alias] = set(ids) | worker.sessions(server)
        seen["processes"] = worker.processes()
        seen["stop"] = worker.stop()
        print(f"\n[prefork shutdown] {worker}: {seen['stop']}")
        seen["hooks"] = read_hooks(hooks)
        seen["worker"] = worker
        seen["gone"] = {
            alias: gone(server_for(alias), ids)
            for alias, ids in seen["sessions"].items()
        }
        return seen

    def test_sigterm_leaves_no_process(self, stopped):
        """SIGTERM stops the main process and its children: no orphan left."""
        assert len(stopped["processes"]) == 1 + CONCURRENCY
        assert stopped["stop"]["returncode"] == 0
        assert not stopped["stop"]["killed"]
        assert stopped["stop"]["left_running"] == []

    def test_no_session_left_after_stop(self, stopped, server):
        """After the worker stopped, none of its sessions remains on the server."""
        assert stopped["sessions"][server.alias]
        assert stopped["gone"][server.alias] == set()
        # Closed by the children at worker_process_shutdown, not merely
        # dropped by the kernel when they exited.
        shutdowns = [
            r for r in stopped["hooks"] if r["event"] == "worker_process_shutdown"
        ]
        assert [r["open"] for r in shutdowns] == [[]] * CONCURRENCY

    def test_children_close_their_pools(self, stopped, pgpool):
        """Each child closes its connection pools on worker_process_shutdown."""
        shutdowns = [
            r for r in stopped["hooks"] if r["event"] == "worker_process_shutdown"
        ]
        assert [r["pools"] for r in shutdowns] == [[]] * CONCURRENCY
        assert stopped["sessions"]["pgpool"]
        assert stopped["gone"]["pgpool"] == set()


class TestGevent:
    """``--pool=gevent -c 10``: a greenlet per task, connections per greenlet."""

    @pytest.fixture(scope="class")
    @classmethod
    def worker(cls, app: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
        pytest.importorskip("gevent")
        directory = tmp_path_factory.mktemp("gevent")
        worker = Worker(
            app, unique_queue("gevent"), directory / "worker.log", {}, 10, "gevent"
        )
        app._show_logs.workers.append(worker)
        try:
            yield worker.start()
        finally:
            worker.stop()
            app._show_logs.workers.remove(worker)

    def test_each_task_connection_closed_at_its_end(self, worker, direct_server):
        """Under gevent nothing can be reused (a connection per greenlet), so
        close_old still closes each task's connection when it ends: none is
        left open for the garbage collector."""
        ids, seconds = run_timed(worker, session_id, direct_server.alias)
        record(f"{direct_server.name} gevent close_old", ids, seconds)
        assert len(set(ids)) == TASKS
        assert gone(direct_server, set(ids)) == set()
