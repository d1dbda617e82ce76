"""Part 1: what one task boundary costs, in nanoseconds.

A boundary is one ``task_started`` + ``task_finished`` pair, sent as a runner
sends them, with one initialized connection (SQLite, alias "default") and
nothing to close:

- ``close_old`` and ``keep`` find the connection open, and leave it open;
- ``close_all`` finds it closed (an initialized wrapper whose connection is
  None), so the connect cost is left out: nothing is connected nor closed;
- ``task_scope`` is ``with task_scope(): pass`` with the default settings
  (close_old), the connection open;
- the floor is two sends (one per phase) of a bare ``django.dispatch.Signal``
  with one no-op receiver;
- Celery's fixup is ``DjangoWorkerFixup.on_task_prerun`` + ``on_task_postrun``
  called on the same connection, closed as for ``close_all``: the fixup
  closes it at its first boundary, and reopening it is connect cost.

Each variant runs with 1, 5 and 500 aliases configured (1 initialized): the
cost must not grow with aliases that are never used.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from django.db import connections
from django.dispatch import Signal
from django.test import override_settings

from django_task_db import signals, task_scope
from tests.benchmarks.stats import (
    interleave,
    ratios,
    repetitions,
    section,
    stats,
    table,
)

STRATEGIES = ("close_old", "close_all", "keep")
REFERENCES = ("floor", "celery_fixup")
MEASURED = (*REFERENCES, *STRATEGIES, "task_scope")
ALIAS_COUNTS = (1, 5, 500)
LABELS = {
    "floor": "floor: 2 x Signal.send, no-op receiver",
    "celery_fixup": "Celery's DjangoWorkerFixup prerun+postrun",
    "close_old": "close_old (connection open)",
    "close_all": "close_all (connection closed)",
    "keep": "keep (connection open)",
    "task_scope": "with task_scope(): pass (close_old, open)",
}
CONNECTION_OPEN = {"close_old": True, "keep": True, "task_scope": True}
WARMUP = 200


@dataclass(frozen=True)
class Variant:
    name: str
    aliases: int

    @property
    def key(self) -> str:
        return f"{self.aliases} alias{'es' if self.aliases > 1 else ''}/{self.name}"


@contextmanager
def configured_aliases(count: int) -> Iterator[None]:
    """Make Django see ``count`` aliases: "default" and copies of it that are
    never used. Only the alias list of ``connections`` changes: what a
    boundary iterates over."""
    saved = connections.settings
    default = saved["default"]
    extra = {f"unused_{index}": {**default} for index in range(1, count)}
    connections.__dict__["settings"] = {"default": default, **extra}
    try:
        yield
    finally:
        connections.__dict__["settings"] = saved


def _noop(**kwargs: Any) -> None:
    pass


def _floor() -> Callable[[], None]:
    floor = Signal()
    floor.connect(_noop, weak=False)
    send = floor.send

    def boundary() -> None:
        send(None)
        send(None)

    return boundary


def _celery_fixup() -> Callable[[], None]:
    from celery.fixups.django import DjangoWorkerFixup

    from tests.celery_app import app, session_id

    fixup = DjangoWorkerFixup(app)
    prerun, postrun = fixup.on_task_prerun, fixup.on_task_postrun

    def boundary() -> None:
        prerun(session_id)
        postrun(session_id)

    return boundary


def _package() -> Callable[[], None]:
    """As a runner sends them; TASK_DB says which strategy."""
    started, finished = signals.task_started.send, signals.task_finished.send

    def boundary() -> None:
        started(None)
        finished(None)

    return boundary


def _scope() -> Callable[[], None]:
    def boundary() -> None:
        with task_scope():
            pass

    return boundary


def _boundary(name: str) -> Callable[[], None]:
    makers = {"floor": _floor, "celery_fixup": _celery_fixup, "task_scope": _scope}
    return makers.get(name, _package)()


def _measure(variant: Variant, batch: int) -> float:
    """Nanoseconds per boundary over one batch, in this thread."""
    with ExitStack() as stack:
        stack.enter_context(configured_aliases(variant.aliases))
        if variant.name in STRATEGIES:
            task_db = {"STRATEGY": variant.name}
            stack.enter_context(override_settings(TASK_DB=task_db))
        connection = connections["default"]
        if CONNECTION_OPEN.get(variant.name):
            connection.ensure_connection()
        else:
            connection.close()
        boundary = _boundary(variant.name)
        for _ in range(WARMUP):
            boundary()
        _check(variant)
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter_ns()
            for _ in range(batch):
                boundary()
            elapsed = time.perf_counter_ns() - start
        finally:
            gc.enable()
        _check(variant)
    return elapsed / batch


def _check(variant: Variant) -> None:
    """The setup is the one described: 1 initialized connection of
    ``variant.aliases`` configured, open or closed as it should be."""
    initialized = connections.all(initialized_only=True)
    configured = len(list(connections))
    is_open = connections["default"].connection is not None
    expected_open = CONNECTION_OPEN.get(variant.name, False)
    if len(initialized) != 1 or configured != variant.aliases:
        raise RuntimeError(
            f"{variant.key}: {len(initialized)} initialized of {configured} "
            "configured aliases, not 1 of "
            f"{variant.aliases}"
        )
    if is_open != expected_open and variant.name != "floor":
        raise RuntimeError(f"{variant.key}: the connection is open: {is_open}")


def _in_new_thread(func: Callable[[], Any]) -> Any:
    """Run ``func`` in a thread of its own: it starts with no connection
    initialized, whatever the other parts did in the main thread."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = func()
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, name="overhead")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def run(batch: int, repeat: int) -> dict[str, Any]:
    variants = [Variant(name, count) for count in ALIAS_COUNTS for name in MEASURED]
    measured = _in_new_thread(
        lambda: interleave(variants, repeat, lambda v: _measure(v, batch), "overhead")
    )
    by_key = {v.key: measured[v] for v in variants}
    results: dict[str, Any] = {
        "unit": "ns per boundary",
        "batch": batch,
        "repeat": repeat,
        "ns": {key: stats(values).to_json() for key, values in by_key.items()},
        "vs_floor": {},
        "vs_celery_fixup": {},
        "growth_vs_1_alias": {},
    }
    for variant in variants:
        floor = measured[Variant("floor", variant.aliases)]
        fixup = measured[Variant("celery_fixup", variant.aliases)]
        values = measured[variant]
        results["vs_floor"][variant.key] = ratios(values, floor).to_json()
        results["vs_celery_fixup"][variant.key] = ratios(values, fixup).to_json()
    for count in ALIAS_COUNTS[1:]:
        for name in MEASURED:
            many, one = measured[Variant(name, count)], measured[Variant(name, 1)]
            growth = ratios(many, one).to_json()
            results["growth_vs_1_alias"][Variant(name, count).key] = growth
    return results


