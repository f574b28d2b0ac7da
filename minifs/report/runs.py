"""The results `minifs report` was given, read and checked, and the series
they make: one per driver per run, each with its legend label and style, and
one per `minifs bench --cli` run.

A file that cannot be reported (not a bench result, an unknown schema
version, nothing in common with the others) is set aside with a one-line
reason; the rest are still reported. Command-line timings are another kind
of result, not a metric: they are never compared with storage bench files,
so they never share or lack a metric with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from minifs.errors import MinifsError
from minifs_bench.results import BenchResult, CliTiming, DriverRun, read

PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
)
"""One colour per driver, the same in every plot (matplotlib's tab10, minus
grey and olive, which read poorly beside the grey reference lines)."""
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v")


@dataclass(frozen=True)
class Loaded:
    results: list[BenchResult]
    timings: list[CliTiming]
    """`minifs bench --cli` runs, reported in a section of their own."""
    refused: list[str]
    """One line per file left out, naming it and why."""


def load(paths: Sequence[Path]) -> Loaded:
    """Read every file; keep those that can be reported together.

    The first file with data sets what "in common" means: a later one that
    shares no metric with the files kept so far has nothing to be compared on
    and is refused.
    """
    results: list[BenchResult] = []
    timings: list[CliTiming] = []
    refused: list[str] = []
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        try:
            result = read(path)
        except MinifsError as exc:
            refused.append(str(exc))
            continue
        if isinstance(result, CliTiming):
            if result.commands:
                timings.append(result)
            else:
                refused.append(
                    f"{path} holds no timed command; run 'minifs bench --cli' to completion"
                )
            continue
        metrics = result.metrics()
        if not metrics:
            refused.append(f"{path} holds no finished metric; run 'minifs bench' to completion")
            continue
        kept = set().union(*(r.metrics() for r in results)) if results else metrics
        if not metrics & kept:
            refused.append(
                f"{path} shares no metric with the other results (it has "
                f"{', '.join(sorted(metrics))}; they have {', '.join(sorted(kept))}); "
                "report it on its own"
            )
            continue
        results.append(result)
    return Loaded(results, timings, refused)


@dataclass(frozen=True)
class Entry:
    """One series: a driver in one run."""

    result: BenchResult
    driver: DriverRun
    label: str
    color: str
    linestyle: str
    marker: str
    differs: tuple[str, ...] = ()
    """How its run's machine differs from the first run's ("kernel 6.1.0")."""

    @property
    def run(self) -> str:
        return run_name(self.result)


def run_name(result: BenchResult | CliTiming) -> str:
    """A run by when it started: "2026-12-01 17:59"."""
    return result.started_at[:16].replace("T", " ") or result.path.stem


def differences(result: BenchResult | CliTiming, reference: BenchResult | CliTiming) -> list[str]:
    """How `result`'s machine differs from the reference run's, in words a
    legend can carry: a different kernel, CPU or disk is a different setting."""
    mine, theirs = result.machine, reference.machine
    found = []
    if mine.kernel != theirs.kernel:
        found.append(f"kernel {mine.kernel}")
    if mine.cpu != theirs.cpu:
        found.append(f"cpu {mine.cpu}")
    if mine.bench_disk_on != theirs.bench_disk_on:
        found.append(f"disk {mine.bench_disk_on}")
    return found


def entries(results: Sequence[BenchResult]) -> list[Entry]:
    """Every driver of every run, labelled so that two runs of one driver can
    be told apart, and a run on another machine says how it differs."""
    names = list(dict.fromkeys(name for r in results for name in r.drivers))
    runs_of = {n: sum(n in r.drivers for r in results) for n in names}
    out: list[Entry] = []
    for result in results:
        extra = differences(result, results[0])
        for name, driver in result.drivers.items():
            nth = sum(e.driver.name == name for e in out)
            label = driver.label
            if runs_of[name] > 1:
                label += f" · {run_name(result)}"
            if extra:
                label += f" [{', '.join(extra)}]"
            out.append(
                Entry(
                    result,
                    driver,
                    label,
                    PALETTE[names.index(name) % len(PALETTE)],
                    LINESTYLES[nth % len(LINESTYLES)],
                    MARKERS[nth % len(MARKERS)],
                    tuple(extra),
                )
            )
    return out


@dataclass(frozen=True)
class TimedRun:
    """One `minifs bench --cli` run as the report draws it."""

    timing: CliTiming
    label: str
    color: str
    differs: tuple[str, ...] = ()
    """How its machine differs from the first timing run's."""


def timed_runs(timings: Sequence[CliTiming]) -> list[TimedRun]:
    """Every command-line timing run, named by when it started and, on
    another machine than the first, by how that machine differs."""
    out = []
    for i, timing in enumerate(timings):
        extra = differences(timing, timings[0])
        label = run_name(timing) + (f" [{', '.join(extra)}]" if extra else "")
        if any(r.label == label for r in out):
            label += f" ({timing.path.name})"  # two runs in one minute
        out.append(TimedRun(timing, label, PALETTE[i % len(PALETTE)], tuple(extra)))
    return out


def command_groups(timings: Sequence[CliTiming]) -> list[list[str]]:
    """Command keys in the order the report shows them: each minifs command
    beside the peers it is compared with (minifs first), then any command no
    comparison names; only commands some run timed."""
    mine = {c.minifs for t in timings for c in t.comparisons}
    groups: list[list[str]] = []
    for t in timings:
        for c in t.comparisons:
            group = next((g for g in groups if c.minifs in g or c.peer in g), None)
            if group is None:
                group = []
                groups.append(group)
            if c.minifs not in group:
                group.insert(sum(k in mine for k in group), c.minifs)
            if c.peer not in group:
                group.append(c.peer)
    for t in timings:
        for key in t.commands:
            if not any(key in g for g in groups):
                groups.append([key])
    timed = {key for t in timings for key in t.commands}
    kept = [[k for k in g if k in timed] for g in groups]
    return [g for g in kept if g]
