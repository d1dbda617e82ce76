"""examples/metrics.py, run as a user would, read with prometheus-client's
own parser; and README.rst's collector, which is the example's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


def scrape(*args: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Run the example; its exposition as {(sample name, labels): value}."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "metrics.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(result.stdout)
        for sample in family.samples
    }


def test_example_exports_the_counts_of_its_units():
    """Six units (the 4th fails, the 6th uses close_all): the exposition has
    the exact counts."""
    default = (("alias", "default"),)
    assert scrape() == {
        ("django_task_db_units_total", ()): 6,
        ("django_task_db_failed_units_total", ()): 1,
        ("django_task_db_connections_reused_total", ()): 3,
        ("django_task_db_skipped_total", ()): 0,
        ("django_task_db_connections_opened_total", default): 3,
        (
            "django_task_db_connections_closed_total",
            (("alias", "default"), ("reason", "close_all")),
        ): 2,
        (
            "django_task_db_connections_closed_total",
            (("alias", "default"), ("reason", "failure")),
        ): 1,
        ("django_task_db_queries_cancelled_total", default): 0,
    }


def test_example_counts_follow_its_units():
    """Ten units: four more units, four more reuses."""
    samples = scrape("--units", "10")
    assert samples[("django_task_db_units_total", ())] == 10
    assert samples[("django_task_db_connections_reused_total", ())] == 7


def test_readme_collector_is_the_examples():
    """README.rst's Metrics section shows the example's collector, line for line."""
    readme = (ROOT / "README.rst").read_text()
    section = readme.split("\nMetrics\n=======\n", 1)[1]
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", section)
    shown = [
        line.removeprefix("    ")
        for block in blocks
        if "class TaskDbCollector" in block
        for line in block.splitlines()
    ]
    example = (ROOT / "examples" / "metrics.py").read_text().splitlines()
    start = example.index("class TaskDbCollector:")
    end = example.index("def configure(database: Path) -> None:")
    collector = "\n".join(example[start:end]).strip().splitlines()
    assert "\n".join(collector) in "\n".join(shown)
