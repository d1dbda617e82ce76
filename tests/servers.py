"""The database servers as the server sees them: session ids, counts, kills.

Everything here goes through an admin connection made with the driver
directly, outside Django, so it never disturbs the connections under test.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from django.conf import settings
from django.db import connections

REQUIRE_SERVICES = os.environ.get("TASK_DB_REQUIRE_SERVICES") == "1"


def idle_past_health_check() -> None:
    """Wait until a connection used just now has idled past TASK_DB's default
    HEALTH_CHECK_IDLE, so that its next use is preceded by a health check."""
    from django_task_db.conf import DEFAULTS

    time.sleep(DEFAULTS["HEALTH_CHECK_IDLE"] + 0.2)


UNREACHABLE = " is not reachable: "


def unavailable(server: str, reason: str) -> None:
    message = f"{server}{UNREACHABLE}{reason}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (TASK_DB_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


class Server:
    """One Django alias on a real server."""

    name: str
    alias: str

    def __init__(self, alias: str):
        self.alias = alias
        self.settings = settings.DATABASES[alias]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.alias}>"

    def admin(self) -> Any:
        raise NotImplementedError

    def create_database(self) -> None:
        raise NotImplementedError

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = self.admin()
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql, params)
                return list(cursor.fetchall()) if cursor.description else []
        finally:
            conn.close()

    def session_id(self) -> int:
        """The server's id for the Django connection of this thread."""
        with connections[self.alias].cursor() as cursor:
            cursor.execute(self.session_id_sql)
            return int(cursor.fetchone()[0])

    session_id_sql = ""

    def sessions(self) -> set[int]:
        """Ids of the server sessions opened through this alias, any thread."""
        raise NotImplementedError

    def kill(self, session: int) -> None:
        raise NotImplementedError

    def wait_until_gone(self, session: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while session in self.sessions():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self}: session {session} still there")
            time.sleep(0.02)

    def wait_for_count(self, expected: int, timeout: float = 10) -> int:
        """Poll until the server counts ``expected`` sessions; return the last
        count seen (closing is asynchronous on the server side)."""
        deadline = time.monotonic() + timeout
        while (
            count := len(self.sessions())
        ) != expected and time.monotonic() < deadline:
            time.sleep(0.02)
        return count

    def count_rows(self, table: str = "django_task_db_item") -> int:
        return int(self.query(f"SELECT COUNT(*) FROM {table}")[0][0])


class MySQLServer(Server):
    name = "MariaDB"
    session_id_sql = "SELECT CONNECTION_ID()"

    def admin(self, database: str | None = None) -> Any:
        import MySQLdb

        kwargs: dict[str, Any] = {
            "host": self.settings["HOST"],
            "port": int(self.settings["PORT"]),
            "user": self.settings["USER"],
            "password": self.settings["PASSWORD"],
            "autocommit": True,
            "connect_timeout": 5,
        }
        kwargs["database"] = self.settings["NAME"] if database is None else database
        if not kwargs["database"]:
            del kwargs["database"]
        return MySQLdb.connect(**kwargs)

    def create_database(self) -> None:
        """Create the alias's database unless it exists."""
        conn = self.admin(database="")
        try:
            with conn.cursor() as cursor:
                name = self.settings["NAME"].replace("`", "``")
                cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{name}`")
        finally:
            conn.close()

    def sessions(self) -> set[int]:
        rows = self.query(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s "
            "AND ID <> CONNECTION_ID()",
            (self.settings["NAME"],),
        )
        return {int(row[0]) for row in rows}

    def kill(self, session: int) -> None:
        self.query(f"KILL {int(session)}")
        self.wait_until_gone(session)


class PostgresServer(Server):
    name = "PostgreSQL"
    session_id_sql = "SELECT pg_backend_pid()"

    def admin(self, database: str | None = None) -> Any:
        import psycopg

        return psycopg.connect(
            host=self.settings["HOST"],
            port=int(self.settings["PORT"]),
            user=self.settings["USER"],
            password=self.settings["PASSWORD"],
            dbname=self.settings["NAME"] if database is None else database,
            autocommit=True,
            connect_timeout=5,
        )

    def create_database(self) -> None:
        """Create the alias's database unless it exists."""
        from psycopg import sql

        name = self.settings["NAME"]
        conn = self.admin(database="postgres")
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(
                        sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
                    )
        finally:
            conn.close()

    @property
    def application_name(self) -> str:
        return str(self.settings["OPTIONS"]["application_name"])

    def sessions(self) -> set[int]:
        rows = self.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (self.application_name,),
        )
        return {int(row[0]) for row in rows}

    def kill(self, session: int) -> None:
        self.query("SELECT pg_terminate_backend(%s)", (session,))
        self.wait_until_gone(session)


def local_ports(pid: int | str = "self") -> set[int]:
    """Local TCP ports of the sockets open in process ``pid``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as file:
                lines = file.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class Sessions:
    """The server's sessions for an alias, through one admin connection kept
    open, so that sampling in a loop does not itself open connections.

    ``own()`` keeps the sessions whose client end is a socket still open in
    this process: other test runs may share the servers, and a session this
    process has already hung up on is no longer one of its connections.
    """

    def __init__(self, server: Server):
        self.server = server
        self.conn = server.admin()
        if isinstance(server, MySQLServer):
            self.sql = (
                "SELECT ID, SUBSTRING_INDEX(HOST, ':', -1) "
                "FROM information_schema.PROCESSLIST "
                "WHERE DB = %s AND ID <> CONNECTION_ID()"
            )
            self.param = server.settings["NAME"]
        else:
            self.sql = (
                "SELECT pid, client_port FROM pg_stat_activity "
                "WHERE application_name = %s"
            )
            self.param = server.application_name  # type: ignore[attr-defined]

    def rows(self) -> list[tuple[int, int | None]]:
        with self.conn.cursor() as cursor:
            cursor.execute(self.sql, (self.param,))
            rows = cursor.fetchall()
        return [
            (int(sid), int(port) if str(port).isdigit() else None) for sid, port in rows
        ]

    def all(self) -> set[int]:
        return {sid for sid, _ in self.rows()}

    def own(self) -> set[int]:
        rows = self.rows()
        ports = local_ports()  # read after the server: see the class docstring
        return {sid for sid, port in rows if port in ports}

    def wait_for_own(self, expected: int, timeout: float = 10) -> set[int]:
        deadline = time.monotonic() + timeout
        while len(own := self.own()) != expected and time.monotonic() < deadline:
            time.sleep(0.02)
        return own

    def wait_until_gone(self, ids: set[int], timeout: float = 10) -> set[int]:
        """Poll until none of ``ids`` is on the server; return those left."""
        deadline = time.monotonic() + timeout
        while (left := ids & self.all()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return left

    def close(self) -> None:
        self.conn.close()


def make_server(alias: str) -> Server:
    engine = settings.DATABASES[alias]["ENGINE"]
    if engine.endswith("mysql"):
        return MySQLServer(alias)
    return PostgresServer(alias)


def in_every_thread(
    executor: ThreadPoolExecutor, func: Callable[[], Any], timeout: float = 60
) -> list[Any]:
    """Run ``func`` once in each thread of ``executor``: a barrier holds each
    call until all threads are running, so no thread takes two."""
    threads = executor._max_workers
    barrier = threading.Barrier(threads)

    def call() -> tuple[int, Any]:
        barrier.wait(timeout=timeout)
        return threading.get_ident(), func()

    futures = [executor.submit(call) for _ in range(threads)]
    results = [f.result(timeout=timeout) for f in futures]
    assert len({ident for ident, _ in results}) == threads
    return [result for _, result in results]
