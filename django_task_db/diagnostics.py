"""What each database alias is, what its server says, and whether a
deployment's connections fit in it.

The logic of ``manage.py taskdb_status`` and of the database system checks:
:func:`status` reports on aliases, :func:`read_server` reads one server's
settings and connection counts. Nothing here shows a password or any
``OPTIONS`` value: errors are reported by their class and the driver's
message, with both removed from it.
"""

from __future__ import annotations

import math
import re
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from django.conf import settings
from django.db import connections

from django_task_db import conf

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.utils import CursorWrapper

# psycopg_pool's defaults (ConnectionPool), which Django's pool keeps unless
# OPTIONS["pool"] sets them.
POOL_MIN_SIZE = 4
POOL_MAX_IDLE = 600.0

DEFAULT_PORTS = {"mysql": "3306", "postgresql": "5432"}

# "tight" above this share of the connections the server allows: the rest
# is for the other clients (web servers, cron jobs, consoles) and for
# connections being replaced.
TIGHT = 0.8

Verdict = Literal["fits", "tight", "does not fit"]


@dataclass(frozen=True)
class Server:
    """A server's settings as the alias's own session sees them, and the
    client sessions it holds now. Times in seconds, ``None`` for off."""

    version: str
    idle_timeout_setting: str  # "wait_timeout" or "idle_session_timeout"
    idle_timeout: float | None
    max_connections: int
    # Connections only superusers may use: superuser_reserved_connections
    # and reserved_connections (PostgreSQL 16+). MySQL keeps its one extra
    # connection for SUPER beyond max_connections: 0.
    reserved_connections: int
    # The most this alias's user may open: MySQL's max_user_connections,
    # PostgreSQL's CONNECTION LIMIT of the role; None: no limit.
    user_connection_limit: int | None
    connections: int  # client sessions, of every user
    user_connections: int  # of them, this alias's user's
    # PostgreSQL only (None elsewhere, or when the server lacks it):
    idle_in_transaction_session_timeout: float | None = None
    client_connection_check_interval: float | None = None

    @property
    def allowed(self) -> int:
        """The connections the server allows users that are not superusers."""
        return self.max_connections - self.reserved_connections


@dataclass(frozen=True)
class Pooler:
    """A PgBouncer in front of an alias, found through its admin console
    (the database "pgbouncer" at the alias's host and port). Without admin
    access (admin_users or stats_users) only its presence is known."""

    name: str  # "PgBouncer"
    version: str | None  # "1.18.0"
    pool_mode: str | None  # "session", "transaction" or "statement"
    max_client_conn: int | None  # client connections it accepts in all
    pool_size: int | None  # server connections per database and user


@dataclass(frozen=True)
class Pool:
    """Django's PostgreSQL pool of an alias, one per process."""

    min_size: int
    max_size: int
    max_idle: float  # seconds an unused pooled connection is kept


@dataclass(frozen=True)
class Deployment:
    """Worker hosts x processes per host x threads per process."""

    hosts: int = 1
    processes: int = 1
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("hosts", "processes", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"Deployment {name} is {value!r}; allowed: a whole number, "
                    "1 or more."
                )


@dataclass(frozen=True)
class Budget:
    """The connections a deployment needs of one alias, against what its
    server allows (counts)."""

    per_process: int  # threads, or with a pool what the pool can hold
    needed: int  # this alias: hosts x processes x per_process
    server_needed: int  # with the other aliases on the same server
    allowed: int  # Server.allowed, or behind PgBouncer its max_client_conn
    user_needed: int  # with the other aliases of the same user on the server
    user_allowed: int | None  # Server.user_connection_limit (None: no limit)
    verdict: Verdict  # the worse of the server's and the user's
    advice: str


