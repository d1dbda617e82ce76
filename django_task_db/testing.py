"""Find the database connections a test leaves behind.

``check_connections()`` is a context manager (for unittest, or any code)
that raises ``ConnectionLeak`` at its end for each connection that, since it
began:

- was opened in a thread that has ended and is still open (the driver's
  connection is not None): nobody can close it but the garbage collector
  (in-memory SQLite databases excepted: Django never closes them);
- is in more atomic blocks than at the start, or has autocommit off when it
  had not, in the thread that entered the check; or is inside a
  transaction in another thread;
- has a query still executing, in any thread.

It works whether or not ``django_task_db`` is in ``INSTALLED_APPS``, and
independently of the app's own cleanup at thread end: connections are
recorded from Django's ``connection_created`` (with their thread and, only
while a check is running, the place in the caller's code that opened them)
and queries through ``execute_wrappers``. ``django_task_db.pytest_plugin``
runs it around tests.
"""

from __future__ import annotations

import itertools
import os
import sys
import sysconfig
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal
from weakref import WeakSet

from django.db import connections
from django.db.backends.signals import connection_created

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = ["ConnectionLeak", "Leak", "check_connections"]

LeakKind = Literal["ended_thread", "transaction", "running_query"]

_RECORD = "_django_task_db_testing"
_serial = itertools.count(1)
_last_serial = 0
_active = 0  # checks running now, in any thread
_recorded: WeakSet[BaseDatabaseWrapper] = WeakSet()
_lock = threading.Lock()


@dataclass
class _Record:
    """What is known of one connection: where its last connect happened."""

    serial: int
    thread: weakref.ref[threading.Thread]
    thread_name: str
    opened_at: str | None
    # Queries executing on it now: (thread name, where it was started).
    running: list[tuple[str, str | None]] = field(default_factory=list)


@dataclass(frozen=True)
class Leak:
    """One connection left behind. ``kind`` is ``"ended_thread"``,
    ``"transaction"`` or ``"running_query"``; ``where`` is
    ``"path:line in function"`` of the caller's code (None when it was not
    recorded: opened before any check ran)."""

    kind: LeakKind
    alias: str
    thread: str
    where: str | None
    detail: str

    def __str__(self) -> str:
        where = f" at {self.where}" if self.where else ""
        return f"alias {self.alias!r}, thread {self.thread!r}{where}: {self.detail}"


class ConnectionLeak(AssertionError):
    """Raised at the end of ``check_connections()``; ``leaks`` lists them."""

    def __init__(self, leaks: list[Leak]):
        self.leaks = leaks
        lines = "\n".join(f"- {leak}" for leak in leaks)
        super().__init__(
            f"{len(leaks)} database connection(s) left behind:\n{lines}\n"
            "Close connections before a thread ends (connections.close_all() "
            "in the thread, or django_task_db.task_scope), end atomic blocks "
            "and transactions, and wait for the queries of other threads."
        )


def install() -> None:
    """Start recording connections (once per process; cheap: a stack is
    walked at a connect only while a check is running)."""
    connection_created.connect(_on_connection_created, dispatch_uid=_RECORD)


def _on_connection_created(*, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    global _last_serial
    thread = threading.current_thread()
    with _lock:
        serial = _last_serial = next(_serial)
    setattr(
        connection,
        _RECORD,
        _Record(
            serial=serial,
            thread=weakref.ref(thread),
            thread_name=thread.name,
            opened_at=_caller_place() if _active else None,
        ),
    )
    if _watch_queries not in connection.execute_wrappers:
        # First, so that a caller's own execute_wrapper() pops its own.
        connection.execute_wrappers.insert(0, _watch_queries)
    _recorded.add(connection)


def _watch_queries(
    execute: Callable[..., Any],
    sql: str,
    params: Any,
    many: bool,
    context: dict[str, Any],
) -> Any:
    record: _Record | None = getattr(context["connection"], _RECORD, None)
    if record is None or not _active:
        return execute(sql, params, many, context)
    entry = (threading.current_thread().name, _caller_place())
    record.running.append(entry)
    try:
        return execute(sql, params, many, context)
    finally:
        record.running.remove(entry)


# The code that is not the caller's: Django's, asgiref's, this package's,
# the standard library's and pytest's.
def _library_dirs() -> tuple[str, ...]:
    import asgiref
    import django

    import django_task_db

    found = [
        os.path.dirname(module.__file__ or "")
        for module in (django, asgiref, django_task_db)
    ]
    found += [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]]
    for name in ("_pytest", "pluggy", "celery", "kombu", "billiard"):
        module = sys.modules.get(name)
        if module is not None and module.__file__:
            found.append(os.path.dirname(module.__file__))
    return tuple(os.path.join(os.path.realpath(d), "") for d in found if d)


