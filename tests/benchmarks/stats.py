"""Interleaved repetitions, their median, min and max, and plain-text tables.

Every comparison is a ratio taken within one repetition: the variants of a
repetition run one after the other (A, B, C, A, B, C...), so that a slow
moment of a shared machine hits them alike, and the ratio A/B of each
repetition is computed before the median is taken.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

V = TypeVar("V", bound=Hashable)
T = TypeVar("T")


@dataclass(frozen=True)
class Stats:
    """Several measurements of one figure."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def to_json(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "values": list(self.values),
        }

    def format(self, digits: int = 0) -> str:
        """``median [min-max]``, or the median alone when they are all equal."""
        median = f"{self.median:,.{digits}f}"
        if self.min == self.max:
            return median
        return f"{median} [{self.min:,.{digits}f}-{self.max:,.{digits}f}]"


def stats(values: Sequence[float]) -> Stats:
    return Stats(tuple(float(v) for v in values))


def interleave(
    variants: Sequence[V],
    repeat: int,
    measure: Callable[[V], T],
    label: str = "",
) -> dict[V, list[T]]:
    """Measure every variant once per repetition, always in the same order."""
    results: dict[V, list[T]] = {variant: [] for variant in variants}
    for index in range(repeat):
        progress(f"{label} repetition {index + 1}/{repeat}")
        for variant in variants:
            results[variant].append(measure(variant))
    return results


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> Stats:
    """The ratio of each repetition: numerators[i] / denominators[i]."""
    if len(numerators) != len(denominators):
        raise ValueError("ratios of series of different lengths")
    return stats([a / b for a, b in zip(numerators, denominators, strict=True)])


def repetitions(count: int) -> str:
    return f"{count} repetition{'' if count == 1 else 's'}"


def progress(message: str) -> None:
    """Where the run is, on stderr: stdout holds the tables only."""
    print(f"  .. {message}", file=sys.stderr, flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns separated by two spaces."""
    widths = [len(h) for h in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))

    def line(cells: Sequence[str]) -> str:
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=False)]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def section(title: str, lines: Sequence[str]) -> str:
    return "\n".join([title, "=" * len(title), *lines, ""])
