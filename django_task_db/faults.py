"""Telling a lost connection from every other database error."""

from __future__ import annotations

# MySQL and MariaDB error codes that mean the session itself is gone. From
# the client library (MariaDB Connector/C errmsg.h, MySQL's client error
# reference): 2006 CR_SERVER_GONE_ERROR, 2013 CR_SERVER_LOST, 2014
# CR_COMMANDS_OUT_OF_SYNC, 2045 and 2055 CR_SERVER_LOST_EXTENDED (MySQL's
# lost-connection codes while reading). From the server (mysqld_error.h,
# MySQL's server error reference): 1053 ER_SERVER_SHUTDOWN, 1927
# ER_CONNECTION_KILLED (MariaDB), 4031 ER_CLIENT_INTERACTION_TIMEOUT (MySQL
# 8.0.24+, wait_timeout; MariaDB uses the number for a trigger error that
# only DDL raises). MariaDB's idle_transaction_timeout and wait_timeout close
# the session silently: the client then says 2006 or 2013. Code 0 is what
# mysqlclient reports on a connection it has already closed.
MYSQL_CODES = frozenset({0, 1053, 1927, 2006, 2013, 2014, 2045, 2055, 4031})

# PostgreSQL SQLSTATEs outside class 08 (connection exception) that end the
# session (PostgreSQL's Appendix A, "PostgreSQL Error Codes"): 25P03
# idle_in_transaction_session_timeout, 57P01 admin_shutdown (also
# pg_terminate_backend), 57P02 crash_shutdown, 57P03 cannot_connect_now,
# 57P04 database_dropped, 57P05 idle_session_timeout.
POSTGRES_STATES = frozenset({"25P03", "57P01", "57P02", "57P03", "57P04", "57P05"})

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