@dataclass(frozen=True)
class AliasStatus:
    alias: str
    vendor: str
    host: str
    port: str
    database: str
    user: str
    conn_max_age: float | None  # seconds, None: unlimited
    conn_health_checks: bool
    pool: Pool | None
    strategy: str
    server: Server | None = None  # None for SQLite, or when unreachable
    pooler: Pooler | None = None  # PostgreSQL only
    error: str | None = None  # "ErrorClass: message", when unreachable
    budget: Budget | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def status(
    aliases: Iterable[str] | None = None, deployment: Deployment | None = None
) -> list[AliasStatus]:
    """Report on ``aliases`` (every alias of DATABASES by default), with the
    connection budget of ``deployment`` when given. An alias whose server
    cannot be reached has ``error`` set; the others still report. Leaves no
    connection open that was not open before."""
    if isinstance(aliases, str):
        raise TypeError(f"aliases is the str {aliases!r}; allowed: a list of aliases.")
    names = (
        list(settings.DATABASES) if aliases is None else list(dict.fromkeys(aliases))
    )
    unknown = [alias for alias in names if alias not in settings.DATABASES]
    if unknown:
        raise ValueError(
            f"{unknown[0]!r} is not an alias of DATABASES; "
            f"allowed: {', '.join(settings.DATABASES)}."
        )
    reports = [_report(alias) for alias in names]
    if deployment is None:
        return reports
    # Every alias of DATABASES counts against its server, reported or not:
    # a worker's threads may use each of them.
    need = {alias: _per_process(alias, deployment) for alias in settings.DATABASES}
    keys = {alias: _server_key(alias) for alias in settings.DATABASES}  # DNS once
    return [_with_budget(report, deployment, need, keys) for report in reports]


def pool_of(alias: str) -> Pool | None:
    """The pool an alias's OPTIONS configure, or None."""
    database = database_settings(alias)
    options = database.get("OPTIONS") or {}
    if not str(database.get("ENGINE", "")).endswith("postgresql"):
        return None
    pool = options.get("pool") if isinstance(options, dict) else None
    if not pool:
        return None
    pool = pool if isinstance(pool, dict) else {}
    min_size = int(pool.get("min_size", POOL_MIN_SIZE))
    max_size = pool.get("max_size")
    return Pool(
        min_size=min_size,
        max_size=min_size if max_size is None else int(max_size),
        max_idle=float(pool.get("max_idle", POOL_MAX_IDLE)),
    )


def database_settings(alias: str) -> dict[str, Any]:
    """DATABASES[alias]."""
    databases: dict[str, dict[str, Any]] = settings.DATABASES  # type: ignore[assignment]
    return databases[alias]


def strategy_name(alias: str) -> str:
    """The strategy TASK_DB gives ``alias``: a built-in name or a dotted path."""
    spec = conf.get("ALIASES").get(alias, conf.get("STRATEGY"))
    if isinstance(spec, str):
        return spec
    return f"{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', spec)}"


def read_server(connection: BaseDatabaseWrapper) -> Server | None:
    """The server settings and connection counts of ``connection``'s
    server, read through it (so its session settings, from OPTIONS or the
    user's defaults, are those seen); None for backends without a server
    (SQLite) or not known here. Raises the driver's error (a subclass of
    django.db.Error) when the server cannot be reached. Opens the
    connection if it is closed, and closes it again."""
    readers = {"mysql": _read_mysql, "postgresql": _read_postgresql}
    reader = readers.get(connection.vendor)
    if reader is None:
        return None
    with borrowed(connection) as cursor:
        return reader(connection, cursor)


