"""The strategies at unit boundaries, as the database server sees them."""

from __future__ import annotations

import logging

import pytest
from django.db import OperationalError, connections, transaction
from django.db.backends.signals import connection_created

from django_task_db import task_scope
from tests.testapp.models import Item


class Boom(Exception):
    pass


def test_close_old_reuses_the_server_connection(direct_server, settings):
    """Under close_old with CONN_MAX_AGE=None, units share one server session."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    ids = []
    for _ in range(3):
        with task_scope():
            ids.append(direct_server.session_id())
    assert ids[0] == ids[1] == ids[2]
    assert direct_server.sessions() == {ids[0]}


def test_close_all_opens_a_fresh_connection_per_unit(direct_server, settings):
    """Under close_all every unit gets a new server session, closed at its end."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    ids = []
    for _ in range(3):
        with task_scope():
            ids.append(direct_server.session_id())
        assert direct_server.wait_for_count(0) == 0
    assert len(set(ids)) == 3


def test_close_old_honours_conn_max_age(direct_server, settings):
    """close_old closes a connection at the end of a unit once CONN_MAX_AGE is over."""
    settings.TASK_DB = {"STRATEGY": "close_old"}
    connections[direct_server.alias].settings_dict["CONN_MAX_AGE"] = 0
    try:
        with task_scope():
            first = direct_server.session_id()
        with task_scope():
            second = direct_server.session_id()
    finally:
        connections[direct_server.alias].settings_dict["CONN_MAX_AGE"] = None
    assert first != second
    assert direct_server.wait_for_count(0) == 0


def test_per_alias_strategy(mysql, postgres, settings, closed):
    """ALIASES overrides STRATEGY: postgres kept, mysql closed, in the same unit."""
    settings.TASK_DB = {"STRATEGY": "close_all", "ALIASES": {"postgres": "keep"}}
    with task_scope():
        my_id = mysql.session_id()
        pg_id = postgres.session_id()
    assert mysql.wait_for_count(0) == 0
    assert postgres.sessions() == {pg_id}
    with task_scope():
        assert postgres.session_id() == pg_id
        assert mysql.session_id() != my_id
    assert ("mysql", "close_all") in closed
    assert not [c for c in closed if c[0] == "postgres"]


def test_scope_strategy_overrides_settings(direct_server, settings):
    """task_scope(strategy=...) wins over TASK_DB for that unit only."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    with task_scope(strategy="keep"):
        first = direct_server.session_id()
    with task_scope(strategy="keep"):
        assert direct_server.session_id() == first
    assert direct_server.sessions() == {first}
    with task_scope():
        pass
    assert direct_server.wait_for_count(0) == 0


def test_pool_connection_returned_not_pool_closed(pgpool, settings, closed):
    """With Django's pool, closing returns the connection; the pool survives."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    connection = connections["pgpool"]
    with task_scope():
        first = pgpool.session_id()
        pool = connection.pool
    assert connection.connection is None
    assert ("pgpool", "close_all") in closed
    assert first in pgpool.sessions()  # back in the pool, still open on the server
    for _ in range(5):
        with task_scope():
            assert pgpool.session_id() in pgpool.sessions()
    assert connection.pool is pool
    assert not pool.closed
    assert len(pgpool.sessions()) <= 4  # the pool's max_size


@pytest.mark.parametrize("health_checks", [True, False])
def test_connection_killed_while_idle(direct_server, settings, health_checks):
    """A connection killed between units is replaced before the next unit's
    first query with HEALTH_CHECKS, and fails that query without it."""
    settings.TASK_DB = {"HEALTH_CHECKS": health_checks, "HEALTH_CHECK_IDLE": 0}
    with task_scope():
        killed = direct_server.session_id()
    direct_server.kill(killed)
    if health_checks:
        with task_scope():
            assert Item.objects.using(direct_server.alias).count() == 0
            assert direct_server.session_id() != killed
    else:
        with pytest.raises(OperationalError):
            with task_scope():
                Item.objects.using(direct_server.alias).count()
        # The failure closed the broken connection: the next unit recovers.
        with task_scope():
            assert Item.objects.using(direct_server.alias).count() == 0


def test_health_check_pings_once_and_only_used_aliases(
    mysql, postgres, settings, monkeypatch
):
    """With HEALTH_CHECK_IDLE 0: at most one ping per connection per unit,
    none for an alias left unused."""
    settings.TASK_DB = {"STRATEGY": "keep", "HEALTH_CHECK_IDLE": 0}
    with task_scope():
        mysql.session_id()
        postgres.session_id()
    pings = {"mysql": 0, "postgres": 0}
    for alias in pings:
        connection = connections[alias]
        real = connection.is_usable

        def counting(alias=alias, real=real):
            pings[alias] += 1
            return real()

        monkeypatch.setattr(connection, "is_usable", counting)
    with task_scope():
        for _ in range(3):
            Item.objects.using("mysql").count()
    assert pings == {"mysql": 1, "postgres": 0}


def test_failed_unit_with_uncommitted_writes(direct_server, settings, closed):
    """A unit that raises with writes outside autocommit: nothing is committed,
    the connection is closed, and the next unit works."""
    alias = direct_server.alias
    with pytest.raises(Boom):
        with task_scope():
            transaction.set_autocommit(False, using=alias)
            Item.objects.using(alias).create(name="lost")
            session = direct_server.session_id()
            raise Boom
    assert (alias, "failure") in closed
    direct_server.wait_until_gone(session)
    assert direct_server.count_rows() == 0
    with task_scope():
        Item.objects.using(alias).create(name="kept")
        assert connections[alias].get_autocommit()
    assert direct_server.count_rows() == 1


