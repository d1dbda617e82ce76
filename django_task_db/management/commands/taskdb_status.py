"""``manage.py taskdb_status``: each alias, its server, and whether a
deployment's connections fit (django_task_db.diagnostics does the work)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_task_db import diagnostics
from django_task_db.diagnostics import AliasStatus

JSON_VERSION = 1


MAX_COUNT = 1_000_000


def _count(value: str) -> int:
    try:
        number = int(value) if len(value) <= 7 else 0
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_COUNT:
        shown = value if len(value) <= 20 else value[:20] + "..."
        raise argparse.ArgumentTypeError(
            f"{shown!r} is not a whole number from 1 to {MAX_COUNT:,}"
        )
    return number


class Command(BaseCommand):
    help = (
        "Show each database alias's settings, its server's idle timeout, "
        "max_connections and connections now, and with --hosts/--processes/"
        "--threads whether a deployment's connections fit."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--database",
            action="append",
            dest="databases",
            metavar="ALIAS",
            help="An alias to report on (repeatable; default: every alias).",
        )
        parser.add_argument("--json", action="store_true", help="Print JSON.")
        for name, what in (
            ("hosts", "worker hosts"),
            ("processes", "worker processes per host"),
            ("threads", "threads per process"),
        ):
            parser.add_argument(
                f"--{name}", type=_count, metavar=name[0].upper(), help=f"{what} (1)"
            )

    def handle(self, *args: Any, **options: Any) -> None:
        sizes = [options[name] for name in ("hosts", "processes", "threads")]
        deployment = (
            diagnostics.Deployment(*(size or 1 for size in sizes))
            if any(sizes)
            else None
        )
        try:
            reports = diagnostics.status(options["databases"], deployment)
        except ValueError as exc:
            raise CommandError(f"--database {exc}") from None
        if options["json"]:
            document = {
                "version": JSON_VERSION,
                "deployment": None if deployment is None else vars(deployment),
                "aliases": [report.as_dict() for report in reports],
            }
            self.stdout.write(json.dumps(document, indent=2))
        else:
            self.stdout.write(_table(reports, deployment))
        failed = [r.alias for r in reports if r.error is not None]
        overbooked = [
            r.alias
            for r in reports
            if r.budget is not None and r.budget.verdict == "does not fit"
        ]
        if failed or overbooked:
            raise CommandError(
                "; ".join(
                    part
                    for part in (
                        failed and f"not reachable: {', '.join(failed)}",
                        overbooked and f"does not fit: {', '.join(overbooked)}",
                    )
                    if part
                )
            )


def _table(
    reports: list[AliasStatus], deployment: diagnostics.Deployment | None
) -> str:
    rows: list[tuple[str, list[str]]] = [
        ("alias", [r.alias for r in reports]),
        ("vendor", [_vendor(r) for r in reports]),
        ("host:port", [f"{r.host}:{r.port}" if r.host else "-" for r in reports]),
        ("database", [r.database or "-" for r in reports]),
        ("user", [r.user or "-" for r in reports]),
        ("CONN_MAX_AGE", [_age(r.conn_max_age) for r in reports]),
        ("CONN_HEALTH_CHECKS", [str(r.conn_health_checks) for r in reports]),
        ("pool", [_pool(r.pool) for r in reports]),
        ("strategy", [r.strategy for r in reports]),
        ("pooler", [_pooler(r) for r in reports]),
        ("idle timeout", [_server(r, _idle) for r in reports]),
        ("max_connections", [_server(r, _max) for r in reports]),
        ("connections now", [_server(r, _now) for r in reports]),
    ]
    if deployment is not None:
        d = deployment
        rows.append(
            (
                f"needed ({d.hosts}x{d.processes}x{d.threads})",
                [_needed(r) for r in reports],
            )
        )
        rows.append(
            ("verdict", [r.budget.verdict if r.budget else "-" for r in reports])
        )
    widths = [max(len(row[0]) for row in rows)] + [
        max(len(row[1][i]) for row in rows) for i in range(len(reports))
    ]
    lines = [
        "  ".join(
            cell.ljust(width)
            for cell, width in zip([name, *cells], widths, strict=True)
        ).rstrip()
        for name, cells in rows
    ]
    lines.append("")
    for r in reports:
        if r.error is not None:
            lines.append(f"{r.alias}: not reachable: {r.error}")
        elif r.budget is not None:
            b = r.budget
            line = (
                f"{r.alias}: {b.verdict}: needs {b.server_needed} connections of the "
                f"{b.allowed} its server allows"
            )
            if b.server_needed != b.needed:
                line += f" ({b.needed} for this alias, the rest for the others there)"
            if b.verdict != "fits":
                line += f"; {b.advice}"
            lines.append(line + ".")
    return "\n".join(lines).rstrip() + "\n"


def _vendor(r: AliasStatus) -> str:
    return f"{r.vendor} {r.server.version.split()[0]}" if r.server else r.vendor


def _age(age: float | None) -> str:
    return "None" if age is None else f"{age:g}"


def _pool(pool: diagnostics.Pool | None) -> str:
    if pool is None:
        return "off"
    return f"{pool.min_size} to {pool.max_size}"


def _server(r: AliasStatus, show: Any) -> str:
    if r.error is not None:
        return "(not reachable)"
    return "-" if r.server is None else str(show(r.server))


def _pooler(r: AliasStatus) -> str:
    p = r.pooler
    if p is None:
        return "-" if r.vendor != "postgresql" or r.error else "none found"
    if p.version is None:
        return f"{p.name} (no admin access)"
    return (
        f"{p.name} {p.version}, {p.pool_mode} pooling "
        f"(pool_size {p.pool_size}, max_client_conn {p.max_client_conn})"
    )


def _idle(s: diagnostics.Server) -> str:
    timeout = "off" if s.idle_timeout is None else f"{s.idle_timeout:g} s"
    return f"{timeout} ({s.idle_timeout_setting})"


def _max(s: diagnostics.Server) -> str:
    text = str(s.max_connections)
    if s.reserved_connections:
        text += f" ({s.reserved_connections} reserved)"
    if s.user_connection_limit is not None:
        text += f", user limit {s.user_connection_limit}"
    return text


def _now(s: diagnostics.Server) -> str:
    return f"{s.connections} ({s.user_connections} this user's)"


def _needed(r: AliasStatus) -> str:
    b = r.budget
    if b is None:
        return "-"
    if b.server_needed == b.needed:
        return str(b.needed)
    return f"{b.needed} ({b.server_needed} on server)"