def read_pooler(alias: str) -> Pooler | None:
    """The PgBouncer in front of a PostgreSQL alias, or None when there is
    none (or it cannot be told: the admin console could not be reached).
    Connects to the admin console with the alias's user and password,
    directly through the driver, and disconnects."""
    connection = connections[alias]
    if connection.vendor != "postgresql" or not _answered_elsewhere(alias):
        return None
    database = database_settings(alias)
    try:
        console = connection.Database.connect(  # type: ignore[attr-defined]
            host=database.get("HOST") or None,
            port=database.get("PORT") or None,
            user=database.get("USER") or None,
            password=database.get("PASSWORD") or None,
            dbname="pgbouncer",
            connect_timeout=5,
        )
    except Exception as exc:  # the driver's connect error, whichever it is
        # PgBouncer refuses users outside admin_users and stats_users with
        # "not allowed"; PostgreSQL has no database "pgbouncer".
        if "not allowed" in str(exc):
            return Pooler("PgBouncer", None, None, None, None)
        return None
    try:
        console.autocommit = True  # the console has no transactions
        with console.cursor() as cursor:
            cursor.execute("SHOW VERSION")
            version = str(cursor.fetchone()[0])
            cursor.execute("SHOW CONFIG")
            config = {row[0]: row[1] for row in cursor.fetchall()}
            cursor.execute("SHOW DATABASES")
            columns = [column[0] for column in cursor.description]
            rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    except Exception:  # a PostgreSQL database that happens to be named so
        return None
    finally:
        console.close()
    if not version.startswith("PgBouncer "):
        return None
    entry = next((row for row in rows if row["name"] == database.get("NAME")), {})
    pool_size = entry.get("pool_size") or config.get("default_pool_size")
    return Pooler(
        name="PgBouncer",
        version=version.removeprefix("PgBouncer "),
        pool_mode=entry.get("pool_mode") or config.get("pool_mode"),
        max_client_conn=int(config["max_client_conn"])
        if "max_client_conn" in config
        else None,
        pool_size=None if pool_size is None else int(pool_size),
    )


def _answered_elsewhere(alias: str) -> bool:
    """Whether the PostgreSQL server that answers the alias listens on
    another address or port than the alias names: something is between
    them. Asked first so that a direct connection never knocks at the admin
    console (PostgreSQL would log a FATAL for its missing database)."""
    with borrowed(connections[alias]) as cursor:
        cursor.execute("SELECT host(inet_server_addr()), current_setting('port')")
        address, port = cursor.fetchone()
    if address is None:  # a Unix socket: nothing between
        return False
    database = database_settings(alias)
    if str(database.get("PORT") or "5432") != str(port):
        return True
    try:
        names = socket.getaddrinfo(database.get("HOST") or "localhost", None)
    except OSError:
        return True
    return address not in {name[4][0] for name in names}


@contextmanager
def borrowed(connection: BaseDatabaseWrapper) -> Iterator[Any]:
    """A cursor of ``connection``; the connection is closed afterwards if
    it was closed before. With Django's pool, a driver connection of its
    own instead, closed afterwards: opening the pool would wait for its
    timeout when the server is down, and psycopg_pool logs each failed
    attempt with the connection's parameters."""
    if pool_of(connection.alias) is not None:
        params = connection.get_connection_params()
        raw = connection.Database.connect(**params)  # type: ignore[attr-defined]
        try:
            with raw.cursor() as cursor:
                yield cursor
        finally:
            raw.close()
        return
    was_open = connection.connection is not None
    try:
        with connection.cursor() as cursor:
            yield cursor
    finally:
        if not was_open:
            connection.close()


def without_secrets(text: str, alias: str) -> str:
    """``text`` (a driver's error message) with ``***`` for the alias's
    password, its OPTIONS text values and each word of 4 characters or more
    in them (a driver may quote part of a value), wherever one stands as a
    whole (not inside a longer word), and for credentials in a URL."""
    database = database_settings(alias)
    secrets = {str(database.get("PASSWORD") or "")}
    options = database.get("OPTIONS")
    for value in _leaves(options if isinstance(options, dict) else {}):
        if isinstance(value, str):
            secrets.add(value)
            secrets.update(re.findall(r"\w{4,}", value))
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = re.sub(rf"(?<!\w){re.escape(secret)}(?!\w)", "***", text)
    return conf.masked(text)


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _report(alias: str) -> AliasStatus:
    database = database_settings(alias)
    connection = connections[alias]
    age = database.get("CONN_MAX_AGE", 0)
    report = AliasStatus(
        alias=alias,
        vendor=connection.vendor,
        host=str(database.get("HOST") or ""),
        port=str(database.get("PORT") or DEFAULT_PORTS.get(connection.vendor, "")),
        database=str(database.get("NAME") or ""),
        user=str(database.get("USER") or ""),
        conn_max_age=None if age is None else float(age),
        conn_health_checks=bool(database.get("CONN_HEALTH_CHECKS", False)),
        pool=pool_of(alias),
        strategy=strategy_name(alias),
    )
    try:
        server = read_server(connection)
    except Exception as exc:  # the driver's connect error, whichever it is
        message = without_secrets(str(exc).strip(), alias)
        return replace(report, error=f"{type(exc).__name__}: {message}")
    return replace(report, server=server, pooler=read_pooler(alias))