def test_failed_unit_inside_its_own_atomic_block(direct_server, settings):
    """An exception raised in an atomic block inside the unit rolls back and
    reaches the caller unchanged."""
    alias = direct_server.alias
    error = Boom("original")
    with pytest.raises(Boom) as raised:
        with task_scope():
            with transaction.atomic(using=alias):
                Item.objects.using(alias).create(name="lost")
                raise error
    assert raised.value is error
    assert direct_server.count_rows() == 0
    with task_scope():
        assert Item.objects.using(alias).count() == 0


def test_close_on_failure_can_be_turned_off(direct_server, settings):
    """With CLOSE_ON_FAILURE False, a failed unit keeps the strategy's choice."""
    settings.TASK_DB = {"CLOSE_ON_FAILURE": False}
    with pytest.raises(Boom):
        with task_scope():
            session = direct_server.session_id()
            raise Boom
    with task_scope():
        assert direct_server.session_id() == session


def test_scope_inside_outer_atomic_block(direct_server, settings, caplog):
    """Nothing is closed inside an atomic block; the outer transaction commits
    every row; one warning names the alias."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    alias = direct_server.alias
    with caplog.at_level(logging.WARNING, logger="django_task_db"):
        with transaction.atomic(using=alias):
            Item.objects.using(alias).create(name="outer")
            session = direct_server.session_id()
            with task_scope():
                Item.objects.using(alias).create(name="inner")
            assert direct_server.session_id() == session
            assert direct_server.count_rows() == 0  # not committed yet
    assert direct_server.count_rows() == 2
    warnings = [r for r in caplog.records if r.name == "django_task_db"]
    assert len(warnings) == 1
    assert repr(alias) in warnings[0].getMessage()
    assert "start" in warnings[0].getMessage()


def test_nested_scopes_only_outermost_acts(direct_server, settings, closed):
    """An inner scope with close_all inside an outer one closes nothing."""
    settings.TASK_DB = {"STRATEGY": "close_all"}
    with task_scope(strategy="keep"):
        session = direct_server.session_id()
        with task_scope():
            assert direct_server.session_id() == session
        with task_scope(strategy="close_all"):
            pass
        assert direct_server.session_id() == session
    assert closed == []
    assert direct_server.sessions() == {session}


def test_sqlite_close_old_reuses_and_close_all_reopens(sqlite, settings):
    """On SQLite: one connection for many units under close_old, one per unit
    under close_all."""
    opened = []
    connection_created.connect(
        lambda **kw: opened.append(kw["connection"].alias), weak=False, dispatch_uid="t"
    )
    try:
        for _ in range(3):
            with task_scope():
                Item.objects.using(sqlite).create(name="x")
        assert opened == ["default"]
        settings.TASK_DB = {"STRATEGY": "close_all"}
        for _ in range(3):
            with task_scope():
                Item.objects.using(sqlite).count()
        assert opened == ["default"] * 4
        assert connections[sqlite].connection is None
    finally:
        connection_created.disconnect(dispatch_uid="t")


def test_close_failure_is_swallowed_per_alias(
    mysql, postgres, settings, monkeypatch, caplog, closed
):
    """A close() that raises on one alias: the others are still handled and
    nothing reaches the unit's caller."""
    from django.db import InterfaceError

    settings.TASK_DB = {"STRATEGY": "close_all"}
    caplog.set_level(logging.INFO, logger="django_task_db")
    with task_scope():
        mysql.session_id()
        postgres.session_id()

        def broken_close():
            raise InterfaceError("connection already closed")

        monkeypatch.setattr(connections["mysql"], "_close", broken_close)
    assert ("postgres", "close_all") in closed
    assert postgres.wait_for_count(0) == 0
    assert "connection already closed" in caplog.text


def _prepare(connection, state: str, server) -> None:
    """Put an open connection in ``state`` before a strategy looks at it."""
    if state == "errors, usable":
        connection.errors_occurred = True
    elif state == "errors, killed":
        connection.errors_occurred = True
        server.kill(server.session_id())
    elif state == "max age over":
        connection.close_at = 0.0  # time.monotonic() is past it
    elif state == "autocommit off":
        connection.set_autocommit(False)


@pytest.mark.parametrize(
    "state",
    ["fresh", "errors, usable", "errors, killed", "max age over", "autocommit off"],
)
def test_close_old_decides_as_django_does(direct_server, state):
    """close_old (which skips Django's work when there is nothing to close)
    leaves a connection as close_if_unusable_or_obsolete() leaves it."""
    from django_task_db import strategies

    connection = connections[direct_server.alias]
    outcomes = []
    for close in (connection.close_if_unusable_or_obsolete, strategies.close_old):
        connection.close()
        direct_server.session_id()  # opens it
        connection.health_check_done = True
        _prepare(connection, state, direct_server)
        if close is strategies.close_old:
            close(connection, "finish")
        else:
            close()
        outcomes.append(
            (
                connection.connection is None,
                connection.errors_occurred,
                connection.health_check_done,
            )
        )
    connection.close()
    assert outcomes[0] == outcomes[1]
    closed = state not in ("fresh", "errors, usable")
    assert outcomes[1][0] is closed
