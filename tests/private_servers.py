"""Private MariaDB and PostgreSQL instances that tests may stop, start and
restart, and extra Django database aliases added at run time.

A private instance has its own data directory (under a temporary folder) and
its own TCP port on 127.0.0.1, found free when it is created; nothing else
uses it, so stopping it disturbs no other test or test run. PostgreSQL
refuses to run as root: as root, its commands run as the ``postgres`` user
(``runuser``), in a folder that user owns.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from django.db import connections

MARIADBD = os.environ.get("TASK_DB_MARIADBD", "/usr/sbin/mariadbd")
MARIADB_INSTALL_DB = os.environ.get(
    "TASK_DB_MARIADB_INSTALL_DB", "/usr/bin/mariadb-install-db"
)
POSTGRES_BIN = Path(
    os.environ.get("TASK_DB_POSTGRES_BIN", "/usr/lib/postgresql/15/bin")
)
START_TIMEOUT = 60
STOP_TIMEOUT = 60


def add_alias(alias: str, database: dict[str, Any]) -> None:
    """Add ``alias`` to DATABASES at run time, with the defaults Django fills
    in when it reads the settings.

    ``connections.settings`` is the very dict of ``settings.DATABASES`` (read
    once, on first use), so the alias appears in both: ``connections[alias]``,
    ``connections.all()`` and the system checks see it. Remove it with
    remove_alias.
    """
    from django.conf import settings

    database = dict(database)
    connections.configure_settings({**connections.settings, alias: database})
    connections.settings[alias] = database
    if settings.DATABASES is not connections.settings:
        settings.DATABASES[alias] = database


def remove_alias(alias: str) -> None:
    """Close this thread's connection of ``alias`` and forget the alias.

    Connections that other threads opened on it must be closed by them."""
    from django.conf import settings

    try:
        connection = getattr(connections._connections, alias)
    except AttributeError:
        pass
    else:
        connection.close()
        delattr(connections._connections, alias)
    connections.settings.pop(alias, None)
    settings.DATABASES.pop(alias, None)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateServer:
    """One private server instance; ``missing()`` says why it cannot run."""

    name = ""
    vendor = ""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = directory
        self.port = port or free_port()
        self.log_path = directory / "server.log"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} 127.0.0.1:{self.port} {self.directory}>"

    def missing(self) -> str | None:
        raise NotImplementedError

    def initialize(self) -> None:
        raise NotImplementedError

    def start(self, timeout: float = START_TIMEOUT) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        self.stop()
        self.start()

    def connect(self, database: str | None = "", **kwargs: Any) -> Any:
        """A driver connection, outside Django (autocommit), to the
        instance's database ("") or its server's default one (None)."""
        raise NotImplementedError

    def database(self) -> dict[str, Any]:
        """A DATABASES entry for this instance."""
        raise NotImplementedError

    def accepts_connections(self) -> bool:
        try:
            self.connect(database=None).close()
        except Exception:  # the driver's connect error, whichever it is
            return False
        return True

    def wait_until_accepting(self, timeout: float, process: Any = None) -> None:
        deadline = time.monotonic() + timeout
        while not self.accepts_connections():
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{self} exited at start:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self} not accepting in {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError as exc:
            return f"(no log: {exc})"

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class PrivateMariaDB(PrivateServer):
    name = "private MariaDB"
    vendor = "mysql"
    database_name = "task_db_fault_matrix"

    def __init__(self, directory: Path, port: int | None = None):
        super().__init__(directory, port)
        self.datadir = directory / "data"
        self.process: subprocess.Popen[bytes] | None = None

    def missing(self) -> str | None:
        for binary in (MARIADBD, MARIADB_INSTALL_DB):
            if not os.access(binary, os.X_OK):
                return f"{binary} is missing"
        return None

    def initialize(self) -> None:
        command = [
            MARIADB_INSTALL_DB,
            "--no-defaults",
            f"--datadir={self.datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ]
        if os.geteuid() == 0:
            command.append("--user=root")
        with open(self.directory / "install.log", "wb") as log:
            subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=120
            )
        self.start()
        conn = self.connect(database=None)
        try:
            with conn.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {self.database_name}")
        finally:
            conn.close()

    def start(self, timeout: float = START_TIMEOUT) -> None:
        command = [
            MARIADBD,
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.directory / 'mariadbd.sock'}",
            f"--pid-file={self.directory / 'mariadbd.pid'}",
            f"--log-error={self.log_path}",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=32M",
            "--innodb-flush-log-at-trx-commit=2",
            "--max-connections=100",
        ]
        if os.geteuid() == 0:
            command.append("--user=root")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self.wait_until_accepting(timeout, self.process)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """A normal shutdown (SIGTERM): the server ends its sessions."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def connect(self, database: str | None = "", **kwargs: Any) -> Any:
        import MySQLdb

        params: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "user": "root",
            "autocommit": True,
            "connect_timeout": 5,
        }
        name = self.database_name if database == "" else database
        if name:
            params["database"] = name
        return MySQLdb.connect(**params, **kwargs)

    def database(self) -> dict[str, Any]:
        return {
            "ENGINE": "django.db.backends.mysql",
            "NAME": self.database_name,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "USER": "root",
            "PASSWORD": "",
            "CONN_MAX_AGE": None,
        }


