"""Diagnostics against the real servers: the database checks, taskdb_status
and its connection budget.

Server settings are changed for one alias's sessions only, through OPTIONS
(MariaDB's init_command, PostgreSQL's -c options): nothing global changes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections

from django_task_db import diagnostics
from django_task_db.checks import check_aliases, check_servers
from tests.private_servers import add_alias, free_port, remove_alias
from tests.servers import MySQLServer, Server, Sessions

ROOT = Path(__file__).resolve().parent.parent
SENTINEL = "sentinel-7f3a91"


@pytest.fixture
def probe(settings):
    """make(base, **extra): an alias named "probe" with ``base``'s settings
    and ``extra``; removed (its pool closed) at the end."""
    made = []

    def make(base: str, name: str = "probe", **extra: Any) -> str:
        add_alias(name, {**settings.DATABASES[base], **extra})
        made.append(name)
        return name

    yield make
    for name in made:
        if name in type(connections[name]).__dict__.get("_connection_pools", {}):
            connections[name].close_pool()
        remove_alias(name)


def ids(messages) -> list[str]:
    return [message.id for message in messages]


def session_options(server: Server, **values: str) -> dict[str, Any]:
    """OPTIONS setting server variables for the alias's sessions only."""
    if isinstance(server, MySQLServer):
        sets = ", ".join(f"SESSION {name} = {value}" for name, value in values.items())
        return {"init_command": f"SET {sets}"}
    options = " ".join(f"-c {name}={value}" for name, value in values.items())
    return {**server.settings["OPTIONS"], "options": options}


def idle_setting(server: Server) -> str:
    return "wait_timeout" if isinstance(server, MySQLServer) else "idle_session_timeout"


# The database checks.


@pytest.mark.parametrize(
    "age, fires", [(None, True), (60, True), (30, True), (29, False), (0, False)]
)
def test_w003_conn_max_age_at_or_above_the_idle_timeout(
    direct_server, probe, age, fires
):
    """W003 names CONN_MAX_AGE and the idle timeout the alias's own session
    has (30 s here), and is silent below it and for CONN_MAX_AGE 0."""
    name = idle_setting(direct_server)
    value = "30" if name == "wait_timeout" else "30s"
    alias = probe(
        direct_server.alias,
        CONN_MAX_AGE=age,
        OPTIONS=session_options(direct_server, **{name: value}),
    )
    messages = [m for m in check_servers(databases=[alias]) if m.id.endswith("W003")]
    if not fires:
        assert messages == []
        return
    (warning,) = messages
    assert f"'{alias}'" in warning.msg
    assert f"30 s ({name}" in warning.msg
    assert ("forever" if age is None else f"for {age} s") in warning.msg
    assert warning.hint == (
        f"Set DATABASES['{alias}']['CONN_MAX_AGE'] below 30, or raise {name}."
    )


def test_w003_silent_without_an_idle_timeout(postgres, probe):
    """PostgreSQL's default idle_session_timeout is 0 (off): no W003, even
    with persistent connections."""
    alias = probe("postgres", CONN_MAX_AGE=None)
    assert "django_task_db.W003" not in ids(check_servers(databases=[alias]))


@pytest.mark.parametrize("max_idle, fires", [(None, True), (30, True), (10, False)])
def test_w003_pool_keeps_idle_connections_past_the_idle_timeout(
    pgpool, probe, max_idle, fires
):
    """With Django's pool it is the pool's max_idle (psycopg_pool's default
    600 s) that must stay below the server's idle timeout."""
    pool = {"min_size": 1, "max_size": 2}
    if max_idle is not None:
        pool["max_idle"] = max_idle
    options = {**session_options(pgpool, idle_session_timeout="30s"), "pool": pool}
    alias = probe("pgpool", OPTIONS=options)
    messages = [m for m in check_servers(databases=[alias]) if m.id.endswith("W003")]
    assert len(messages) == int(fires)
    if fires:
        shown = 600 if max_idle is None else max_idle
        assert f"for {shown} s (max_idle)" in messages[0].msg
        assert "after 30 s (idle_session_timeout)" in messages[0].msg


