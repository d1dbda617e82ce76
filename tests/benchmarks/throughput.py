"""Part 2: a stream of small tasks through a real Celery worker, Redis broker.

Each task runs one query (tests/benchmarks/worker.py: ``unit``). For each
server, pool and setup, N tasks are queued first, then the worker consumes
them:

- solo pool: a worker in this process (celery.contrib.testing), started
  once the queue is full, under ``override_settings(TASK_DB=...)``, and
  stopped warmly (``worker_shutdown`` is sent) after each run;
- prefork -c 2: ``celery worker`` subprocesses (tests/workers.py), one per
  setup, started together for each repetition on an idle queue of their own;
  each is then told to consume its full queue (``add_consumer``) in turn.

tasks/s is (N - 1) / (the last task's end - the first task's end), stamped
by the worker: sending and starting are left out. Sessions seen: distinct
server session ids the tasks ran on. Server delta: connections the server
accepted meanwhile: MariaDB's ``Connections`` counts every client of the
server; PostgreSQL's ``pg_stat_database.sessions`` those of the benchmark's
own database.
"""

from __future__ import annotations

import gc
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import signals as celery_signals
from django.test import override_settings

from tests.benchmarks import worker as bench_worker
from tests.benchmarks.backends import Backend, ConnectionCounter
from tests.benchmarks.stats import (
    progress,
    ratios,
    repetitions,
    section,
    stats,
    table,
)
from tests.names import REDIS_DB_BENCHMARK
from tests.workers import START_TIMEOUT, STOP_TIMEOUT, Worker, unique_queue

REDIS_DB = REDIS_DB_BENCHMARK  # the benchmark's own broker and result database
POOLS = ("solo", "prefork")
POOL_LABELS = {"solo": "solo, in-process", "prefork": "prefork -c 2"}
CONCURRENCY = {"solo": 1, "prefork": 2}
RUN_TIMEOUT = 600.0


@dataclass(frozen=True)
class Setup:
    name: str
    label: str
    task_db: tuple[tuple[str, Any], ...]
    no_fixup: bool = False  # disconnect the database handlers of Celery's fixup
    reuses: bool = False  # one session per worker process is expected

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.task_db)


SETUPS = (
    Setup(
        "close_old",
        "close_old (fixup replaced)",
        (("STRATEGY", "close_old"),),
        reuses=True,
    ),
    Setup("close_all", "close_all (fixup replaced)", (("STRATEGY", "close_all"),)),
    Setup("celery_fixup", "Celery's fixup alone", (("CELERY", False),)),
    Setup(
        "none",
        "no management",
        (("CELERY", False),),
        no_fixup=True,
        reuses=True,
    ),
)
BY_NAME = {setup.name: setup for setup in SETUPS}


@dataclass(frozen=True)
class Sample:
    tasks_per_s: float
    sessions: int
    server_delta: int | None


def _send(app: Any, queue: str, alias: str, count: int) -> list[Any]:
    task = app.tasks[bench_worker.UNIT_TASK]
    return [task.apply_async((alias,), queue=queue) for _ in range(count)]


def _collect(results: Sequence[Any]) -> list[tuple[int, float]]:
    deadline = time.monotonic() + RUN_TIMEOUT
    return [
        tuple(r.get(timeout=max(deadline - time.monotonic(), 0.1))) for r in results
    ]


def _forget(app: Any, results: Sequence[Any], *queues: str) -> None:
    """Delete the run's results and queues from Redis."""
    backend = app.backend
    keys = [backend.get_key_for_task(r.id) for r in results]
    keys += [
        key
        for queue in queues
        for key in (
            queue,
            f"_kombu.binding.{queue}",
            f"_kombu.binding_permanent.{queue}",
        )
    ]
    backend.client.delete(*keys)


def _sample(
    values: Sequence[tuple[int, float]], before: int | None, after: int | None
) -> Sample:
    ends = [end for _, end in values]
    return Sample(
        tasks_per_s=(len(values) - 1) / (max(ends) - min(ends)),
        sessions=len({session for session, _ in values}),
        server_delta=None if before is None or after is None else after - before,
    )


# The solo pool, in this process.


@contextmanager
def _fixup_disabled(disabled: bool) -> Iterator[None]:
    if not disabled:
        yield
        return
    celery_signals.worker_init.connect(bench_worker.without_fixup, weak=False)
    try:
        yield
    finally:
        celery_signals.worker_init.disconnect(bench_worker.without_fixup)