_libraries: tuple[str, ...] | None = None
# Whether each file seen is the caller's (its shown path) or a library's (None).
_files: dict[str, str | None] = {}


def _caller_place() -> str | None:
    """``path:line in function`` of the innermost frame of the caller's code."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        try:
            shown = _files[name]
        except KeyError:
            shown = _files[name] = _users_file(name)
        if shown is not None:
            return f"{shown}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return None


def _users_file(name: str) -> str | None:
    global _libraries
    if _libraries is None:
        _libraries = _library_dirs()
    path = os.path.realpath(name)
    if name.startswith("<") or path.startswith(_libraries):
        return None
    return _shorter(path)


def _shorter(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _transaction_state(connection: BaseDatabaseWrapper) -> tuple[int, bool]:
    """(atomic blocks, autocommit turned off by the caller) of ``connection``."""
    blocks = len(connection.atomic_blocks) if connection.in_atomic_block else 0
    off = (
        connection.connection is not None
        and not connection.autocommit
        and bool(connection.settings_dict["AUTOCOMMIT"])
        and not connection.in_atomic_block
    )
    return blocks, off


def _here() -> dict[str, tuple[int, bool]]:
    return {
        c.alias: _transaction_state(c) for c in connections.all(initialized_only=True)
    }


def find_leaks(since: int, baseline: dict[str, tuple[int, bool]]) -> list[Leak]:
    """The leaks since the connect numbered ``since``, with the transaction
    state of this thread's connections compared to ``baseline``."""
    leaks: list[Leak] = []
    for connection in connections.all(initialized_only=True):
        blocks, off = _transaction_state(connection)
        start_blocks, start_off = baseline.get(connection.alias, (0, False))
        # Where the block was entered is not recorded: the test's own code.
        where = None
        name = threading.current_thread().name
        detail = None
        if blocks > start_blocks:
            detail = (
                f"inside {blocks - start_blocks} more atomic block(s) than at the start"
            )
        elif off and not start_off:
            detail = (
                "autocommit is off and a transaction open, which it was not at "
                "the start"
            )
        if detail is not None:
            leaks.append(Leak("transaction", connection.alias, name, where, detail))
    this_thread = threading.current_thread()
    for connection in list(_recorded):
        record = getattr(connection, _RECORD, None)
        if record is None:
            continue
        for thread_name, started_at in list(record.running):
            leaks.append(
                Leak(
                    "running_query",
                    connection.alias,
                    thread_name,
                    started_at,
                    "a query is still executing (connection opened "
                    f"at {record.opened_at or 'an unknown place'})",
                )
            )
        if record.serial <= since or connection.connection is None:
            continue
        thread = record.thread()
        if _in_memory(connection):
            continue  # Django never closes these: closing loses the database
        if thread is None or not thread.is_alive():
            leaks.append(
                Leak(
                    "ended_thread",
                    connection.alias,
                    record.thread_name,
                    record.opened_at,
                    "still open after its thread ended",
                )
            )
        elif thread is not this_thread and (
            connection.in_atomic_block or _transaction_state(connection)[1]
        ):
            leaks.append(
                Leak(
                    "transaction",
                    connection.alias,
                    record.thread_name,
                    record.opened_at,
                    "inside a transaction in a thread that is still running",
                )
            )
    return leaks


def _in_memory(connection: BaseDatabaseWrapper) -> bool:
    return connection.vendor == "sqlite" and bool(
        connection.is_in_memory_db()  # type: ignore[attr-defined]
    )


class Check:
    """One running check: started by ``begin()``, ended by ``end()``."""

    def __init__(self) -> None:
        install()
        self.since = _last_serial
        self.baseline: dict[str, tuple[int, bool]] = {}
        self.ended = False

    def begin(self) -> None:
        global _active
        with _lock:
            _active += 1
        self.baseline = _here()

    def leaks(self) -> list[Leak]:
        return find_leaks(self.since, self.baseline)

    def end(self) -> list[Leak]:
        """Stop recording; return the leaks found."""
        try:
            return self.leaks()
        finally:
            self.stop()

    def stop(self) -> None:
        global _active
        if not self.ended:
            self.ended = True
            with _lock:
                _active -= 1


@contextmanager
def check_connections() -> Iterator[Check]:
    """Raise ``ConnectionLeak`` at the end of the block for the connections
    it leaves behind (see the module's docstring). The block's own
    exception, if it raised, goes on unchanged and nothing is checked.

    Transactions are compared with those of this thread's connections when
    the block starts: inside a Django ``TestCase`` (or pytest-django's
    ``django_db``) the test's own atomic blocks are not leaks.
    """
    check = Check()
    check.begin()
    try:
        yield check
    except BaseException:
        check.stop()
        raise
    leaks = check.end()
    if leaks:
        raise ConnectionLeak(leaks)