def test_w004_w005_postgresql_timeouts_off_by_default(postgres):
    """PostgreSQL's defaults leave both off: each gets its warning and its
    recommended value."""
    found = {m.id: m for m in check_servers(databases=["postgres"])}
    w004, w005 = found["django_task_db.W004"], found["django_task_db.W005"]
    assert "keeps running, with its locks" in w004.msg
    assert "'-c client_connection_check_interval=10s'" in w004.hint
    assert "holds the transaction's locks" in w005.msg
    assert "'5min'" in w005.hint


def test_w004_w005_silent_when_set(postgres, probe):
    options = session_options(
        postgres,
        client_connection_check_interval="10s",
        idle_in_transaction_session_timeout="5min",
    )
    alias = probe("postgres", OPTIONS=options)
    found = ids(check_servers(databases=[alias]))
    assert "django_task_db.W004" not in found
    assert "django_task_db.W005" not in found


def test_w004_w005_not_for_mariadb(mysql):
    found = ids(check_servers(databases=["mysql"]))
    assert "django_task_db.W004" not in found
    assert "django_task_db.W005" not in found


KILLED_QUERY = """
import sys, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
print("connected", flush=True)
conn.execute("SELECT pg_sleep(60)")
"""


def running_query_of(server: Server, application_name: str) -> list[int]:
    rows = server.query(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
        "AND state = 'active' AND query LIKE '%%pg_sleep%%'",
        (application_name,),
    )
    return [int(row[0]) for row in rows]


@pytest.mark.parametrize("interval", [None, "200ms"])
def test_w004_killed_workers_query_keeps_running_unless_checked(postgres, interval):
    """What W004 says, on the server: the query of a SIGKILLed client runs
    on (still active 3 s later) unless client_connection_check_interval is
    set, with which the server ends it."""
    name = f"{postgres.application_name}_killed"
    s = postgres.settings
    dsn = (
        f"host={s['HOST']} port={s['PORT']} user={s['USER']} dbname={s['NAME']} "
        f"application_name={name}"
    )
    if interval:
        dsn += f" options='-c client_connection_check_interval={interval}'"
    client = subprocess.Popen(
        [sys.executable, "-c", KILLED_QUERY, dsn], stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline() == "connected\n"
        deadline = time.monotonic() + 10
        while not (pids := running_query_of(postgres, name)):
            assert time.monotonic() < deadline, "the query never started"
            time.sleep(0.05)
        client.send_signal(signal.SIGKILL)
        client.wait()
        if interval:
            deadline = time.monotonic() + 10
            while running_query_of(postgres, name):
                assert time.monotonic() < deadline, "the server did not end it"
                time.sleep(0.05)
        else:
            time.sleep(3)
            assert running_query_of(postgres, name) == pids
    finally:
        client.kill()
        postgres.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s",
            (name,),
        )


def test_database_checks_touch_only_the_named_aliases_and_leave_none_open(
    mysql, postgres
):
    """check --database mysql reads MariaDB through a connection it closes
    again, and opens none on PostgreSQL; a connection that was already open
    is left open, the same session."""
    mariadb, pg = Sessions(mysql), Sessions(postgres)
    try:
        before = mariadb.own(), pg.own()
        stderr = StringIO()
        call_command("check", "--database", "mysql", stderr=stderr)
        assert "django_task_db.W003" in stderr.getvalue()  # it did read the server
        assert connections["mysql"].connection is None
        assert connections["postgres"].connection is None
        assert (mariadb.wait_for_own(len(before[0])), pg.own()) == before
        session = mysql.session_id()
        check_servers(databases=["mysql"])
        assert mysql.session_id() == session
    finally:
        mariadb.close()
        pg.close()


def test_database_checks_pool_closed_again(pgpool):
    """With Django's pool, the check closes the pool it opened: no sessions
    of the pool's min_size stay on the server."""
    sessions = Sessions(pgpool)
    try:
        assert sessions.own() == set()
        check_servers(databases=["pgpool"])
        assert sessions.wait_for_own(0) == set()
    finally:
        sessions.close()


def test_checks_without_databases_ask_no_server(mysql, postgres):
    """Plain ``check`` (databases=None) runs no server check at all."""
    assert check_servers(databases=None) == []
    assert connections["mysql"].connection is None


