"""``python -m tests.benchmarks``: run the benchmarks, print the tables, write
the same figures as JSON. ``--help`` for the options."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PARTS = ("overhead", "celery", "direct", "memory")
BACKENDS = ("default", "mysql", "postgres", "pgpool", "bouncer")
ALIAS_NAMES = {"sqlite": "default"}
ROOT = Path(__file__).resolve().parents[2]
# PostgreSQL's database, unless TASK_DB_POSTGRES_NAME says otherwise: one of
# the benchmark's own, created if missing, so that pg_stat_database counts
# the benchmark's sessions only (the test suite's runs use another).
POSTGRES_DATABASE = "django_task_db_bench"


@dataclasses.dataclass(frozen=True)
class Sizes:
    overhead_batch: int  # boundaries per timed batch
    overhead_repeat: int
    celery_tasks: int
    celery_repeat: int
    direct_tasks: int
    direct_repeat: int
    boundaries: int  # of the memory part


FULL = Sizes(10_000, 15, 2_000, 5, 2_000, 5, 100_000)
QUICK = Sizes(2_000, 5, 300, 1, 300, 2, 5_000)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks",
        description="Benchmarks of django-task-db: boundary overhead, Celery "
        "worker throughput and connections, direct calls, memory.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run, under two minutes on 2 cores: "
        f"{QUICK.celery_tasks} tasks per run, {QUICK.celery_repeat} repetition of "
        f"the celery part, {QUICK.direct_repeat} of the direct part, "
        f"{QUICK.boundaries:,} boundaries in the memory part",
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts to run (default: {','.join(PARTS)})",
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated aliases for the celery and direct parts: "
        "sqlite (or default), mysql, postgres, pgpool, bouncer (PgBouncer in "
        "transaction mode) (default: all)",
    )
    parser.add_argument(
        "--tasks",
        type=int,
        help=f"tasks per run of the celery and direct parts (default "
        f"{FULL.celery_tasks:,}, --quick {QUICK.celery_tasks})",
    )
    parser.add_argument(
        "--repeat", type=int, help="repetitions of every part (default: per part)"
    )
    parser.add_argument(
        "--json",
        default="benchmark-results.json",
        help="where to write the figures (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    args.parts = _choices(parser, "--parts", args.parts, PARTS, {})
    args.backends = _choices(parser, "--backends", args.backends, BACKENDS, ALIAS_NAMES)
    for option in ("tasks", "repeat"):
        value = getattr(args, option)
        if value is not None and value < (2 if option == "tasks" else 1):
            parser.error(f"--{option} {value} is too small")
    return args


def _choices(
    parser: argparse.ArgumentParser,
    option: str,
    value: str,
    allowed: tuple[str, ...],
    aliases: dict[str, str],
) -> list[str]:
    chosen = [aliases.get(v.strip(), v.strip()) for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        parser.error(f"{option}: unknown {', '.join(unknown)} (from {allowed})")
    return [v for v in allowed if v in chosen]


def sizes(args: argparse.Namespace) -> Sizes:
    chosen = QUICK if args.quick else FULL
    if args.tasks is not None:
        chosen = dataclasses.replace(
            chosen, celery_tasks=args.tasks, direct_tasks=args.tasks
        )
    if args.repeat is not None:
        chosen = dataclasses.replace(
            chosen,
            overhead_repeat=args.repeat,
            celery_repeat=args.repeat,
            direct_repeat=args.repeat,
        )
    return chosen


def setup_django() -> None:
    """The test settings, before the test Celery app is created, so that
    Celery installs its Django fixup on it, as in a project."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    os.environ.setdefault("TASK_DB_POSTGRES_NAME", POSTGRES_DATABASE)
    # This process's TASK_DB is set per run; workers get theirs explicitly.
    os.environ.pop("TASK_DB_TEST_SETTINGS", None)
    os.environ.pop("TASK_DB_BOUNCER_DATABASE", None)  # set again if one starts
    import django

    django.setup()


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _redis_version(url: str) -> str:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        try:
            return str(client.info("server")["redis_version"])
        finally:
            client.close()
    except redis.RedisError:
        return ""


def environment(backends: dict[str, Any], redis_url: str) -> dict[str, Any]:
    from django.conf import settings

    import django_task_db

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "django_task_db": f"{django_task_db.__version__} ({_git_revision()})",
        "packages": {
            name: _version(name)
            for name in (
                "Django",
                "celery",
                "kombu",
                "redis",
                "mysqlclient",
                "psycopg",
                "psycopg-pool",
            )
        },
        "postgres_database": os.environ["TASK_DB_POSTGRES_NAME"],
        "mysql_database": settings.MYSQL_DATABASE,
        "servers": {
            **{b.label: b.version or b.skipped for b in backends.values()},
            "Redis": _redis_version(redis_url) or "unreachable",
        },
    }