def _per_process(alias: str, deployment: Deployment) -> int:
    pool = pool_of(alias)
    if pool is None:
        return deployment.threads  # one connection per thread per alias
    # The pool keeps min_size open and grows to max_size on demand.
    return max(pool.min_size, min(deployment.threads, pool.max_size))


def _server_key(alias: str) -> tuple[str, str, frozenset[str]]:
    """What tells a server: the vendor, the port (the driver's default when
    unset) and the addresses its HOST resolves to (the name itself when it
    does not resolve, or for a Unix socket). Aliases whose keys share the
    vendor and port and an address are on one server."""
    database = database_settings(alias)
    vendor = connections[alias].vendor
    host = str(database.get("HOST") or "localhost")
    port = str(database.get("PORT") or DEFAULT_PORTS.get(vendor, ""))
    if host.startswith("/"):
        return vendor, port, frozenset([host])
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        addresses = {host}
    return vendor, port, frozenset(addresses)


def _same_server(
    a: tuple[str, str, frozenset[str]], b: tuple[str, str, frozenset[str]]
) -> bool:
    return a[:2] == b[:2] and bool(a[2] & b[2])


def _band(needed: int, allowed: int) -> Verdict:
    if needed <= TIGHT * allowed:
        return "fits"
    return "tight" if needed <= allowed else "does not fit"


def _with_budget(
    report: AliasStatus,
    deployment: Deployment,
    per_process: dict[str, int],
    keys: dict[str, tuple[str, str, frozenset[str]]],
) -> AliasStatus:
    if report.server is None:
        return report
    processes = deployment.hosts * deployment.processes
    key = keys[report.alias]
    user = report.user
    on_server = [a for a in per_process if _same_server(keys[a], key)]
    server_needed = processes * sum(per_process[a] for a in on_server)
    user_needed = processes * sum(
        per_process[a]
        for a in on_server
        if database_settings(a).get("USER", "") == user
    )
    allowed = report.server.allowed
    user_allowed = report.server.user_connection_limit
    if report.pooler is not None:
        # The clients are PgBouncer's: its max_client_conn is the limit, and
        # the server's (and the user's) apply to its pool only.
        allowed = report.pooler.max_client_conn or allowed
        user_allowed = None
    verdicts = [_band(server_needed, allowed)]
    if user_allowed is not None:
        verdicts.append(_band(user_needed, user_allowed))
    order: list[Verdict] = ["fits", "tight", "does not fit"]
    verdict = max(verdicts, key=order.index)
    budget = Budget(
        per_process=per_process[report.alias],
        needed=processes * per_process[report.alias],
        server_needed=server_needed,
        allowed=allowed,
        user_needed=user_needed,
        user_allowed=user_allowed,
        verdict=verdict,
        advice="",
    )
    budget = replace(budget, advice=_advice(report, deployment, budget))
    return replace(report, budget=budget)