def test_w009_unreachable_server_without_secrets(postgres, probe):
    """A server that cannot be reached is W009 with the driver's error, with
    the password and OPTIONS values masked (psycopg quotes a bad sslmode)."""
    alias = probe(
        "postgres",
        PASSWORD=SENTINEL,
        OPTIONS={"sslmode": f"bad-{SENTINEL}", "application_name": SENTINEL},
    )
    (warning,) = check_servers(databases=[alias])
    assert warning.id == "django_task_db.W009"
    assert "OperationalError" in warning.msg
    assert "sslmode" in warning.msg
    assert SENTINEL not in warning.msg


# The checks of settings alone.


@pytest.mark.parametrize(
    "task_db, extra, fires",
    [
        ({"HEALTH_CHECKS": False}, {"CONN_MAX_AGE": None}, True),
        ({"HEALTH_CHECKS": False, "ALIASES": {"probe": "close_old"}}, {}, True),
        ({"HEALTH_CHECKS": False}, {"CONN_HEALTH_CHECKS": True}, False),
        ({"HEALTH_CHECKS": False}, {"CONN_MAX_AGE": 60}, False),
        ({}, {"CONN_MAX_AGE": None}, False),
        ({"HEALTH_CHECKS": False, "STRATEGY": "keep"}, {}, False),
    ],
)
def test_w006_close_old_forever_without_health_checks(
    settings, probe, task_db, extra, fires
):
    alias = probe("mysql", **{"CONN_MAX_AGE": None, **extra})
    settings.TASK_DB = task_db
    found = [m for m in check_aliases() if m.id == "django_task_db.W006"]
    aliases = {re.search(r"alias '(\w+)'", m.msg)[1] for m in found}
    assert (alias in aliases) is fires
    assert "default" not in aliases  # SQLite: no server to drop a connection


@pytest.mark.parametrize(
    "task_db, extra, fires",
    [
        ({"STRATEGY": "close_all"}, {"CONN_MAX_AGE": None}, True),
        ({"ALIASES": {"probe": "close_all"}}, {"CONN_MAX_AGE": 60}, True),
        ({"STRATEGY": "close_all"}, {"CONN_MAX_AGE": 0}, False),
        ({"STRATEGY": "close_old"}, {"CONN_MAX_AGE": 60}, False),
    ],
)
def test_w007_close_all_with_persistent_connections(
    settings, probe, task_db, extra, fires
):
    alias = probe("default", **extra)
    settings.TASK_DB = task_db
    found = [m for m in check_aliases() if m.id == "django_task_db.W007"]
    assert any(f"alias '{alias}'" in m.msg for m in found) is fires


@pytest.mark.parametrize(
    "strategy, fires",
    [
        ("keep", True),
        ("django_task_db.strategies.keep", True),
        ("close_all", False),
        ("close_old", False),
    ],
)
def test_w008_pool_defeated_by_keep(settings, pgpool, strategy, fires):
    """keep never returns a pooled connection; close_all (pool and
    CONN_MAX_AGE 0) is not W007."""
    settings.TASK_DB = {"ALIASES": {"pgpool": strategy}}
    found = ids(m for m in check_aliases() if "'pgpool'" in m.msg)
    assert found == (["django_task_db.W008"] if fires else [])


def test_check_ids_are_unique_and_documented():
    """Every id the package's checks use is in README.rst's table once, and
    every id of the table is used."""
    readme = (ROOT / "README.rst").read_text()
    table = re.findall(r"^``(django_task_db\.[EWI]\d{3})``", readme, re.MULTILINE)
    assert len(table) == len(set(table))
    source = "".join(p.read_text() for p in (ROOT / "django_task_db").rglob("*.py"))
    assert set(re.findall(r"django_task_db\.[EWI]\d{3}", source)) == set(table)


# taskdb_status.


def status_command(*args: str) -> tuple[str, str, CommandError | None]:
    out, err = StringIO(), StringIO()
    try:
        call_command("taskdb_status", *args, stdout=out, stderr=err)
    except CommandError as exc:
        return out.getvalue(), err.getvalue(), exc
    return out.getvalue(), err.getvalue(), None


def server_limits(server: Server) -> tuple[int, int]:
    """max_connections and the connections reserved for superusers, asked
    of the server directly."""
    if isinstance(server, MySQLServer):
        return int(server.query("SELECT @@GLOBAL.max_connections")[0][0]), 0
    rows = server.query(
        "SELECT setting FROM pg_settings WHERE name IN "
        "('max_connections', 'superuser_reserved_connections', "
        "'reserved_connections') ORDER BY name = 'max_connections' DESC"
    )
    return int(rows[0][0]), sum(int(row[0]) for row in rows[1:])


