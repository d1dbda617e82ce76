"""The Django + Celery example project (examples/celeryproject), run as a user
would: manage.py commands and a real worker, each in a subprocess."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from tests.names import REDIS_DB_EXAMPLE

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "examples" / "celeryproject"
REDIS_DB = REDIS_DB_EXAMPLE  # the example's own, apart from the other tests'

# The environment variables that the example's settings read.
SETTINGS_VARIABLES = (
    "DATABASE_ENGINE",
    "DATABASE_NAME",
    "DATABASE_HOST",
    "DATABASE_PORT",
    "DATABASE_USER",
    "DATABASE_PASSWORD",
    "CONN_MAX_AGE",
    "TASK_DB_STRATEGY",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "CELERY_TASK_DEFAULT_QUEUE",
)


def project_env(database: Path, **variables: str) -> dict[str, str]:
    """The environment of a command of the example: SQLite at ``database``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("DJANGO_SETTINGS_MODULE", *SETTINGS_VARIABLES):
        env.pop(name, None)
    return {**env, "DATABASE_NAME": str(database), **variables}


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    """Wait until ``text`` appears in ``log``, while ``process`` runs."""
    deadline = time.monotonic() + 60
    while text not in log.read_text():
        if process.poll() is not None:
            pytest.fail(f"the worker exited ({process.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(
                f"no {text!r} in the worker's log after 60 s:\n{log.read_text()}"
            )
        time.sleep(0.1)


def test_check_passes(tmp_path: Path) -> None:
    """manage.py check finds no issues in the example's settings."""
    result = manage(project_env(tmp_path / "db.sqlite3"), "check")
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_rejects_a_bad_strategy(tmp_path: Path) -> None:
    """A bad TASK_DB_STRATEGY fails manage.py check with django_task_db.E003."""
    env = project_env(tmp_path / "db.sqlite3", TASK_DB_STRATEGY="nope")
    result = manage(env, "check")
    assert result.returncode == 1
    assert "django_task_db.E003" in result.stderr
    assert "'nope'" in result.stderr


def test_migrate_creates_the_orders_table(tmp_path: Path) -> None:
    """manage.py migrate creates the orders table in the SQLite file it is given."""
    database = tmp_path / "db.sqlite3"
    result = manage(project_env(database), "migrate")
    assert result.returncode == 0, result.stderr
    assert "Applying orders.0001_initial... OK" in result.stdout
    with closing(sqlite3.connect(database)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert "orders_order" in tables


@pytest.fixture(params=["sqlite", "mysql", "postgresql"])
def database(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[dict[str, str], Callable[[str], list[Any]]]]:
    """The example's database variables for one engine, on a database of
    its own (created empty, dropped after), and a function that runs a query
    there."""
    engine = request.param
    if engine == "sqlite":
        path = tmp_path / "db.sqlite3"

        def query(sql: str) -> list[Any]:
            with closing(sqlite3.connect(path)) as db:
                return db.execute(sql).fetchall()

        yield {"DATABASE_NAME": str(path)}, query
        return
    server = request.getfixturevalue("mysql" if engine == "mysql" else "postgres")
    name = f"{server.settings['NAME']}_example"
    admin_database = "" if engine == "mysql" else "postgres"

    def on_server(sql: str, database: str = name) -> list[Any]:
        conn = server.admin(database=database)
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
                return list(cursor.fetchall()) if cursor.description else []
        finally:
            conn.close()

    on_server(f"DROP DATABASE IF EXISTS {name}", admin_database)
    on_server(f"CREATE DATABASE {name}", admin_database)
    yield (
        {
            "DATABASE_ENGINE": engine,
            "DATABASE_HOST": server.settings["HOST"],
            "DATABASE_PORT": str(server.settings["PORT"]),
            "DATABASE_USER": server.settings["USER"],
            "DATABASE_PASSWORD": server.settings["PASSWORD"],
            "DATABASE_NAME": name,
        },
        on_server,
    )
    on_server(f"DROP DATABASE IF EXISTS {name}", admin_database)


def test_worker_runs_send_orders(
    redis_url: str,
    tmp_path: Path,
    database: tuple[dict[str, str], Callable[[str], list[Any]]],
) -> None:
    """The README's run: a prefork worker with one pool process runs the
    tasks of send_orders (reuse, close_all, failure), and Ctrl-C (SIGINT to
    its process group) closes the connection left open."""
    variables, query = database
    env = {
        **project_env(tmp_path / "unused.sqlite3"),
        **variables,
        "CELERY_BROKER_URL": f"{redis_url}/{REDIS_DB}",
        "CELERY_RESULT_BACKEND": f"{redis_url}/{REDIS_DB}",
        "CELERY_TASK_DEFAULT_QUEUE": f"celeryproject-{uuid.uuid4().hex}",
    }
    assert manage(env, "migrate").returncode == 0
    log = tmp_path / "worker.log"
    with log.open("wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "proj", "worker", "-l", "info"]
            + ["--pool=prefork", "-c", "1", "-Q", env["CELERY_TASK_DEFAULT_QUEUE"]]
            + ["--without-heartbeat", "--without-gossip", "--without-mingle"],
            cwd=PROJECT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group, as in a terminal
        )
    try:
        wait_for_line(log, " ready.", worker)
        result = manage(env, "send_orders", "--timeout", "30")
        assert result.returncode == 0, result.stderr + log.read_text()
        # The worker's first connection is reused by the second order; the
        # close_all task and the failed one each get their own; the next order
        # opens a new one, which the one after reuses.
        # Django may open a short connection of its own first (the README
        # says when), and the numbers then start at 2.
        first = re.match(r"1\. .* connection (\d+)#([12]) opened", result.stdout)
        assert first, result.stdout
        pid, n = first[1], int(first[2])
        name = f"{pid}#"
        assert result.stdout.splitlines() == [
            f"1. create_order(1): order 1 saved; connection {name}{n} opened",
            f"2. create_order(2): order 2 saved; connection {name}{n} reused",
            f"3. count_orders(): 2 orders; connection {name}{n + 1} opened",
            "4. create_order_then_fail(4): failed: RuntimeError: order 4 saved "
            f"on connection {name}{n + 2}, then the payment was refused",
            f"5. create_order(5): order 5 saved; connection {name}{n + 3} opened",
            f"6. create_order(6): order 6 saved; connection {name}{n + 3} reused",
        ]
        assert int(pid) != worker.pid  # a pool process ran them
        os.killpg(worker.pid, signal.SIGINT)  # Ctrl-C
        # Celery's SIGINT handler ends a warm shutdown with EX_FAILURE (1).
        assert worker.wait(timeout=60) == 1, log.read_text()[-3000:]
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    worker_log = log.read_text()
    replaced = "replaced the database handlers of Celery's Django fixup"
    assert replaced in worker_log  # django_task_db's log
    closed = re.findall(r"connection (\d+#\d+) closed \((\w+)\)", worker_log)
    assert closed == [
        (f"{name}{n}", "close_all"),
        (f"{name}{n + 1}", "close_all"),
        (f"{name}{n + 2}", "failure"),
        (f"{name}{n + 3}", "worker_stopping"),
    ]
    numbers = [row[0] for row in query("SELECT number FROM orders_order")]
    assert sorted(numbers) == [1, 2, 4, 5, 6]  # the failed task's order was saved