@contextmanager
def _inprocess_worker(app: Any, queue: str) -> Iterator[Any]:
    """A solo worker in a thread of this process, stopped as on SIGTERM: a warm
    shutdown, which sends worker_shutdown (start_worker alone stops it cold)."""
    from celery.contrib.testing.worker import start_worker
    from celery.worker import state as worker_state

    stopped = threading.Event()

    def on_shutdown(sender: Any = None, **kwargs: Any) -> None:
        stopped.set()

    celery_signals.worker_shutdown.connect(on_shutdown, weak=False)
    try:
        with start_worker(
            app,
            pool="solo",
            concurrency=1,
            perform_ping_check=False,
            queues=[queue],
            shutdown_timeout=STOP_TIMEOUT,
        ) as worker:
            try:
                yield worker
            finally:
                worker_state.should_stop = 0
                stopped.wait(STOP_TIMEOUT)
    finally:
        worker_state.should_stop = None
        celery_signals.worker_shutdown.disconnect(on_shutdown)


def _run_solo(
    app: Any, setup: Setup, alias: str, tasks: int, counter: ConnectionCounter
) -> Sample:
    queue = unique_queue("bench_solo")
    results = _send(app, queue, alias, tasks)
    before = counter.read()
    with (
        override_settings(TASK_DB=setup.settings),
        _fixup_disabled(setup.no_fixup),
        _inprocess_worker(app, queue),
    ):
        values = _collect(results)
    # The worker thread's connections (of "no management") go with it.
    gc.collect()
    after = counter.settled()
    _forget(app, results, queue)
    return _sample(values, before, after)


# The prefork pool, in subprocesses.


class BenchWorker(Worker):
    """A ``celery worker`` subprocess that imports tests.benchmarks.worker,
    logs warnings only, uses the benchmark's Redis database, and consumes an
    idle queue until told to consume ``work_queue``."""

    def __init__(self, app: Any, setup: Setup, log_dir: Path):
        super().__init__(
            app,
            unique_queue("bench_idle"),
            log_dir / f"{setup.name}-{uuid.uuid4().hex[:8]}.log",
            setup.settings,
            concurrency=CONCURRENCY["prefork"],
            pool="prefork",
        )
        self.setup = setup
        self.work_queue = unique_queue("bench_work")

    def command(self) -> list[str]:
        command = super().command()
        command[command.index("-l") + 1] = "warning"
        return [*command, "--include", "tests.benchmarks.worker"]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["TASK_DB_WORKER_REDIS_DB"] = str(REDIS_DB)
        env.pop(bench_worker.NO_FIXUP_ENV, None)
        if self.setup.no_fixup:
            env[bench_worker.NO_FIXUP_ENV] = "1"
        return env

    def launch(self) -> None:
        """Start the subprocess, without waiting for it (Worker.start waits)."""
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

    def forget_queue(self) -> None:
        import redis

        from tests.celery_app import REDIS

        client = redis.Redis.from_url(f"{REDIS}/{REDIS_DB}")
        try:
            for queue in (self.queue, self.work_queue):
                client.delete(
                    queue,
                    f"_kombu.binding.{queue}",
                    f"_kombu.binding_permanent.{queue}",
                )
        finally:
            client.close()


@contextmanager
def _prefork_workers(app: Any, log_dir: Path) -> Iterator[dict[str, BenchWorker]]:
    """One worker per setup, started together and stopped together."""
    workers = {setup.name: BenchWorker(app, setup, log_dir) for setup in SETUPS}
    try:
        for worker in workers.values():
            worker.launch()
        for worker in workers.values():
            worker.wait_ready(START_TIMEOUT)
        yield workers
    finally:
        launched = [w for w in workers.values() if w.process is not None]
        for worker in launched:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in launched:
            with suppress(subprocess.TimeoutExpired):
                assert worker.process is not None
                worker.process.wait(STOP_TIMEOUT)
            worker.stop()


def _run_prefork(
    app: Any,
    worker: BenchWorker,
    alias: str,
    tasks: int,
    counter: ConnectionCounter,
) -> Sample:
    results = _send(app, worker.work_queue, alias, tasks)
    before = counter.read()
    replies = app.control.add_consumer(
        worker.work_queue, destination=[worker.node], reply=True, timeout=10
    )
    if not any(worker.node in reply for reply in replies):
        raise RuntimeError(f"{worker} did not answer add_consumer:\n{worker.log()}")
    values = _collect(results)
    after = counter.settled()
    _forget(app, results)
    return _sample(values, before, after)


# The part.