def _fmt(figure: dict[str, Any], digits: int) -> str:
    return stats(figure["values"]).format(digits)


def render(results: dict[str, Any]) -> str:
    rows = []
    for count in ALIAS_COUNTS:
        for name in MEASURED:
            key = Variant(name, count).key
            rows.append(
                [
                    str(count),
                    LABELS[name],
                    _fmt(results["ns"][key], 0),
                    _fmt(results["vs_floor"][key], 2),
                    _fmt(results["vs_celery_fixup"][key], 2),
                ]
            )
    growth = [
        [
            LABELS[name],
            *(
                _fmt(results["growth_vs_1_alias"][Variant(name, count).key], 2)
                for count in ALIAS_COUNTS[1:]
            ),
        ]
        for name in MEASURED
    ]
    return section(
        "1. Boundary overhead: one task_started + task_finished pair",
        [
            f"Absolute: ns per boundary, batches of {results['batch']:,}; "
            f"ratios per repetition; median [min-max] of "
            f"{repetitions(results['repeat'])}.",
            "1 connection initialized (SQLite); aliases = aliases configured.",
            "",
            table(
                ["aliases", "variant", "ns/boundary", "x floor", "x Celery fixup"],
                rows,
            ),
            "",
            "Growth with unused aliases: ns with N configured / ns with 1 "
            "(1 initialized):",
            "",
            table(
                [
                    "variant",
                    *(f"{count} aliases / 1 alias" for count in ALIAS_COUNTS[1:]),
                ],
                growth,
            ),
        ],
    )