def header(env: dict[str, Any], chosen: Sizes, quick: bool) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    servers = ", ".join(f"{k} {v}" for k, v in env["servers"].items())
    return "\n".join(
        [
            f"django-task-db benchmarks{' (--quick)' if quick else ''}, {env['date']}",
            f"Machine: {env['cores']} cores ({env['cores_available']} available), "
            f"{env['cpu']}, {env['platform']}",
            f"Python {env['python']}; django-task-db {env['django_task_db']}; "
            f"{packages}",
            f"Servers (loopback): {servers}",
            f"PostgreSQL database: {env['postgres_database']}; MariaDB database: "
            f"{env['mysql_database']}",
            f"Sizes: {chosen}",
            "Ratios compare variants measured in the same repetition, interleaved "
            "(A, B, A, B...); every figure is the median [min-max] of the "
            "repetitions unless said otherwise.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = sizes(args)
    setup_django()

    from tests.benchmarks.backends import probe, probe_redis
    from tests.celery_app import REDIS

    started = time.monotonic()
    probed = {alias: probe(alias) for alias in BACKENDS}
    env = environment(probed, REDIS)
    results: dict[str, Any] = {
        "environment": env,
        "arguments": {**vars(args), "quick": args.quick},
        "sizes": dataclasses.asdict(chosen),
    }
    print(header(env, chosen, args.quick), flush=True)
    selected = [probed[alias] for alias in args.backends]

    failed = []
    for part in args.parts:
        part_started = time.monotonic()
        try:
            figures, text = run_part(part, chosen, selected, REDIS)
        except Exception as exc:  # report it, go on with the other parts
            traceback.print_exc()
            failed.append(part)
            figures = {"error": f"{type(exc).__name__}: {exc}"}
            text = f"{part}: FAILED: {figures['error']}\n"
        figures["seconds"] = round(time.monotonic() - part_started, 1)
        results[part] = figures
        print(text, flush=True)

    results["seconds"] = round(time.monotonic() - started, 1)
    for backend in probed.values():
        if backend.skipped and backend.detail:
            print(f"{backend.label}: {backend.detail}")
    path = Path(args.json)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"Finished in {results['seconds']:.0f} s; figures written to {path}.")
    # As the test suite: with TASK_DB_REQUIRE_SERVICES=1 (CI), a server that
    # does not answer is a failure, not a skip.
    missing = [b.label for b in selected if b.skipped and b.detail]
    if "celery" in args.parts and probe_redis(REDIS):
        missing.append("Redis")
    if missing and os.environ.get("TASK_DB_REQUIRE_SERVICES") == "1":
        print(f"Unreachable, with TASK_DB_REQUIRE_SERVICES=1: {', '.join(missing)}.")
        failed.append("services")
    if failed:
        print(f"Failed: {', '.join(failed)}.")
    return 1 if failed else 0


def run_part(
    part: str, chosen: Sizes, selected: list[Any], redis: str
) -> tuple[dict[str, Any], str]:
    """Run one part: its figures, and its table."""
    if part == "overhead":
        from tests.benchmarks import overhead

        figures = overhead.run(chosen.overhead_batch, chosen.overhead_repeat)
        return figures, overhead.render(figures)
    if part == "celery":
        from tests.benchmarks import throughput
        from tests.benchmarks.backends import probe_redis

        redis_error = probe_redis(redis)
        servers = [b for b in selected if b.alias in ("mysql", "postgres", "bouncer")]
        if redis_error:
            servers = [
                b
                if b.skipped
                else dataclasses.replace(
                    b, skipped="skipped: Redis unreachable", detail=redis_error
                )
                for b in servers
            ]
        figures = throughput.run(
            servers, chosen.celery_tasks, chosen.celery_repeat, redis
        )
        return figures, throughput.render(figures)
    if part == "direct":
        from tests.benchmarks import direct

        figures = direct.run(selected, chosen.direct_tasks, chosen.direct_repeat)
        return figures, direct.render(figures)
    from tests.benchmarks import memory

    figures = memory.run(chosen.boundaries)
    return figures, memory.render(figures)


if __name__ == "__main__":
    sys.exit(main())