class PrivatePostgres(PrivateServer):
    name = "private PostgreSQL"
    vendor = "postgresql"
    application_name = "task_db_fault_matrix_private"

    def __init__(self, directory: Path, port: int | None = None):
        super().__init__(directory, port)
        self.datadir = directory / "data"

    def missing(self) -> str | None:
        for binary in ("initdb", "pg_ctl", "postgres"):
            if not os.access(POSTGRES_BIN / binary, os.X_OK):
                return f"{POSTGRES_BIN / binary} is missing"
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                return "runuser is missing (PostgreSQL refuses to run as root)"
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "no postgres user (PostgreSQL refuses to run as root)"
        return None

    def _run(self, *command: str, timeout: float) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        with open(self.directory / "commands.log", "ab") as log:
            subprocess.run(
                [*prefix, *command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=timeout,
            )

    def initialize(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        self._run(
            str(POSTGRES_BIN / "initdb"),
            "-D",
            str(self.datadir),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
            timeout=120,
        )
        self.start()

    def start(self, timeout: float = START_TIMEOUT) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=100"
        )
        self._run(
            str(POSTGRES_BIN / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.log_path),
            "-o",
            options,
            "-w",
            "-t",
            str(int(timeout)),
            "start",
            timeout=timeout + 10,
        )
        self.wait_until_accepting(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """A fast shutdown: the server terminates its sessions (57P01)."""
        if not (self.datadir / "postmaster.pid").exists():
            return
        self._run(
            str(POSTGRES_BIN / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-m",
            "fast",
            "-w",
            "-t",
            str(int(timeout)),
            "stop",
            timeout=timeout + 10,
        )

    def connect(self, database: str | None = "", **kwargs: Any) -> Any:
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            dbname=database or "postgres",
            autocommit=True,
            connect_timeout=5,
            **kwargs,
        )

    def database(self) -> dict[str, Any]:
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "postgres",
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "USER": "postgres",
            "PASSWORD": "",
            "CONN_MAX_AGE": None,
            "OPTIONS": {"application_name": self.application_name},
        }


def make_private(vendor: str) -> PrivateServer:
    """A private instance, not yet initialized, in a new temporary folder
    (under /tmp: pytest's own is closed to the postgres user)."""
    directory = Path(tempfile.mkdtemp(prefix=f"task_db_private_{vendor}_"))
    cls = PrivateMariaDB if vendor == "mysql" else PrivatePostgres
    return cls(directory)
