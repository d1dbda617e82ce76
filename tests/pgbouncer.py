"""A private PgBouncer in front of the suite's PostgreSQL server.

Each instance has its own folder (configuration, auth file, log) and its
own port on 127.0.0.1, and pools the suite's PostgreSQL database under the
name ``bouncer``: its server connections carry the client's
application_name, so pg_stat_activity counts them. PgBouncer refuses to run
as root: as root, it is started with ``-u postgres``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from django.conf import settings

from tests.private_servers import free_port

PGBOUNCER = os.environ.get("TASK_DB_PGBOUNCER", "/usr/sbin/pgbouncer")
DATABASE = "bouncer"


def missing() -> str | None:
    """Why no PgBouncer can run here, or None."""
    if not os.access(PGBOUNCER, os.X_OK):
        return f"{PGBOUNCER} is missing (Debian's pgbouncer package)"
    return None


class PgBouncer:
    def __init__(self, pool_mode: str, admin: bool = True):
        """``admin``: whether the suite's PostgreSQL user may use the admin
        console (admin_users)."""
        self.pool_mode = pool_mode
        self.admin_users = settings.DATABASES["postgres"]["USER"] if admin else "nobody"
        self.port = free_port()
        self.directory = Path(
            tempfile.mkdtemp(prefix=f"task_db_pgbouncer_{pool_mode}_")
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.upstream = settings.DATABASES["postgres"]

    def __repr__(self) -> str:
        return f"<PgBouncer {self.pool_mode} 127.0.0.1:{self.port}>"

    def _write_files(self) -> None:
        up = self.upstream
        (self.directory / "userlist.txt").write_text(
            f'"{up["USER"]}" "{up["PASSWORD"]}"\n'
        )
        (self.directory / "pgbouncer.ini").write_text(
            f"""[databases]
{DATABASE} = host={up["HOST"]} port={up["PORT"]} dbname={up["NAME"]}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.directory}/userlist.txt
admin_users = {self.admin_users}
pool_mode = {self.pool_mode}
default_pool_size = 20
max_client_conn = 500
ignore_startup_parameters = extra_float_digits
logfile = {self.directory}/pgbouncer.log
pidfile = {self.directory}/pgbouncer.pid
"""
        )
        if os.geteuid() == 0:
            for path in (self.directory, *self.directory.iterdir()):
                shutil.chown(path, "postgres", "postgres")

    def start(self, timeout: float = 30) -> None:
        self._write_files()
        user = ["-u", "postgres"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen(
            [PGBOUNCER, *user, str(self.directory / "pgbouncer.ini")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect().close()
                return
            except Exception:  # the driver's connect error, whichever it is
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self} did not start:\n{self.log()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: immediate shutdown
            self.process.wait(timeout=30)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self.directory / "pgbouncer.log").read_text()[-5000:]
        except OSError as exc:
            return f"(no log: {exc})"

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Rows of a command of PgBouncer's admin console (SHOW POOLS, ...)."""
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            dbname="pgbouncer",
            user=self.upstream["USER"],
            password=self.upstream["PASSWORD"],
            autocommit=True,
            connect_timeout=5,
            row_factory=dict_row,
        ) as conn:
            cursor = conn.execute(command)
            return cursor.fetchall() if cursor.description else []

    def connect(self) -> Any:
        """A driver connection through PgBouncer to the pooled database."""
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            dbname=DATABASE,
            user=self.upstream["USER"],
            password=self.upstream["PASSWORD"],
            autocommit=True,
            connect_timeout=5,
            prepare_threshold=None,
        )

    def clients(self) -> int:
        """Client connections to the pooled database (SHOW CLIENTS)."""
        return sum(
            1 for row in self.admin("SHOW CLIENTS") if row["database"] == DATABASE
        )

    def database(self, application_name: str, **extra: Any) -> dict[str, Any]:
        """A DATABASES entry that connects through this PgBouncer."""
        return {
            **self.upstream,
            "PORT": str(self.port),
            "NAME": DATABASE,
            "CONN_MAX_AGE": None,
            "DISABLE_SERVER_SIDE_CURSORS": self.pool_mode == "transaction",
            "OPTIONS": {"application_name": application_name},
            **extra,
        }