def _measure_group(
    app: Any, backend: Backend, pool: str, tasks: int, repeat: int, log_dir: Path
) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {setup.name: [] for setup in SETUPS}
    counter = ConnectionCounter(backend.alias)
    try:
        for index in range(repeat):
            progress(f"celery {backend.label} {pool} repetition {index + 1}/{repeat}")
            if pool == "solo":
                for setup in SETUPS:
                    samples[setup.name].append(
                        _run_solo(app, setup, backend.alias, tasks, counter)
                    )
                continue
            with _prefork_workers(app, log_dir) as workers:
                for setup in SETUPS:
                    samples[setup.name].append(
                        _run_prefork(
                            app, workers[setup.name], backend.alias, tasks, counter
                        )
                    )
    finally:
        counter.close()
    return samples


def _summary(
    samples: dict[str, list[Sample]], tasks: int, concurrency: int, pooled: bool
) -> tuple[dict[str, Any], list[str]]:
    """``pooled``: behind PgBouncer, whose server sessions every setup shares
    (at most one per worker process at a time)."""
    reference = [s.tasks_per_s for s in samples["none"]]
    figures: dict[str, Any] = {}
    notes = []
    for setup in SETUPS:
        runs = samples[setup.name]
        deltas = [s.server_delta for s in runs]
        figures[setup.name] = {
            "label": setup.label,
            "tasks_per_s": stats([s.tasks_per_s for s in runs]).to_json(),
            "vs_none": ratios([s.tasks_per_s for s in runs], reference).to_json(),
            "sessions": stats([s.sessions for s in runs]).to_json(),
            "server_delta": None
            if None in deltas
            else stats([d for d in deltas if d is not None]).to_json(),
        }
        sessions = {s.sessions for s in runs}
        expected = (
            range(1, concurrency + 1)
            if setup.reuses or pooled
            else range(tasks, tasks + 1)
        )
        if not sessions <= set(expected):
            notes.append(
                f"unexpected: {setup.label} ran on {sorted(sessions)} sessions "
                f"(expected {expected.start}..{expected.stop - 1})"
            )
    return figures, notes


def run(
    backends: Sequence[Backend], tasks: int, repeat: int, redis: str
) -> dict[str, Any]:
    results: dict[str, Any] = {"tasks": tasks, "repeat": repeat, "groups": []}
    groups: list[dict[str, Any]] = results["groups"]
    log_dir = Path(tempfile.mkdtemp(prefix="task_db_bench_"))
    try:
        _run_groups(groups, backends, tasks, repeat, redis, log_dir)
    except BaseException:
        progress(f"the workers' logs are kept in {log_dir}")
        raise
    shutil.rmtree(log_dir, ignore_errors=True)
    return results


def _run_groups(
    groups: list[dict[str, Any]],
    backends: Sequence[Backend],
    tasks: int,
    repeat: int,
    redis: str,
    log_dir: Path,
) -> None:
    from tests.workers import sending_app

    with sending_app(redis, unique_queue("bench_default"), REDIS_DB) as app:
        for backend in backends:
            for pool in POOLS:
                group: dict[str, Any] = {
                    "backend": backend.label,
                    "alias": backend.alias,
                    "pool": POOL_LABELS[pool],
                }
                groups.append(group)
                if backend.skipped:
                    group["skipped"] = backend.skipped
                    group["notes"] = [backend.detail] if backend.detail else []
                    continue
                samples = _measure_group(app, backend, pool, tasks, repeat, log_dir)
                group["variants"], group["notes"] = _summary(
                    samples, tasks, CONCURRENCY[pool], pooled=backend.alias == "bouncer"
                )


def _fmt(figure: dict[str, Any] | None, digits: int = 0) -> str:
    return "n/a" if figure is None else stats(figure["values"]).format(digits)


def render(results: dict[str, Any]) -> str:
    rows = []
    notes = []
    for group in results["groups"]:
        head = [group["backend"], group["pool"]]
        notes += [f"{group['backend']}, {group['pool']}: {n}" for n in group["notes"]]
        if "skipped" in group:
            rows.append([*head, group["skipped"], "", "", "", ""])
            continue
        for figures in group["variants"].values():
            rows.append(
                [
                    *head,
                    figures["label"],
                    _fmt(figures["tasks_per_s"]),
                    _fmt(figures["vs_none"], 2),
                    _fmt(figures["sessions"]),
                    _fmt(figures["server_delta"]),
                ]
            )
    lines = [
        f"{results['tasks']:,} tasks of one query each, queued before the worker "
        f"consumes them; median [min-max] of {repetitions(results['repeat'])}.",
        "Absolute: tasks/s, sessions seen, server delta. Ratio: tasks/s / "
        "tasks/s of 'no management' in the same repetition.",
        "",
        table(
            [
                "server",
                "pool",
                "setup",
                "tasks/s",
                "x no management",
                "sessions seen",
                "server delta",
            ],
            rows,
        ),
    ]
    if notes:
        lines += ["", *notes]
    return section("2. Task throughput through a Celery worker (Redis broker)", lines)
