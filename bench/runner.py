"""`minifs bench`: run every metric on every driver, each on its own fresh disk,
save the JSON and print the summary.

The request is checked in full first (minifs_bench.request). Ctrl-C stops
cleanly: what is mounted is unmounted, the disks are detached and deleted, and
the results so far are saved marked partial.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from minifs.errors import MinifsError
from minifs_bench import amplification, footprint, latency, lookup, results
from minifs_bench.disk import claim, release, sweep_stale
from minifs_bench.machine import driver_info, machine_info, source_info
from minifs_bench.request import MiB, Settings, validate
from minifs_bench.session import Session, close_on_disk, open_on_disk

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Teardown must finish even if Ctrl-C is pressed again."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Bar:
    """A rich progress task, as the `Progress` the metrics report to."""

    def __init__(self, progress: RichProgress, task: TaskID) -> None:
        self.progress = progress
        self.task = task

    def step(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def advance(self, steps: int = 1) -> None:
        self.progress.advance(self.task, steps)


RUNNERS: dict[str, Callable[[Session, Settings, dict], None]] = {
    "latency": lambda s, st, r: latency.run(s, st.depths, r),
    "lookup": lambda s, st, r: lookup.run(s, st.depths, r),
    "amplification": lambda s, st, r: amplification.run(s, r),
    "footprint": lambda s, st, r: footprint.run(s, r),
}


def units(settings: Settings) -> int:
    """Progress units of one driver's run, matching the metrics' advance() calls."""
    n = 1
    if {"latency", "lookup"} & set(settings.metrics):
        n += settings.layers - 1
    per = {
        "latency": len(settings.depths) * settings.runs,
        "lookup": len(settings.depths) * settings.runs,
        "amplification": 1 + len(amplification.workloads()) * settings.runs,
        "footprint": 2 * settings.runs + 1,
    }
    return n + sum(per[m] for m in settings.metrics)


def run_driver(name: str, settings: Settings, rundir: Path, entry: dict, bar: Bar) -> None:
    """Measure one driver on its own disk; the disk goes whatever happens.

    Ctrl-C is caught here, not left to unwind through the teardown: once the
    interrupted frames are gone, so are the files they held open, and the
    bench disk can be unmounted. It is raised again after the teardown.
    """
    workdir = rundir / name
    workdir.mkdir()
    started = time.perf_counter()
    bar.step(f"{name}: making a {settings.disk_sizes[name] // MiB} MiB bench disk")
    disk, storage = open_on_disk(name, workdir, "disk", settings.disk_sizes[name])
    interrupted = False
    try:
        entry["disk"] = disk.describe()
        session = Session(name, storage, disk, workdir, settings.runs, bar)
        _measure(session, settings, entry)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        with sigint_deferred():
            close_on_disk(storage, disk, workdir)
        entry["wall_seconds"] = time.perf_counter() - started
    if interrupted:
        raise KeyboardInterrupt


def _measure(session: Session, settings: Settings, entry: dict) -> None:
    phases: dict[str, float] = {}
    entry["phases_seconds"] = phases
    mark = time.perf_counter()
    entry["disk"]["at_start"] = session.counts().to_dict()
    session.build_image()
    session.progress.advance()
    phases["image"] = time.perf_counter() - mark
    if {"latency", "lookup"} & set(settings.metrics):
        session.progress.step(f"{session.driver}: committing a chain of {settings.layers} layers")
        mark = time.perf_counter()
        session.build_chain(settings.layers)
        phases["chain"] = time.perf_counter() - mark
    for metric in settings.metrics:
        record: dict = {"status": "running"}
        entry["metrics"][metric] = record
        mark = time.perf_counter()
        try:
            RUNNERS[metric](session, settings, record)
            record["status"] = "done"
        except MinifsError as exc:
            record["status"] = "failed"
            record["error"] = str(exc)
            entry["errors"].append(f"{metric}: {exc}")
            session.detach_strays()
        except KeyboardInterrupt:
            record["status"] = "interrupted"
            raise
        finally:
            phases[metric] = time.perf_counter() - mark


def main(args: argparse.Namespace) -> int:
    if args.cli:
        from minifs_bench.cli_timing import main as time_commands

        return time_commands(args)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from minifs_bench.report import print_summary

    settings = validate(args)
    started = time.time()
    bench_root = settings.root / "bench"
    sweep_stale(bench_root)
    rundir = bench_root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    label = "all" if args.driver.strip() == "all" else "+".join(settings.drivers)
    out = settings.out or results.default_path(label, started).absolute()
    doc = results.new_document(
        settings.to_dict(), machine_info(bench_root), source_info(), sys.argv
    )
    doc["settings"]["out"] = str(out)
    doc["skipped"] = settings.skipped
    console = Console(stderr=True)
    clock = time.perf_counter()
    claim(rundir)
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            for name in settings.drivers:
                entry = {"driver": driver_info(name), "errors": [], "metrics": {}}
                doc["drivers"][name] = entry
                bar = Bar(progress, progress.add_task(name, total=units(settings)))
                run_driver(name, settings, rundir, entry, bar)
    except KeyboardInterrupt:
        doc["interrupted"] = True
    except BaseException as exc:
        doc["errors"].append(str(exc))
        raise
    finally:
        with sigint_deferred():
            release(rundir)
            doc["errors"].extend(
                f"{n}: {e}" for n, entry in doc["drivers"].items() for e in entry["errors"]
            )
            doc["partial"] = doc["interrupted"] or bool(doc["errors"])
            results.finish(doc, time.perf_counter() - clock)
            results.save(doc, out)
    summary = Console()
    # Piped into a log, rich would fold the tables to 80 columns.
    print_summary(doc, summary if summary.is_terminal else Console(width=160))
    print(f"results: {out}")
    if doc["interrupted"]:
        print(f"interrupted: partial results saved to {out}", file=sys.stderr)
        raise KeyboardInterrupt
    for error in doc["errors"]:
        print(f"minifs: error: {error}", file=sys.stderr)
    return 1 if doc["errors"] else 0
