"""The examples and the README's commands, run as a user would."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "consumer.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_consumer_reports_reuse_and_totals():
    """The consumer demo reuses its connection, reopens after each failed
    message, and closes everything at the end."""
    result = run_example()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    usage = [
        m.group(1) for line in lines if (m := re.search(r"connection (\w+)", line))
    ]
    assert usage == ["opened", "reused", "reused", "reused", "opened"] + [
        "reused",
        "reused",
        "reused",
        "opened",
        "reused",
    ]
    assert "message 4 (order-4): failed" in result.stdout
    assert "then closed (failure)" in lines[4]
    assert lines[-2] == "worker stopping: closed (worker_stopping)"
    assert lines[-1] == "connections: opened 3, closed 3, left open 0"


def test_consumer_close_all_opens_one_connection_per_message():
    """Under close_all the demo opens and closes one connection per message."""
    result = run_example(
        "--strategy", "close_all", "--messages", "3", "--fail-every", "0"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("connection opened, then closed (close_all)") == 3
    assert (
        result.stdout.splitlines()[-1] == "connections: opened 3, closed 3, left open 0"
    )


def test_consumer_rejects_a_bad_strategy_at_startup():
    """A bad TASK_DB stops the demo at startup, through the system checks."""
    result = run_example("--strategy", "close_some", "--messages", "1")
    assert result.returncode == 1
    assert "django_task_db.E003" in result.stderr
    assert "'close_some'" in result.stderr
    assert "message 1" not in result.stdout


def test_ci_runs_the_readme_test_command():
    """.ci/run is README.rst's test command, with every server required."""
    readme = (ROOT / "README.rst").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "\n    scripts/run-tests\n" in readme
    assert "\n    scripts/run-consumer\n" in readme
    assert "exec scripts/run-tests" in ci
    assert "export TASK_DB_REQUIRE_SERVICES=1" in ci


def test_the_first_command_runs_the_consumer_from_a_copy(tmp_path: Path) -> None:
    """README.rst's first command, in a copy of the repository's files with
    no virtualenv: it makes one, installs the package alone, and runs the
    consumer to its summary."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    copy = tmp_path / "django-task-db"
    for name in files:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        ["scripts/run-consumer", "--messages", "2", "--fail-every", "0"],
        cwd=copy,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == (
        "connections: opened 1, closed 1, left open 0"
    )
    freeze = subprocess.run(
        [str(copy / ".venv" / "bin" / "python"), "-m", "pip", "freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = {line.partition("==")[0].lower() for line in freeze.splitlines()}
    assert "django" in installed
    # The package alone: none of the extras' distributions.
    assert not installed & {"celery", "mysqlclient", "psycopg", "pytest"}
