"""The results `minifs report` was given, read and checked, and the series
they make: one per driver per run, each with its legend label and style.

A file that cannot be reported (not a bench result, an unknown schema
version, nothing in common with the others) is set aside with a one-line
reason; the rest are still reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from minifs.errors import MinifsError
from minifs_bench.results import BenchResult, DriverRun, read

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
    refused: list[str]
    """One line per file left out, naming it and why."""


def load(paths: Sequence[Path]) -> Loaded:
    """Read every file; keep those that can be reported together.

    The first file with data sets what "in common" means: a later one that
    shares no metric with the files kept so far has nothing to be compared on
    and is refused.
    """
    results: list[BenchResult] = []
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
    return Loaded(results, refused)


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


def run_name(result: BenchResult) -> str:
    """A run by when it started: "2026-12-01 17:59"."""
    return result.started_at[:16].replace("T", " ") or result.path.stem


def differences(result: BenchResult, reference: BenchResult) -> list[str]:
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
