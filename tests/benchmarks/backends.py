"""The databases and the broker of the benchmarks: which answer, their
versions, and the number of connections a server has accepted."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connections

from tests.servers import MySQLServer, PostgresServer, make_server

LABELS = {
    "default": "SQLite",
    "mysql": "MariaDB",
    "postgres": "PostgreSQL",
    "pgpool": "PostgreSQL + Django's pool",
    "bouncer": "PostgreSQL through PgBouncer (transaction pooling)",
}

# The one small query of a unit of work: it returns the server's id for the
# session it ran on (SQLite has none).
UNIT_SQL = {
    "sqlite": "SELECT 1",
    "mysql": "SELECT CONNECTION_ID()",
    "postgresql": "SELECT pg_backend_pid()",
}


@dataclass(frozen=True)
class Backend:
    alias: str
    label: str
    vendor: str
    version: str = ""
    skipped: str = ""  # why it cannot be measured: "" when it can
    detail: str = ""  # the error behind ``skipped``

    @property
    def is_server(self) -> bool:
        return self.vendor != "sqlite"

    def to_json(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "label": self.label,
            "version": self.version,
            "skipped": self.skipped,
            "detail": self.detail,
        }


def _vendor(alias: str) -> str:
    """Django's ``connection.vendor``, read from the settings, so that no
    connection object is made for it."""
    engine = str(settings.DATABASES[alias]["ENGINE"])
    for vendor in ("sqlite", "mysql", "postgresql"):
        if vendor in engine:
            return vendor
    return engine


def probe(alias: str) -> Backend:
    """Reach the backend of ``alias`` once (creating MariaDB's database, as
    the test suite does), and say why not if it does not answer."""
    label = LABELS.get(alias, alias)
    if alias == "bouncer":
        reason = _start_pgbouncer()
        if reason:
            return Backend(alias, label, "postgresql", skipped=f"skipped: {reason}")
    if alias not in settings.DATABASES:
        return Backend(alias, label, "", skipped=f"skipped: no alias {alias!r}")
    vendor = _vendor(alias)
    if vendor == "sqlite":
        return Backend(alias, label, vendor, sqlite3.sqlite_version)
    server = make_server(alias)
    try:
        if isinstance(server, MySQLServer):
            conn = server.admin(database="")
            try:
                with conn.cursor() as cursor:
                    name = server.settings["NAME"]
                    cursor.execute(f"CREATE DATABASE IF NOT EXISTS {name}")
                    cursor.execute("SELECT VERSION()")
                    version = str(cursor.fetchone()[0])
            finally:
                conn.close()
        else:
            _create_postgres_database(server)
            version = str(server.query("SHOW server_version")[0][0])
    except Exception as exc:  # whichever error the driver raises
        return Backend(
            alias,
            label,
            vendor,
            skipped=f"skipped: {server.name} unreachable",
            detail=f"{type(exc).__name__}: {exc}".strip(),
        )
    return Backend(alias, label, vendor, version)


def _start_pgbouncer() -> str:
    """Start a PgBouncer in transaction pooling mode in front of the
    PostgreSQL alias's database, stopped when the program exits, and add the
    alias "bouncer" through it; or say why not."""
    import atexit

    from tests.pgbouncer import PgBouncer, missing
    from tests.private_servers import add_alias

    reason = missing()
    if reason:
        return reason
    if probe("postgres").skipped:
        return "PostgreSQL unreachable"
    bouncer = PgBouncer("transaction")
    try:
        bouncer.start()
    except RuntimeError as exc:
        bouncer.remove()
        return f"PgBouncer did not start: {exc}"
    atexit.register(bouncer.remove)
    database = bouncer.database("django_task_db_bench_bouncer")
    add_alias("bouncer", database)
    # The alias of the Celery part's worker processes (tests/settings.py).
    os.environ["TASK_DB_BOUNCER_DATABASE"] = json.dumps(database)
    return ""


def _create_postgres_database(server: Any) -> None:
    """Create the database of ``server`` if it is missing (the benchmark's
    own, see __main__.py), through the maintenance database "postgres"."""
    try:
        server.admin().close()
        return
    except Exception:  # missing, or unreachable: tell which below
        pass
    import psycopg
    from psycopg import sql

    conn = psycopg.connect(
        host=server.settings["HOST"],
        port=int(server.settings["PORT"]),
        user=server.settings["USER"],
        password=server.settings["PASSWORD"],
        dbname="postgres",
        autocommit=True,
        connect_timeout=5,
    )
    try:
        name = server.settings["NAME"]
        query = "SELECT 1 FROM pg_database WHERE datname = %s"
        if conn.execute(query, (name,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()


def probe_redis(url: str) -> str:
    """Why Redis at ``url`` cannot be used, or ""."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


class ConnectionCounter:
    """How many connections the server of an alias has accepted: MariaDB's
    ``Connections`` status variable, PostgreSQL's ``sessions`` of
    ``pg_stat_database`` (PostgreSQL 14+; None before). Both count every
    client of the server, not only the benchmark's. Read through one admin
    connection, opened once, so that reading opens nothing."""

    def __init__(self, alias: str):
        # Behind PgBouncer, the server is read directly: what it accepted
        # from PgBouncer.
        self.server = make_server("postgres" if alias == "bouncer" else alias)
        self.conn = self.server.admin()
        self.postgres = isinstance(self.server, PostgresServer)

    def read(self) -> int | None:
        with self.conn.cursor() as cursor:
            if not self.postgres:
                cursor.execute("SHOW GLOBAL STATUS LIKE 'Connections'")
                return int(cursor.fetchone()[1])
            # Statistics are cached per transaction: drop the cache first.
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                "SELECT * FROM pg_stat_database WHERE datname = current_database()"
            )
            columns = [column.name for column in cursor.description]
            row = dict(zip(columns, cursor.fetchone(), strict=True))
            return int(row["sessions"]) if "sessions" in row else None

    def settled(self, timeout: float = 3.0) -> int | None:
        """Read until two readings 0.1 s apart agree: a PostgreSQL backend
        reports its statistics shortly after the fact."""
        last = self.read()
        if not self.postgres or last is None:
            return last
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.1)
            current = self.read()
            if current == last:
                break
            last = current
        return last

    def close(self) -> None:
        self.conn.close()


def close_pool(alias: str) -> None:
    """Close Django's PostgreSQL pool of ``alias``, if it has one, so that the
    next run starts without a connection."""
    registry = getattr(type(connections[alias]), "_connection_pools", None)
    pool = registry.pop(alias, None) if registry else None
    if pool is not None:
        pool.close()
