"""The summary printed at the end of a run: one rich table per metric, every
driver side by side, each table followed by the definitions of its columns.

It reads the run through the typed reader (minifs_bench.results), as
`minifs report` does, so no metric's keys are spelled here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from minifs.output import human_size
from minifs_bench.results import (
    CACHE_STATES,
    LOOKUP_OPS,
    BenchResult,
    Series,
    parse,
)


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _med(series: Series | None, digits: int = 2, unknown: bool = False) -> str:
    """The median; "unknown" for a count the driver does not keep."""
    if series is None:
        return "unknown" if unknown else "-"
    return _num(series.median, digits)


def _size(series: Series | None) -> str:
    return "-" if series is None else human_size(series.median)


def _table(title: str, columns: Sequence[str]) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold", box=None)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < 2 else "right")
    return table


def _definitions(console: Console, definitions: dict[str, str]) -> None:
    for key, text in definitions.items():
        console.print(f"  [dim]{key}: {text}[/dim]", highlight=False)
    console.print()


def print_summary(doc: dict | BenchResult, console: Console) -> None:
    """Every metric's table; `doc` is a run's document (even one cut short) or
    a result already read."""
    result = doc if isinstance(doc, BenchResult) else parse(doc, Path(doc["settings"]["out"]))
    state = "PARTIAL " if result.partial else ""
    console.print(
        f"[bold]{state}minifs bench[/bold]: {', '.join(result.drivers) or 'no driver'}, "
        f"--layers {result.layers}, --runs {result.runs}, "
        f"{_num(result.wall_seconds, 1)} s on {result.machine.cpus} CPUs, "
        f"kernel {result.machine.kernel}"
    )
    for name, reason in result.skipped.items():
        console.print(f"  skipped {name}: {reason}")
    console.print()
    _latency(result, console)
    _amplification(result, console)
    _lookup(result, console)
    _footprint(result, console)
    for name, driver in result.drivers.items():
        console.print(f"{name}: {_num(driver.wall_seconds, 1)} s")
        for error in driver.errors:
            console.print(f"  [red]error[/red] {error}", highlight=False)


def _latency(result: BenchResult, console: Console) -> None:
    found = [(d.name, d.latency) for d in result.drivers.values() if d.latency]
    if not found:
        return
    table = _table(
        "create / delete latency, ms (median, p95 in brackets)",
        ("driver", "depth", "create", "delete", "driver only", "bare", "create x", "delete x"),
    )
    for name, latency in found:
        for point in latency.points:
            table.add_row(
                name,
                str(point.depth),
                f"{point.create.median:.2f} [{point.create.p95:.2f}]",
                _med(point.delete),
                _med(point.driver_create),
                _med(point.bare_create),
                _num(point.create_overhead),
                _num(point.delete_overhead),
            )
        if latency.commit is not None:
            commit = latency.commit
            table.add_row(name, "commit", f"{commit.median:.2f} [{commit.p95:.2f}]")
    console.print(table)
    _definitions(console, found[0][1].definitions)


def _amplification(result: BenchResult, console: Console) -> None:
    found = [(d.name, d.amplification) for d in result.drivers.values() if d.amplification]
    if not found:
        return
    table = _table(
        "write amplification (medians; device bytes net of the idle flush where recorded)",
        (
            "driver",
            "workload",
            "file",
            "written",
            "device",
            "amplification x",
            "clone device",
            "clone inodes",
        ),
    )
    for name, amplification in found:
        for w in amplification.workloads:
            table.add_row(
                name,
                w.name,
                human_size(w.file_size) if w.file_size else "new",
                human_size(w.logical_bytes),
                _size(w.device),
                _med(w.amplification, 1),
                _size(w.clone_device),
                _med(w.clone_inodes, 0, unknown=True),
            )
    console.print(table)
    for name, amplification in found:
        idle = amplification.idle_flush
        if idle is not None:
            console.print(
                f"  {name}: idle flush {human_size(idle.median)} (median of {idle.n}, "
                f"{human_size(idle.min)} .. {human_size(idle.max)}), taken off in net",
                highlight=False,
            )
    _definitions(console, found[0][1].definitions)


def _lookup(result: BenchResult, console: Console) -> None:
    found = [(d.name, d.lookup) for d in result.drivers.values() if d.lookup]
    if not found:
        return
    keys = [(op, state) for op in LOOKUP_OPS for state in CACHE_STATES]
    table = _table(
        "layer-depth lookup, µs (medians)",
        ("driver", "depth", *(f"{op} {state}" for op, state in keys)),
    )
    for name, lookup in found:
        for point in lookup.points:
            table.add_row(name, str(point.depth), *(_med(point.time(*key), 1) for key in keys))
    console.print(table)
    for name, lookup in found:
        if lookup.not_cold:
            console.print(
                f"  [red]{name}: {lookup.not_cold} cold lookups read nothing "
                "from the bench disk; their figures are not cold[/red]",
                highlight=False,
            )
    _definitions(console, found[0][1].definitions)


def _footprint(result: BenchResult, console: Console) -> None:
    found = [(d.name, d.footprint) for d in result.drivers.values() if d.footprint]
    if not found:
        return
    table = _table(
        "inodes and space (medians)",
        ("driver", "what", "inodes", "bytes", "driver says"),
    )
    scenario = _table(
        "clones of one image on a small disk: measured, and predicted by the per-clone cost",
        (
            "driver",
            "disk",
            "clones",
            "ran out first",
            "free at end",
            "predicted",
            "bench disk fits",
            "its limit",
        ),
    )
    for name, footprint in found:
        costs = (("per layer", footprint.layer), ("per clone (mounted)", footprint.clone))
        for what, cost in costs:
            if cost is None:
                continue
            table.add_row(
                name,
                what,
                _med(cost.inodes, 0, unknown=True),
                _size(cost.bytes),
                f"{_size(cost.driver_bytes)}, {_med(cost.driver_inodes, 0, unknown=True)} inodes",
            )
        run, bench = footprint.scenario, footprint.bench_disk
        if run and bench:
            scenario.add_row(
                name,
                human_size(run.disk_size),
                str(run.clones),
                run.first_exhausted,
                "-" if run.bytes_free_at_end is None else human_size(run.bytes_free_at_end),
                _num(run.predicted.clones if run.predicted else None, 0),
                _num(bench.clones, 0),
                str(bench.first_exhausted),
            )
    console.print(table)
    console.print(scenario)
    _definitions(console, found[0][1].definitions)
