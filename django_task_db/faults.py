"""Telling a lost connection from every other database error."""

from __future__ import annotations

# MySQL and MariaDB client and server error codes that mean the connection
# itself is gone: 1927 connection killed, 2006 server has gone away, 2013 lost
# connection during query, 2014 commands out of sync, 2045 (and 2055) lost
# connection while reading, 4031 disconnected by the server for inactivity.
# Code 0 is what mysqlclient reports on a connection it has already closed.
MYSQL_CODES = frozenset({0, 1927, 2006, 2013, 2014, 2045, 2055, 4031})

# PostgreSQL SQLSTATEs outside class 08 (connection exception) that end the
# session: admin_shutdown, crash_shutdown, cannot_connect_now,
# idle_session_timeout.
POSTGRES_STATES = frozenset({"57P01", "57P02", "57P03", "57P05"})

# psycopg's and libpq's errors about the connection carry no SQLSTATE: only a
# text.
POSTGRES_MESSAGES = (
    "server closed the connection unexpectedly",
    "the connection is closed",
    "the connection is lost",
    "connection already closed",
    "could not send data to server",
    "no connection to the server",
    "SSL SYSCALL error: EOF detected",
    "SSL connection has been closed unexpectedly",
)


def is_disconnect(exc: BaseException) -> bool:
    """Whether ``exc`` means that the database connection itself is gone.

    Accepts Django's wrapped errors and the drivers' own, looking through
    ``__cause__``. True for MySQL/MariaDB codes in MYSQL_CODES and PostgreSQL
    SQLSTATE class 08 and POSTGRES_STATES; false for everything else,
    including deadlocks, lock wait and statement timeouts, a killed query,
    and integrity or data errors.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _classify(current)
        if verdict is not None:
            return verdict
        current = current.__cause__
    return False


def _classify(exc: BaseException) -> bool | None:
    """True or False for a driver's error; None when ``exc`` does not say."""
    module = type(exc).__module__.partition(".")[0]
    if module in ("MySQLdb", "pymysql"):
        code = exc.args[0] if exc.args else None
        return isinstance(code, int) and code in MYSQL_CODES
    if module in ("psycopg", "psycopg2"):
        # psycopg 3 names it sqlstate, psycopg2 pgcode.
        state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
        if state:
            return state.startswith("08") or state in POSTGRES_STATES
        return any(message in str(exc) for message in POSTGRES_MESSAGES)
    return None
