"""`minifs bench`: check the request, run every metric on every driver, each on
its own fresh disk, save the JSON and print the summary.

All checks happen before any disk is made, so bad input costs nothing and
leaves nothing. Ctrl-C stops cleanly: what is mounted is unmounted, the disks
are detached and deleted, and the results so far are saved marked partial.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from minifs_bench import amplification, footprint, latency, lookup, results
from minifs_bench.content import IMAGE_BYTES, IMAGE_INODES
from minifs_bench.disk import claim, release, sweep_stale
from minifs_bench.machine import driver_info, machine_info
from minifs_bench.options import METRICS
from minifs_bench.session import Session, close_on_disk, open_on_disk
from minifs_bench.stats import depth_sweep

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

from minifs import linux
from minifs.errors import InvalidArgument, MinifsError, NotSupported
from minifs.loopdisk import parse_size
from minifs.plugins import Registered, registered
from minifs.state import resolve_root

LAYER_CAP = 1000
"""Deepest sweep for a driver without a stacking limit of its own."""
RUNS_CAP = 1000
MiB = 1 << 20
MIN_DISK = 2 << 30
FS_RESERVE = 160 * MiB
"""Journal, metadata and slack of a fresh ext4 on the bench disk."""
EXT4_BYTES_PER_INODE = 16384
"""mke2fs's default inode_ratio: an ext4 disk has one inode per this many bytes."""


@dataclass
class Settings:
    drivers: list[str]
    layers: int
    metrics: list[str]
    runs: int
    disk_sizes: dict[str, int]
    out: Path | None
    root: Path
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def depths(self) -> list[int]:
        return depth_sweep(self.layers)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["depths"] = self.depths
        del data["skipped"]
        return data


# -- checking the request -------------------------------------------------------


def _metrics(text: str) -> list[str]:
    wanted = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in METRICS]
    if unknown or not wanted:
        raise InvalidArgument(
            f"unknown metric {', '.join(unknown) or repr(text)}; choose from {', '.join(METRICS)}"
        )
    return [m for m in METRICS if m in wanted]


def _drivers(text: str, available: Mapping[str, Registered]) -> tuple[list[str], dict[str, str]]:
    """Driver names to run, and the ones `all` skips with their probe's reason."""
    reasons: dict[str, str] = {}
    for name, reg in sorted(available.items()):
        try:
            reg.driver.probe()
        except MinifsError as exc:
            reasons[name] = str(exc)
    if text.strip() == "all":
        names = [n for n in sorted(available) if n not in reasons]
        if not names:
            raise NotSupported("no driver can run here; see 'minifs drivers' for why")
        return names, reasons
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise InvalidArgument("--driver names no driver; pass one, several, or 'all'")
    for name in names:
        if name not in available:
            known = ", ".join(sorted(available)) or "none are installed"
            raise InvalidArgument(f"unknown driver {name!r}; choose from {known} or 'all'")
        if name in reasons:
            raise NotSupported(f"driver {name} cannot run here: {reasons[name]}")
    return names, {}


def needed_disk(reg: Registered, layers: int, runs: int, metrics: list[str]) -> int:
    """Bytes a driver's bench disk needs for this run (a generous estimate)."""
    copies = reg.driver.kind.value == "copy"
    # Snapshots alive at once: the image, the chain, footprint's layers and clones,
    # a couple in flight; a copying driver pays a full image for each.
    objects = 3 + (layers if {"latency", "lookup"} & set(metrics) else 0)
    objects += 2 * runs if "footprint" in metrics else 0
    per_bytes = IMAGE_BYTES * 5 // 4 + 64 * 1024 if copies else 64 * 1024
    per_inodes = IMAGE_INODES + 16 if copies else 16
    data = objects * per_bytes
    inodes = objects * per_inodes + IMAGE_INODES + 4096
    if "amplification" in metrics:
        data += amplification.estimate_bytes()
        inodes += amplification.SMALL_FILES
    need = data + FS_RESERVE
    if reg.driver.disk_filesystem == "ext4":
        need = max(need, inodes * EXT4_BYTES_PER_INODE)
    return need


def _round_up(size: int, unit: int = 256 * MiB) -> int:
    return -(-size // unit) * unit


def validate(
    args: argparse.Namespace, available: Mapping[str, Registered] | None = None
) -> Settings:
    """Every check that can fail, before any work; raises a one-line MinifsError."""
    metrics = _metrics(args.metrics)
    if args.layers < 1:
        raise InvalidArgument(f"--layers {args.layers}: a chain needs at least 1 layer")
    if not 1 <= args.runs <= RUNS_CAP:
        raise InvalidArgument(f"--runs {args.runs}: pick 1..{RUNS_CAP}")
    explicit = None if args.disk_size == "auto" else parse_size(args.disk_size)
    if os.geteuid() != 0:
        raise NotSupported(
            "minifs bench makes loop devices and mounts, which needs root; run it as root"
        )
    available = registered() if available is None else available
    names, skipped = _drivers(args.driver, available)
    sizes = {}
    for name in names:
        limit = min(available[name].driver.max_depth or LAYER_CAP, LAYER_CAP)
        if args.layers > limit:
            raise InvalidArgument(
                f"--layers {args.layers} is deeper than {name} can stack ({limit}); pick 1..{limit}"
            )
        need = needed_disk(available[name], args.layers, args.runs, metrics)
        if explicit is not None and explicit < need:
            raise InvalidArgument(
                f"--disk-size {args.disk_size} is too small for {name} at --layers "
                f"{args.layers}; it needs at least {_round_up(need) // MiB} MiB "
                f"(or leave --disk-size at auto)"
            )
        sizes[name] = explicit or max(MIN_DISK, _round_up(need))
    root = resolve_root(args.root)
    _check_host_space(
        root,
        max(needed_disk(available[n], args.layers, args.runs, metrics) for n in names)
        + footprint.SCENARIO_DISK,
    )
    out = Path(args.out).absolute() if args.out else None
    if out is not None:
        _check_writable(out.parent)
    return Settings(names, args.layers, metrics, args.runs, sizes, out, root, skipped)


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_host_space(root: Path, need: int) -> None:
    """The bench images are sparse; what they fill must fit where they live."""
    where = _existing_parent(root)
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise InvalidArgument(
            f"{where} has {free // MiB} MiB free but the bench disks need about "
            f"{need // MiB} MiB; free some space or pass --root DIR elsewhere"
        )


def _check_writable(directory: Path) -> None:
    parent = _existing_parent(directory)
    if not os.access(parent, os.W_OK):
        raise InvalidArgument(f"cannot write results under {directory}; pass --out elsewhere")


# -- running --------------------------------------------------------------------


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
        "amplification": 1 + (len(amplification.UPDATE_SIZES) + 3) * settings.runs,
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
            # What the failed metric left mounted must not block the next one.
            for target in sorted(session.stray_mounts(), key=len, reverse=True):
                linux.umount(target, linux.MNT_DETACH)
        except KeyboardInterrupt:
            record["status"] = "interrupted"
            raise
        finally:
            phases[metric] = time.perf_counter() - mark


def main(args: argparse.Namespace) -> int:
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
    doc = results.new_document(settings.to_dict(), machine_info(bench_root), sys.argv)
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
