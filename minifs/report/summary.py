"""What `minifs report` prints: one rich table with each driver's key figures
per run, then the findings in words, then where the report went."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from minifs.output import human_size
from minifs.report.findings import CONFIRMS, CONTRADICTS, Finding
from minifs.report.runs import Entry, run_name
from minifs_bench.results import BenchResult, DriverRun


def _create(d: DriverRun) -> str:
    points = d.latency.points if d.latency else ()
    if not points:
        return "-"
    low, high = points[0], points[-1]
    bare = f" ({low.bare_create.median:.2f})" if low.bare_create else ""
    return f"{low.create.median:.2f}{bare} → {high.create.median:.2f}"


def _update(d: DriverRun) -> str:
    updates = d.amplification.updates() if d.amplification else []
    if not updates:
        return "-"
    big = updates[-1]
    return f"{human_size(big.device.median)} of {human_size(big.file_size)}"


def _lookup(d: DriverRun) -> str:
    points = d.lookup.points if d.lookup else ()
    miss = [p.time("miss", "first") for p in points]
    if not points or miss[0] is None or miss[-1] is None:
        return "-"
    return f"{miss[0].median:.1f} → {miss[-1].median:.1f}"


def _clone(d: DriverRun) -> str:
    clone = d.footprint.clone if d.footprint else None
    if clone is None:
        return "-"
    inodes = "unknown" if clone.inodes is None else f"{clone.inodes.median:.0f}"
    size = "-" if clone.bytes is None else human_size(clone.bytes.median)
    return f"{inodes} / {size}"


def _fit(d: DriverRun) -> str:
    run = d.footprint.scenario if d.footprint else None
    if run is None:
        return "-"
    return f"{run.clones} of {human_size(run.disk_size)} ({run.first_exhausted})"


def print_report(
    console: Console,
    results: Sequence[BenchResult],
    entries: Sequence[Entry],
    found: dict[Path, list[Finding]],
    written: Sequence[Path],
) -> None:
    table = Table(
        title="minifs report: medians of the raw samples",
        title_justify="left",
        header_style="bold",
        box=None,
    )
    for column in (
        "driver",
        "run",
        "create ms (bare), depth 1 → deepest",
        "a 4 B update wrote",
        "miss µs, depth 1 → deepest",
        "inodes / bytes per clone",
        "clones that fit (ran out)",
    ):
        table.add_column(column, justify="left" if column in ("driver", "run") else "right")
    for e in entries:
        d = e.driver
        run = e.run + "".join(f"\n{what}" for what in e.differs)
        table.add_row(d.name, run, _create(d), _update(d), _lookup(d), _clone(d), _fit(d))
    console.print(table)
    console.print()
    for r in results:
        title = "findings" + (f", run {run_name(r)} ({r.path.name})" if len(results) > 1 else "")
        console.print(f"[bold]{title}[/bold]")
        for f in found.get(r.path, []):
            colour = {CONFIRMS: "green", CONTRADICTS: "red"}.get(f.verdict)
            mark = f"[{colour}]{f.verdict}:[/{colour}] " if colour else ""
            console.print(f"  • {mark}{escape(f.text)}", highlight=False)
        console.print()
    for path in written:
        console.print(f"wrote {path}", highlight=False)
