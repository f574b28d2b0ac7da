"""What `minifs report` prints: one rich table with each driver's key figures
per run, the command-line timings' commands and comparisons, then the
findings in words, then where the report went."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from minifs.output import human_size
from minifs.report.findings import CONFIRMS, CONTRADICTS, MET, NOT_MET, Finding
from minifs.report.runs import Entry, TimedRun, command_groups, run_name
from minifs_bench.results import BenchResult, CliTiming, DriverRun

COLOURS = {CONFIRMS: "green", CONTRADICTS: "red", MET: "green", NOT_MET: "red"}


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


def _table(title: str, columns: Sequence[str], words: int) -> Table:
    """A table whose first `words` columns are left-aligned, the figures right."""
    table = Table(title=title, title_justify="left", header_style="bold", box=None)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < words else "right")
    return table


def _timings(console: Console, runs: Sequence[TimedRun]) -> None:
    """Each command's median, min-max and rounds, then each comparison with
    its target and whether it was met."""
    several = len(runs) > 1
    table = _table(
        "minifs bench --cli: whole commands, ms (medians of the raw samples)",
        ("command", *(("run",) if several else ()), "median", "min-max", "n"),
        2 if several else 1,
    )
    for key in (k for g in command_groups([r.timing for r in runs]) for k in g):
        for r in runs:
            command = r.timing.commands.get(key)
            if command is not None:
                s = command.samples
                table.add_row(
                    escape(command.label),
                    *((escape(r.label),) if several else ()),
                    f"{s.median:.1f}",
                    f"{s.min:.1f}-{s.max:.1f}",
                    str(s.n),
                )
    console.print(table)
    console.print()
    table = _table(
        "minifs against its peers: ratio of the medians",
        ("minifs", "against", *(("run",) if several else ()), "ratio", "target", "verdict"),
        3 if several else 2,
    )
    for r in runs:
        for c in r.timing.comparisons:
            if c.ratio is None:
                verdict = f"not measured: {c.reason}"
            elif c.target is None:
                verdict = "-"
            else:
                verdict = "[green]met[/green]" if c.met else "[red]NOT met[/red]"
            table.add_row(
                escape(r.timing.name(c.minifs)),
                escape(r.timing.name(c.peer)),
                *((escape(r.label),) if several else ()),
                "-" if c.ratio is None else f"{c.ratio:.2f}x",
                "-" if c.target is None else f"≤ {c.target:.1f}x",
                verdict,
            )
    console.print(table)
    console.print()


def print_report(
    console: Console,
    results: Sequence[BenchResult],
    entries: Sequence[Entry],
    runs: Sequence[TimedRun],
    found: dict[Path, list[Finding]],
    written: Sequence[Path],
) -> None:
    if results:
        _drivers(console, entries)
    if runs:
        _timings(console, runs)
    reported: list[BenchResult | CliTiming] = [*results, *(r.timing for r in runs)]
    for r in reported:
        title = "findings" + (f", run {run_name(r)} ({r.path.name})" if len(reported) > 1 else "")
        console.print(f"[bold]{title}[/bold]")
        for f in found.get(r.path, []):
            colour = COLOURS.get(f.verdict)
            mark = f"[{colour}]{f.verdict}:[/{colour}] " if colour else ""
            console.print(f"  • {mark}{escape(f.text)}", highlight=False)
        console.print()
    for path in written:
        console.print(f"wrote {path}", highlight=False)


def _drivers(console: Console, entries: Sequence[Entry]) -> None:
    """The storage bench's key figures, one row per driver per run."""
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