def _advice(report: AliasStatus, deployment: Deployment, budget: Budget) -> str:
    if budget.verdict == "fits":
        return "nothing to change"
    processes = deployment.hosts * deployment.processes
    user_binds = (
        budget.user_allowed is not None
        and _band(budget.user_needed, budget.user_allowed) == budget.verdict
        and _band(budget.server_needed, budget.allowed) != budget.verdict
    )
    limit = budget.user_allowed if user_binds else budget.allowed
    fit = math.floor(TIGHT * (limit or 0)) // processes
    changes = ["fewer processes"]
    if report.pooler is not None:
        changes += ["fewer threads", "a higher max_client_conn in PgBouncer"]
    elif report.pool is not None:
        changes.append("a smaller OPTIONS['pool']['max_size']")
    else:
        changes.append("fewer threads")
        if report.vendor == "postgresql":
            changes.append("Django's pool (OPTIONS['pool'])")
    if report.pooler is None:
        if report.vendor == "postgresql":
            changes.append("PgBouncer in front of the server")
        changes.append(
            f"a higher connection limit for the user {report.user!r}"
            if user_binds
            else "a higher max_connections"
        )
    whose = (
        f"for the user {report.user!r} on this server"
        if user_binds
        else "on this server, for all its aliases together"
    )
    return (
        f"at most {fit} connections per process fit {whose}; "
        f"use {', '.join(changes[:-1])}, or {changes[-1]}"
    )


def _seconds(value: Any, unit: str | None) -> float | None:
    """A server setting as seconds: None for 0 (off)."""
    number = float(value)
    if number <= 0:
        return None
    return number / 1000 if unit == "ms" else number


def _read_mysql(connection: BaseDatabaseWrapper, cursor: CursorWrapper) -> Server:
    cursor.execute(
        "SELECT VERSION(), @@SESSION.wait_timeout, @@GLOBAL.max_connections, "
        "@@SESSION.max_user_connections"
    )
    version, wait_timeout, max_connections, user_limit = cursor.fetchone()
    cursor.execute("SHOW GLOBAL STATUS LIKE 'Threads_connected'")
    connected = int(cursor.fetchone()[1])
    # A user without the PROCESS privilege sees its own sessions only:
    # those are the ones counted here.
    cursor.execute(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
        "WHERE USER = SUBSTRING_INDEX(CURRENT_USER(), '@', 1)"
    )
    (mine,) = cursor.fetchone()
    return Server(
        version=str(version),
        idle_timeout_setting="wait_timeout",
        idle_timeout=_seconds(wait_timeout, "s"),
        max_connections=int(max_connections),
        reserved_connections=0,
        user_connection_limit=int(user_limit) or None,
        connections=connected,
        user_connections=int(mine),
    )


_POSTGRESQL_SETTINGS = (
    "idle_session_timeout",
    "idle_in_transaction_session_timeout",
    "client_connection_check_interval",
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
)


def _read_postgresql(connection: BaseDatabaseWrapper, cursor: CursorWrapper) -> Server:
    # pg_settings has the session's values, in their base unit; a setting
    # this server's version lacks is simply absent.
    cursor.execute(
        "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)",
        [list(_POSTGRESQL_SETTINGS)],
    )
    found = {name: (value, unit) for name, value, unit in cursor.fetchall()}

    def seconds(name: str) -> float | None:
        return _seconds(*found[name]) if name in found else None

    def count(name: str) -> int:
        return int(found[name][0]) if name in found else 0

    cursor.execute(
        "SELECT current_setting('server_version'), "
        "(SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user), "
        "COUNT(*), COUNT(*) FILTER (WHERE usename = current_user) "
        # A role without pg_read_all_stats sees no backend_type in other
        # users' rows; background processes have no user.
        "FROM pg_stat_activity WHERE usename IS NOT NULL "
        "AND (backend_type = 'client backend' OR backend_type IS NULL)"
    )
    version, user_limit, connected, mine = cursor.fetchone()
    return Server(
        version=str(version),
        idle_timeout_setting="idle_session_timeout",
        idle_timeout=seconds("idle_session_timeout"),
        max_connections=count("max_connections"),
        reserved_connections=count("superuser_reserved_connections")
        + count("reserved_connections"),
        user_connection_limit=None
        if user_limit is None or user_limit < 0
        else user_limit,
        connections=int(connected),
        user_connections=int(mine),
        idle_in_transaction_session_timeout=seconds(
            "idle_in_transaction_session_timeout"
        ),
        client_connection_check_interval=seconds("client_connection_check_interval"),
    )
