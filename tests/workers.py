"""Real Celery worker subprocesses for the tests, and the hooks they can load.

``Worker`` starts ``celery worker --pool=prefork`` on the test Celery app
(tests/celery_app.py) in its own session (process group), with its own queue
and node name, its TASK_DB passed as JSON through TASK_DB_TEST_SETTINGS, and
its output in a log file. ``sending_app`` points the test process's Celery app
at the same Redis database, so that the test sends the tasks and reads their
results.

Imported by a worker (``--include tests.workers``) with TASK_DB_WORKER_HOOKS
set, this module also installs hooks in that worker: the main process opens a
connection on each alias of TASK_DB_HOOK_ALIASES at worker_init, before the
pool forks its children, and answers the remote control command
``task_db_parent_sessions`` with the server's id of those same connections;
every pool child reports, at worker_process_shutdown, which connections and
which connection pools of Django's PostgreSQL backend it still has open. What
the hooks see is written to the file named by TASK_DB_WORKER_HOOKS, one JSON
object per line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from tests.names import REDIS_DB_WORKERS

ROOT = Path(__file__).resolve().parent.parent
REDIS_DB = REDIS_DB_WORKERS  # these workers' broker and results, no one else's
START_TIMEOUT = 60
STOP_TIMEOUT = 30
HOOKS_ENV = "TASK_DB_WORKER_HOOKS"
HOOK_ALIASES_ENV = "TASK_DB_HOOK_ALIASES"


# The test process's side.


def _forget_connections(app: Any) -> None:
    """Drop the app's cached broker pool and result backend, so that the next
    use reads broker_url and result_backend again."""
    app._pool = None
    app.amqp._producer_pool = None
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)


@contextmanager
def sending_app(redis_url: str, queue: str, redis_db: int = REDIS_DB) -> Iterator[Any]:
    """The test Celery app, sending to Redis database ``redis_db`` and
    ``queue``, and reading results there; its configuration is restored after."""
    from tests.celery_app import app

    keys = ("broker_url", "result_backend", "task_default_queue")
    saved = {key: app.conf[key] for key in keys}
    _forget_connections(app)
    app.conf.update(
        broker_url=f"{redis_url}/{redis_db}",
        result_backend=f"{redis_url}/{redis_db}",
        task_default_queue=queue,
    )
    try:
        yield app
    finally:
        _forget_connections(app)
        app.conf.update(saved)


def process_group(pgid: int) -> dict[int, str]:
    """The processes of process group ``pgid``: {pid: state letter}."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                stat = file.read()
        except OSError:  # gone meanwhile
            continue
        # The command name, in parentheses, may hold spaces: split after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            found[int(entry)] = fields[0]
    return found


def local_ports(pid: int) -> set[int]:
    from tests.servers import local_ports as ports_of

    try:
        return ports_of(pid)
    except OSError:  # the process is gone
        return set()


class Worker:
    """One ``celery worker`` subprocess (``--pool=prefork`` unless told)."""

    def __init__(
        self,
        app: Any,
        queue: str,
        log_path: Path,
        task_db: dict[str, Any],
        concurrency: int = 2,
        pool: str = "prefork",
        hooks: Path | None = None,
        hook_aliases: tuple[str, ...] = (),
        root: Path = ROOT,
        env: dict[str, str] | None = None,
    ):
        self.app = app
        self.queue = queue
        self.log_path = log_path
        self.task_db = task_db
        self.concurrency = concurrency
        self.pool = pool
        self.hooks = hooks
        self.hook_aliases = hook_aliases
        self.root = root
        self.env = env or {}
        self.node = f"task_db_{uuid.uuid4().hex[:10]}@{socket.gethostname()}"
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<Worker {self.node} TASK_DB={self.task_db}>"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.celery_app",
            "worker",
            f"--pool={self.pool}",
            "-c",
            str(self.concurrency),
            "-Q",
            self.queue,
            "-n",
            self.node,
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "info",
        ]
        if self.hooks is not None:
            command += ["--include", "tests.workers"]
        return command

    def environment(self) -> dict[str, str]:
        from tests.celery_app import REDIS

        env = {
            key: value
            for key, value in os.environ.items()
            if key not in (HOOKS_ENV, HOOK_ALIASES_ENV)
        }
        env.update(
            DJANGO_SETTINGS_MODULE="tests.settings",
            TASK_DB_TEST_SETTINGS=json.dumps(self.task_db),
            TASK_DB_CELERY_QUEUE=self.queue,
            TASK_DB_REDIS_URL=REDIS,
            TASK_DB_WORKER_REDIS_DB=str(REDIS_DB),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env)
        # The worker imports this checkout's package and tests, whatever
        # the test process imported them from.
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.root)] + [p for p in [env.get("PYTHONPATH")] if p]
        )
        if self.hooks is not None:
            env[HOOKS_ENV] = str(self.hooks)
            env[HOOK_ALIASES_ENV] = ",".join(self.hook_aliases)
        return env

    def start(self, timeout: float = START_TIMEOUT) -> Worker:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.root,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll the worker with ``ping`` until it answers."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self} exited with {self.process.returncode} before it "
                    f"was ready:\n{self.log()}"
                )
            replies = self.app.control.ping(destination=[self.node], timeout=0.5)
            if any(self.node in reply for reply in replies):
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self} did not answer ping in {timeout}s:\n{self.log()}"
                )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"

    def send(self, task: Any, *args: Any) -> Any:
        """Send ``task(*args)`` to this worker's queue; its AsyncResult."""
        return task.apply_async(args, queue=self.queue)

    def run(self, task: Any, *args: Any, timeout: float = 60) -> Any:
        """Run ``task(*args)`` on the worker and return its result."""
        return self.send(task, *args).get(timeout=timeout)

    def run_many(
        self, task: Any, *args: Any, count: int, timeout: float = 120
    ) -> list[Any]:
        """Send ``count`` tasks at once, then collect their results in order."""
        results = [self.send(task, *args) for _ in range(count)]
        deadline = time.monotonic() + timeout
        return [
            result.get(timeout=max(deadline - time.monotonic(), 0.1))
            for result in results
        ]

    def processes(self) -> dict[int, str]:
        """The worker's processes (its process group): {pid: state}."""
        return process_group(self.pid)

    def sessions(self, server: Any) -> set[int]:
        """The server sessions whose client end is a socket of this worker."""
        from tests.servers import Sessions

        sampler = Sessions(server)
        try:
            rows = sampler.rows()
        finally:
            sampler.close()
        ports: set[int] = set()
        for pid, state in self.processes().items():
            if state != "Z":
                ports |= local_ports(pid)
        return {sid for sid, port in rows if port in ports}

    def stop(self, timeout: float = STOP_TIMEOUT) -> dict[str, Any]:
        """SIGTERM the main process and wait for it; SIGKILL the whole group
        if it hangs. Return how it went: exit code, whether SIGKILL was needed,
        the group's processes still running (zombies apart) and zombies."""
        if self.stopped is not None:
            return self.stopped
        assert self.process is not None
        process = self.process
        killed = False
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                killed = True
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout)
        # The pool's children die with the main process (they ask for
        # SIGKILL when their parent dies): wait until the group is empty.
        deadline = time.monotonic() + timeout
        while True:
            group = self.processes()
            running = {pid: s for pid, s in group.items() if s != "Z"}
            if not running or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if running:
            killed = True
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        self.forget_queue()
        self.stopped = {
            "returncode": process.returncode,
            "killed": killed,
            "left_running": sorted(running),
            "zombies": sorted(pid for pid, s in group.items() if s == "Z"),
        }
        return self.stopped

    def forget_queue(self) -> None:
        """Delete what the worker's queue left in Redis (its bindings)."""
        import redis

        from tests.celery_app import REDIS

        client = redis.Redis.from_url(f"{REDIS}/{REDIS_DB}")
        try:
            client.delete(
                self.queue,
                f"_kombu.binding.{self.queue}",
                f"_kombu.binding_permanent.{self.queue}",
            )
        finally:
            client.close()