def test_status_human_output(direct_server):
    """The table shows the alias's settings and the server's figures as the
    server gives them, and the status leaves no connection open."""
    sessions = Sessions(direct_server)
    try:
        out, _, error = status_command("--database", direct_server.alias)
        assert error is None
        assert sessions.wait_for_own(0) == set()
    finally:
        sessions.close()
    rows = dict(
        re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines() if line
    )
    settings = direct_server.settings
    assert rows["alias"] == direct_server.alias
    assert rows["host:port"] == f"{settings['HOST']}:{settings['PORT']}"
    assert rows["database"] == settings["NAME"]
    assert rows["user"] == settings["USER"]
    assert rows["CONN_MAX_AGE"] == "None"
    assert rows["pool"] == "off"
    assert rows["strategy"] == "close_old"
    max_connections, reserved = server_limits(direct_server)
    assert rows["max_connections"].split()[0] == str(max_connections)
    assert (f"({reserved} reserved)" in rows["max_connections"]) is bool(reserved)
    total, mine = re.fullmatch(
        r"(\d+) \((\d+) this user's\)", rows["connections now"]
    ).groups()
    assert int(total) >= int(mine) >= 1  # its own session at least
    assert idle_setting(direct_server) in rows["idle timeout"]


@pytest.mark.parametrize(
    "share, verdict", [(0.8, "fits"), (1.0, "tight"), (1.01, "does not fit")]
)
def test_status_budget_verdicts(mysql, share, verdict):
    """Threads for the share of MariaDB's max_connections (the suite's only
    alias on it): at 80 % it fits, up to 100 % it is tight, beyond it does
    not fit, with what to change, and the command fails."""
    max_connections, _ = server_limits(mysql)
    threads = int(share * max_connections)
    out, _, error = status_command(
        "--database",
        "mysql",
        "--hosts",
        "1",
        "--processes",
        "1",
        "--threads",
        str(threads),
    )
    line = next(line for line in out.splitlines() if line.startswith("mysql: "))
    assert line.startswith(
        f"mysql: {verdict}: needs {threads} connections of the {max_connections}"
    )
    if verdict == "fits":
        assert error is None
        return
    assert "fewer threads" in line
    assert f"at most {int(0.8 * max_connections)} connections per process" in line
    if verdict == "tight":
        assert error is None
    else:
        assert str(error) == "does not fit: mysql"


def test_status_budget_sums_the_aliases_of_one_server(postgres, pgpool):
    """3 hosts x 4 processes x 8 threads: 8 connections per process for the
    plain alias, the pool's max_size (4) for the pooled one, added up for
    their server."""
    out, _, _ = status_command(
        "--database", "postgres", "--database", "pgpool",
        "--hosts", "3", "--processes", "4", "--threads", "8", "--json",
    )  # fmt: skip
    reports = {r["alias"]: r for r in json.loads(out)["aliases"]}
    plain, pooled = reports["postgres"]["budget"], reports["pgpool"]["budget"]
    assert (plain["per_process"], plain["needed"]) == (8, 96)
    assert (pooled["per_process"], pooled["needed"]) == (4, 48)
    assert plain["server_needed"] == pooled["server_needed"] == 144
    max_connections, reserved = server_limits(postgres)
    assert plain["allowed"] == max_connections - reserved


JSON_KEYS = {
    "alias", "vendor", "host", "port", "database", "user", "conn_max_age",
    "conn_health_checks", "pool", "strategy", "server", "pooler", "error", "budget",
}  # fmt: skip
SERVER_KEYS = {
    "version", "idle_timeout_setting", "idle_timeout", "max_connections",
    "reserved_connections", "user_connection_limit", "connections",
    "user_connections", "idle_in_transaction_session_timeout",
    "client_connection_check_interval",
}  # fmt: skip
BUDGET_KEYS = {
    "per_process", "needed", "server_needed", "allowed", "user_needed",
    "user_allowed", "verdict", "advice",
}  # fmt: skip


