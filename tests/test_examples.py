"""The examples and the README's commands, run as a user would."""

from __future__ import annotations

import os
import re
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


def test_ci_runs_the_readme_commands():
    """.ci/run installs and tests with exactly the commands README.rst gives."""
    readme = (ROOT / "README.rst").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in ('python -m pip install -e ".[test]"', "python -m pytest"):
        assert f"    {command}\n" in readme
        assert command in ci
    apt = "apt-get install -y build-essential libmariadb-dev pkg-config"
    assert apt in readme
    assert any(apt in line for line in ci)
    assert "export TASK_DB_REQUIRE_SERVICES=1" in ci