def unique_queue(label: str) -> str:
    return f"task_db_{label}_{uuid.uuid4().hex[:10]}"


def read_hooks(path: Path) -> list[dict[str, Any]]:
    """What the hooks of a worker wrote, one dict per event."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def wait_for_hook(
    path: Path, event: str, count: int = 1, timeout: float = 30
) -> list[dict[str, Any]]:
    """Poll the hooks file until ``count`` records of ``event`` are there."""
    deadline = time.monotonic() + timeout
    while True:
        records = [r for r in read_hooks(path) if r["event"] == event]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


# The worker's side: hooks installed when a worker imports this module.


def _record(event: str, **data: Any) -> None:
    line = json.dumps(
        {
            "event": event,
            "pid": os.getpid(),
            "thread": threading.get_ident(),
            **data,
        }
    )
    # One write of one short line, in append mode: lines of concurrent
    # processes do not interleave.
    fd = os.open(os.environ[HOOKS_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _hook_aliases() -> list[str]:
    return [a for a in os.environ.get(HOOK_ALIASES_ENV, "").split(",") if a]


def _parent_sessions() -> dict[str, Any]:
    """The server's session id of each hook alias's connection in this
    thread, or the error that querying it raised."""
    from django.db import connections

    from tests.celery_app import _session_id

    sessions: dict[str, Any] = {}
    for alias in _hook_aliases():
        try:
            sessions[alias] = {
                "session": _session_id(alias),
                "opened": connections[alias].connection is not None,
            }
        except Exception as exc:
            sessions[alias] = {"error": f"{type(exc).__name__}: {exc}"}
    return sessions


def _on_worker_init(**kwargs: Any) -> None:
    _record("worker_init", sessions=_parent_sessions())


def _on_worker_ready(**kwargs: Any) -> None:
    _record("worker_ready", sessions=_parent_sessions())


def _on_worker_process_shutdown(**kwargs: Any) -> None:
    """Connected after the bridge's receiver: what it left open."""
    from django.db import connections

    pools = set()
    for connection in connections.all():
        registry = getattr(type(connection), "_connection_pools", None) or {}
        pools |= set(registry)
    opened = [
        c.alias
        for c in connections.all(initialized_only=True)
        if c.connection is not None
    ]
    _record("worker_process_shutdown", pools=sorted(pools), open=sorted(opened))


def _install_hooks() -> None:
    from celery import signals
    from celery.worker.control import control_command

    signals.worker_init.connect(_on_worker_init, weak=False)
    signals.worker_ready.connect(_on_worker_ready, weak=False)
    signals.worker_process_shutdown.connect(_on_worker_process_shutdown, weak=False)

    @control_command()
    def task_db_parent_sessions(state: Any) -> dict[str, Any]:
        """The main process's connections of the hook aliases, queried now."""
        return {
            "pid": os.getpid(),
            "thread": threading.get_ident(),
            "sessions": _parent_sessions(),
        }


if os.environ.get(HOOKS_ENV):
    _install_hooks()