def test_status_json_schema(mysql, postgres, pgpool, sqlite):
    """--json: version 1, the deployment, and per alias the documented keys."""
    out, _, _ = status_command("--json", "--threads", "2")
    document = json.loads(out)
    assert document["version"] == 1
    assert document["deployment"] == {"hosts": 1, "processes": 1, "threads": 2}
    reports = {r["alias"]: r for r in document["aliases"]}
    assert set(reports) == {"default", "mysql", "postgres", "pgpool"}
    for report in reports.values():
        assert set(report) == JSON_KEYS
        assert report["error"] is None
    assert reports["default"]["server"] is None and reports["default"]["budget"] is None
    for alias in ("mysql", "postgres", "pgpool"):
        assert set(reports[alias]["server"]) == SERVER_KEYS
        assert set(reports[alias]["budget"]) == BUDGET_KEYS
    assert reports["pgpool"]["pool"] == {
        "min_size": 2,
        "max_size": 4,
        "max_idle": 600.0,
    }
    assert reports["mysql"]["server"]["idle_timeout_setting"] == "wait_timeout"


def test_status_unreachable_alias_without_secrets(mysql, postgres, probe):
    """An alias that cannot be reached reports its error class and message
    with neither password nor OPTIONS values; the others still report and
    the command fails."""
    probe(
        "postgres",
        PASSWORD=SENTINEL,
        OPTIONS={"sslmode": f"bad-{SENTINEL}", "application_name": SENTINEL},
    )
    for args in ((), ("--json",)):
        out, err, error = status_command(
            *args, "--database", "probe", "--database", "mysql"
        )
        assert SENTINEL not in out + err + str(error)
        assert str(error) == "not reachable: probe"
        assert "OperationalError: connection is bad: invalid sslmode value" in out
        assert "10." in out  # MariaDB's version: mysql still reported


def test_status_exit_status_and_no_secrets_in_a_process(tmp_path):
    """manage.py taskdb_status in a process of its own, PostgreSQL pointed at
    a closed port with a sentinel password: exit status 1, an error line
    per PostgreSQL alias, the sentinel nowhere."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "TASK_DB_POSTGRES_PORT": str(free_port()),
        "TASK_DB_POSTGRES_PASSWORD": SENTINEL,
    }
    result = subprocess.run(
        [sys.executable, "-m", "django", "taskdb_status", "--database", "postgres"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert SENTINEL not in result.stdout + result.stderr
    assert "postgres: not reachable: OperationalError: " in result.stdout
    assert "CommandError: not reachable: postgres" in result.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ("--threads", "0"),
            "argument --threads: '0' is not a whole number from 1 to 1,000,000",
        ),
        (
            ("--hosts", "two"),
            "argument --hosts: 'two' is not a whole number from 1 to 1,000,000",
        ),
        (
            ("--hosts", "9" * 2200),
            "argument --hosts: '99999999999999999999...' is not a whole number "
            "from 1 to 1,000,000",
        ),
        (
            ("--database", "nope"),
            "--database 'nope' is not an alias of DATABASES; allowed: default",
        ),
    ],
)
def test_status_bad_arguments(args, words):
    with pytest.raises(CommandError, match=re.escape(words)):
        call_command("taskdb_status", *args)


def test_status_sqlite_needs_no_server(sqlite):
    (report,) = diagnostics.status(["default"], diagnostics.Deployment(threads=4))
    assert (report.vendor, report.server, report.error, report.budget) == (
        "sqlite", None, None, None,
    )  # fmt: skip


def test_duplicate_aliases_report_once():
    out, _, _ = status_command("--database", "default", "--database", "default")
    assert out.splitlines()[0].split() == ["alias", "default"]


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: diagnostics.Deployment(-1, 2, 3), ValueError, "hosts is -1"),
        (lambda: diagnostics.Deployment(1, 0, 1), ValueError, "processes is 0"),
        (lambda: diagnostics.Deployment(1, 1, True), ValueError, "threads is True"),
        (lambda: diagnostics.status("default"), TypeError, "the str 'default'"),
        (lambda: diagnostics.status(["nope"]), ValueError, "'nope' is not an alias"),
    ],
)
def test_python_api_rejects_bad_arguments(call, error, words):
    with pytest.raises(error, match=re.escape(words)):
        call()


@pytest.mark.parametrize(
    "text, shown",
    [
        # A one-letter password is masked where it stands alone only.
        (
            "database a failed: connection failed",
            "database *** failed: connection failed",
        ),
        # An OPTIONS value inside a longer word is left alone.
        ("SSL was required", "SSL was required"),
        ('invalid sslmode value: "require"', 'invalid sslmode value: "***"'),
        ("Unknown column 'SENTINELOPT' in 'SET'", "Unknown column '***' in 'SET'"),
    ],
)
def test_secrets_masked_as_whole_words(probe, text, shown):
    alias = probe(
        "postgres",
        PASSWORD="a",
        OPTIONS={"sslmode": "require", "init": "SET @x = SENTINELOPT"},
    )
    assert diagnostics.without_secrets(text, alias) == shown


def test_pooled_alias_unreachable_without_the_pool(pgpool, probe, caplog):
    """A pooled alias whose server cannot be reached: the check and the
    status read it through a driver connection of their own, not the pool,
    so nothing waits for the pool's timeout and psycopg_pool logs no
    attempt (its records carry the OPTIONS values)."""
    options = {
        **settings_of("pgpool")["OPTIONS"],
        "pool": {"min_size": 1, "max_size": 2, "timeout": 30},
        "options": f"-c work_mem={SENTINEL}",
    }
    alias = probe("pgpool", OPTIONS=options)
    with caplog.at_level("DEBUG"):
        (warning,) = check_servers(databases=[alias])
        (report,) = diagnostics.status([alias])
    assert warning.id == "django_task_db.W009"
    # (work_mem, a word of OPTIONS, is masked too.)
    assert "FATAL:  invalid value for parameter" in warning.msg
    assert report.error is not None and "invalid value for parameter" in report.error
    assert SENTINEL not in warning.msg + report.error + caplog.text
    assert alias not in type(connections[alias])._connection_pools


def settings_of(alias: str) -> dict[str, Any]:
    from django.conf import settings

    return settings.DATABASES[alias]


@pytest.fixture
def role(postgres):
    """A PostgreSQL role that is not a superuser, CONNECTION LIMIT 7."""
    name = f"{postgres.application_name}_role"[:63]
    postgres.query(f'DROP ROLE IF EXISTS "{name}"')
    postgres.query(f'CREATE ROLE "{name}" LOGIN CONNECTION LIMIT 7')
    yield name
    postgres.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
        (name,),
    )
    postgres.query(f'DROP ROLE IF EXISTS "{name}"')


def test_status_counts_other_users_sessions_for_an_unprivileged_role(
    postgres, probe, role
):
    """A role without pg_read_all_stats still counts the sessions of other
    users (PostgreSQL hides their backend_type from it)."""
    alias = probe("postgres", USER=role)
    held = postgres.admin()  # a session of the superuser, held meanwhile
    try:
        (report,) = diagnostics.status([alias])
    finally:
        held.close()
    assert report.server is not None
    assert report.server.user_connections == 1  # the status's own
    assert report.server.connections > report.server.user_connections
    assert report.server.user_connection_limit == 7


@pytest.mark.parametrize(
    "threads, verdict", [(5, "fits"), (7, "tight"), (8, "does not fit")]
)
def test_user_limit_counts_that_users_aliases_only(
    postgres, probe, role, threads, verdict
):
    """The role's CONNECTION LIMIT (7) is against the role's own aliases;
    the server's limit against every alias on it."""
    alias = probe("postgres", USER=role)
    (report,) = diagnostics.status([alias], diagnostics.Deployment(threads=threads))
    budget = report.budget
    assert budget is not None
    assert (budget.user_needed, budget.user_allowed) == (threads, 7)
    assert budget.server_needed > budget.user_needed  # "postgres" and "pgpool" too
    assert budget.verdict == verdict
    if verdict != "fits":
        assert f"for the user '{role}'" in budget.advice
        assert f"a higher connection limit for the user '{role}'" in budget.advice


@pytest.mark.parametrize(
    "host, port", [("localhost", ""), ("127.0.0.1", 3306), ("", "")]
)
def test_one_server_under_other_names(mysql, probe, host, port):
    """localhost and 127.0.0.1, PORT unset, a string or a number: one
    server, whose budget adds them up."""
    alias = probe("mysql", HOST=host, PORT=port)
    reports = diagnostics.status([alias, "mysql"], diagnostics.Deployment(threads=10))
    assert [r.budget.server_needed for r in reports if r.budget] == [20, 20]
    assert reports[0].port == "3306"
