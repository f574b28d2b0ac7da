"""The report's plots, drawn with matplotlib on figures of their own: no
pyplot, so no global state and no GUI backend; saving a PNG renders with Agg,
headless, in a notebook or a test alike.

Each series is one driver in one run: the median of its raw samples, with a
bar from their minimum to their maximum. A baseline the bench measured in the
same run (the bare kernel operation) is drawn beside its driver, dotted, in
the driver's colour; what the bench did not measure is said in the caption,
not drawn. Command-line timings (`minifs bench --cli`) get one plot of their
own: each command's median bar, the peers beside minifs, one colour per run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    LogLocator,
    NullFormatter,
    NullLocator,
)

from minifs.output import human_size
from minifs.report.runs import Entry, TimedRun, command_groups
from minifs_bench.results import Amplification, Series

DPI = 110
WIDTH = 12.0


S = TypeVar("S")


@dataclass(frozen=True)
class Plot(Generic[S]):
    """One PNG of the report: its file stem, title, what it shows, and how
    it is drawn from its series (bench entries or command-line timing runs)."""

    name: str
    title: str
    caption: str
    draw: Callable[[Sequence[S]], Figure | None]


def short_size(n: float) -> str:
    """Bytes for an axis tick: 4K, 64M, 1.5G."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if n == int(n) else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _figure(rows: int, cols: int, height: float) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _legend(fig: Figure, entries: Sequence[Entry], extra: Sequence[object] = ()) -> None:
    """One legend under the plots for the whole figure: a driver with its
    backend per series, then what the line styles mean."""
    handles: list[object] = [
        Line2D([], [], color=e.color, linestyle=e.linestyle, marker=e.marker, label=e.label)
        for e in entries
    ]
    handles.extend(extra)
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=min(3, len(handles)),
        frameon=False,
        fontsize="small",
    )


def _yerr(series: Sequence[Series]) -> list[list[float]] | None:
    """Bars from each median down to the minimum and up to the maximum; none
    for single samples, which have no spread to show."""
    if all(s.n == 1 for s in series):
        return None
    return [[s.median - s.min for s in series], [s.max - s.median for s in series]]


def _plain(ax: Axes) -> None:
    """Log-scale y ticks as plain numbers (3, 40, 1000). Minor ticks are
    labelled only on a scale spanning less than a decade, which has no major
    tick to label; on a wider one their labels would run into each other."""
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())


def _spread(ax: Axes, xs: Sequence[float], series: Sequence[Series], **style: object) -> None:
    """Medians joined by a line, each with a bar from its min to its max."""
    medians = [s.median for s in series]
    ax.errorbar(xs, medians, yerr=_yerr(series), capsize=3, markersize=5, **style)  # type: ignore[arg-type]


def _depth_axis(ax: Axes, depths: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(depths))))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("layer depth L (layers under the clone; log scale)")
    ax.grid(True, which="major", alpha=0.3)


def _style(e: Entry) -> dict[str, object]:
    return {"color": e.color, "linestyle": e.linestyle, "marker": e.marker}


def _dotted(e: Entry) -> dict[str, object]:
    return {"color": e.color, "linestyle": ":", "marker": "x", "alpha": 0.85}


# -- create / delete latency --------------------------------------------------


def latency(entries: Sequence[Entry]) -> Figure | None:
    found = [(e, e.driver.latency) for e in entries if e.driver.latency]
    found = [(e, lat) for e, lat in found if lat.points]
    if not found:
        return None
    fig, (create, delete) = _figure(1, 2, 5.2)
    depths: list[int] = []
    bare_drawn = False
    for e, lat in found:
        points = lat.points
        xs = [p.depth for p in points]
        depths.extend(xs)
        _spread(create, xs, [p.create for p in points], **_style(e))
        _spread(delete, xs, [p.delete for p in points], **_style(e))
        for ax, key in ((create, "bare_create"), (delete, "bare_delete")):
            bare = [(p.depth, getattr(p, key)) for p in points if getattr(p, key) is not None]
            if bare:
                bare_drawn = True
                _spread(ax, [d for d, _ in bare], [s for _, s in bare], **_dotted(e))
    for ax, what in ((create, "create: clone + mount"), (delete, "delete: umount + remove")):
        ax.set_title(what)
        ax.set_yscale("log")
        _plain(ax)
        ax.set_ylabel("time, ms (median, bar min to max; log scale)")
        _depth_axis(ax, depths)
    extra = (
        [Line2D([], [], color="grey", linestyle=":", marker="x", label="bare kernel operation")]
        if bare_drawn
        else []
    )
    _legend(fig, [e for e, _ in found], extra)
    return fig


# -- write amplification ---------------------------------------------------------


def amplification(entries: Sequence[Entry]) -> Figure | None:
    found = [(e, e.driver.amplification) for e in entries if e.driver.amplification]
    found = [(e, a) for e, a in found if a.workloads]
    if not found:
        return None
    fig, (updates, bars) = _figure(1, 2, 5.4)
    sizes: list[int] = []
    clone_drawn = False
    for e, amp in found:
        series = amp.updates()
        if not series:
            continue
        xs = [w.file_size for w in series]
        sizes.extend(xs)
        _spread(updates, xs, [w.device for w in series], **_style(e))
        clones = [w.clone_device for w in series]
        if all(c is not None for c in clones):
            clone_drawn = True
            _spread(updates, xs, clones, **_dotted(e))  # type: ignore[arg-type]
    if sizes:
        span = sorted(set(sizes))
        updates.plot(span, span, color="grey", linestyle="--", linewidth=1)
        updates.set_xscale("log", base=2)
        updates.set_yscale("log", base=2)
        updates.xaxis.set_major_locator(FixedLocator(span))
        updates.xaxis.set_minor_locator(NullLocator())
        for axis in (updates.xaxis, updates.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: short_size(v)))
        updates.set_xlabel("size of the lower-layer file (bytes, log scale)")
        updates.set_ylabel("bytes the disk received (log scale)")
        updates.set_title("4-byte update in the middle of a lower-layer file")
        updates.grid(True, alpha=0.3)
    _amplification_bars(bars, found)
    extra: list[object] = [
        Line2D([], [], color="grey", linestyle="--", label="the whole file (a full copy)")
    ]
    if clone_drawn:
        extra.append(
            Line2D(
                [], [], color="grey", linestyle=":", marker="x", label="making the clone (one-off)"
            )
        )
    extra.append(Line2D([], [], color="black", linestyle="-.", label="2x: the seed's CoW claim"))
    _legend(fig, [e for e, _ in found], extra)
    return fig


def _amplification_bars(ax: Axes, found: Sequence[tuple[Entry, Amplification]]) -> None:
    """Amplification per workload, the largest 4-byte update among them."""
    names: list[str] = []
    per_entry: list[dict[str, Series]] = []
    for _, amp in found:
        chosen = {w.name: w.amplification for w in amp.others()}
        updates = amp.updates()
        if updates:
            big = updates[-1]
            chosen[f"4 B into {short_size(big.file_size)}"] = big.amplification
        per_entry.append(chosen)
        names.extend(n for n in chosen if n not in names)
    width = 0.8 / len(found)
    for i, ((e, _), chosen) in enumerate(zip(found, per_entry, strict=True)):
        xs = [k + (i - (len(found) - 1) / 2) * width for k, n in enumerate(names) if n in chosen]
        values = [chosen[n] for n in names if n in chosen]
        ax.bar(
            xs,
            [s.median for s in values],
            width=width,
            color=e.color,
            yerr=_yerr(values),
            capsize=2,
            hatch=None if e.linestyle == "-" else "//",
            edgecolor="white",
        )
    ax.axhline(1, color="grey", linewidth=1)
    ax.axhline(2, color="black", linestyle="-.", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("amplification: device bytes / bytes written (log scale)")
    ax.set_title("write amplification per workload (1 = none)")
    ax.grid(True, axis="y", alpha=0.3)


# -- lookups ---------------------------------------------------------------------------


def lookup(entries: Sequence[Entry]) -> Figure | None:
    found = [(e, e.driver.lookup) for e in entries if e.driver.lookup]
    found = [(e, lk) for e, lk in found if lk.points]
    if not found:
        return None
    fig, axes = _figure(2, 3, 7.6)
    cells = [(op, state) for op in ("stat", "miss") for state in ("cold", "first", "warm")]
    titles = {
        "stat": "stat() of a file in the bottom layer",
        "miss": "stat() of a name in no layer",
        "cold": "cold (caches dropped)",
        "first": "first (fresh mount, disk cached)",
        "warm": "warm (repeated)",
    }
    depths: list[int] = []
    for ax, (op, state) in zip(axes, cells, strict=True):
        for e, lk in found:
            points = [(p.depth, p.time(op, state)) for p in lk.points if p.time(op, state)]
            if points:
                depths.extend(d for d, _ in points)
                _spread(ax, [d for d, _ in points], [s for _, s in points], **_style(e))  # type: ignore[misc]
        ax.set_title(f"{titles[op]}\n{titles[state]}", fontsize="medium")
        ax.set_yscale("log")
        _plain(ax)
        ax.set_ylabel("µs (log scale)")
    for ax in axes:
        _depth_axis(ax, depths)
    for ax in axes[:3]:
        ax.set_xlabel("")
    _legend(fig, [e for e, _ in found])
    return fig


# -- inodes, space and the clones that fit ---------------------------------------------


def _bars(
    ax: Axes,
    items: Sequence[tuple[Entry, Series | None]],
    offset: float,
    width: float,
    hatch: str | None,
) -> None:
    for i, (e, series) in enumerate(items):
        if series is None or series.median <= 0:
            text = "unknown" if series is None else "0"
            ax.annotate(
                text,
                (i + offset, 0),
                xycoords=("data", "axes fraction"),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                fontsize="small",
                rotation=90,
            )
            continue
        ax.bar(
            i + offset,
            series.median,
            width=width,
            color=e.color,
            hatch=hatch,
            edgecolor="white" if hatch else None,
            alpha=0.55 if hatch else 1.0,
            yerr=_yerr([series]),
            capsize=2,
        )


def _entry_axis(ax: Axes, entries: Sequence[Entry]) -> None:
    # Slanted: six or more driver names side by side in half a figure's width
    # would run into each other ("btrfsdevicemapperoverlay2").
    ax.set_xticks(
        range(len(entries)),
        [_short(e, entries) for e in entries],
        rotation=30,
        ha="right",
        rotation_mode="anchor",
    )
    ax.set_yscale("log")
    ax.grid(True, axis="y", alpha=0.3)


def _short(e: Entry, entries: Sequence[Entry]) -> str:
    """A driver's tick label; with its run when the driver ran more than once."""
    same = [x for x in entries if x.driver.name == e.driver.name]
    return e.driver.name if len(same) == 1 else f"{e.driver.name}\n{e.run}"


def footprint(entries: Sequence[Entry]) -> Figure | None:
    found = [(e, e.driver.footprint) for e in entries if e.driver.footprint]
    found = [(e, f) for e, f in found if f.clone is not None]
    if not found:
        return None
    fig, (inodes, space) = _figure(1, 2, 4.8)
    shown = [e for e, _ in found]
    costs = [(e, f.clone) for e, f in found if f.clone is not None]
    _bars(inodes, [(e, c.inodes) for e, c in costs], -0.2, 0.4, None)
    _bars(inodes, [(e, c.driver_inodes) for e, c in costs], 0.2, 0.4, "//")
    _bars(space, [(e, c.bytes) for e, c in costs], -0.2, 0.4, None)
    _bars(space, [(e, c.driver_bytes) for e, c in costs], 0.2, 0.4, "//")
    inodes.set_title("inodes per mounted clone of the image")
    inodes.set_ylabel("inodes (log scale)")
    space.set_title("space per mounted clone of the image")
    space.set_ylabel("bytes (log scale)")
    for ax in (inodes, space):
        _entry_axis(ax, shown)
    _plain(inodes)
    space.set_yscale("log", base=2)  # ticks at powers of 4: 4K, 16K, … 1M
    space.yaxis.set_major_locator(LogLocator(base=4))
    space.yaxis.set_minor_locator(NullLocator())
    space.yaxis.set_major_formatter(FuncFormatter(lambda v, _: short_size(v)))
    extra = [
        Patch(facecolor="grey", label="the bench disk's statvfs lost"),
        Patch(facecolor="grey", alpha=0.55, hatch="//", label="what the driver's usage() says"),
    ]
    _legend(fig, shown, extra)
    return fig


def clones(entries: Sequence[Entry]) -> Figure | None:
    found = [(e, e.driver.footprint) for e in entries if e.driver.footprint]
    found = [(e, f) for e, f in found if f.scenario is not None]
    if not found:
        return None
    fig, (small, bench) = _figure(1, 2, 5.0)
    shown = [e for e, _ in found]
    runs = [f.scenario for _, f in found]
    measured = [(e, Series((float(r.clones),))) for e, r in zip(shown, runs, strict=True)]
    predicted = [
        (e, Series((float(r.predicted.clones),)) if r.predicted and r.predicted.clones else None)
        for e, r in zip(shown, runs, strict=True)
    ]
    _bars(small, measured, -0.2, 0.4, None)
    _bars(small, predicted, 0.2, 0.4, "//")
    for i, run in enumerate(runs):
        small.annotate(
            f"{run.clones}\n{human_size(run.disk_size)}\n{run.first_exhausted}",
            (i - 0.2, run.clones),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize="x-small",
        )
    small.set_title("clones that fitted a small disk until one failed\n(the disk, what ran out)")
    small.set_ylabel("clones (log scale)")
    small.margins(y=0.35)
    fits = [
        (e, Series((float(f.bench_disk.clones),)) if f.bench_disk and f.bench_disk.clones else None)
        for e, f in found
    ]
    _bars(bench, fits, 0, 0.6, "//")
    for i, (_, f) in enumerate(found):
        if f.bench_disk and f.bench_disk.clones:
            bench.annotate(
                f"{f.bench_disk.clones:.0f}\n{f.bench_disk.first_exhausted}",
                (i, f.bench_disk.clones),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize="x-small",
            )
    bench.set_title("clones the bench disk would fit, by the cost per clone\n(what runs out)")
    bench.set_ylabel("clones (log scale)")
    bench.margins(y=0.35)
    for ax in (small, bench):
        _entry_axis(ax, shown)
        _plain(ax)
    extra = [
        Patch(facecolor="grey", label="measured"),
        Patch(facecolor="grey", alpha=0.55, hatch="//", label="predicted by the per-clone cost"),
    ]
    _legend(fig, shown, extra)
    return fig


# -- whole commands (minifs bench --cli) -------------------------------------------


def commands(runs: Sequence[TimedRun]) -> Figure | None:
    """Horizontal bars of each command's median, whiskers from its minimum to
    its maximum, a minifs command above the peers it is compared with, a
    dashed tick where its target puts the limit."""
    groups = command_groups([r.timing for r in runs])
    if not groups:
        return None
    bars = sum(len(g) for g in groups) * len(runs)
    fig, (ax,) = _figure(1, 1, 1.6 + 0.32 * bars + 0.4 * len(groups))
    height = 0.8 / len(runs)
    mine = {c.minifs for r in runs for c in r.timing.comparisons}
    ticks: list[float] = []
    labels: list[str] = []
    y = 0.0
    for g, group in enumerate(groups):
        if g:
            ax.axhline(y - 0.65, color="grey", linewidth=0.6, alpha=0.5)
            y += 0.3
        for key in group:
            ticks.append(y)
            label = next(r.timing.name(key) for r in runs if key in r.timing.commands)
            labels.append(label.replace("; ", ";\n"))
            for i, run in enumerate(runs):
                command = run.timing.commands.get(key)
                if command is None:
                    continue
                at = y + (i - (len(runs) - 1) / 2) * height
                series = command.samples
                ax.barh(
                    at,
                    series.median,
                    height=height * 0.9,
                    color=run.color,
                    alpha=1.0 if key in mine else 0.55,
                    hatch=None if key in mine else "//",
                    edgecolor="white",
                    xerr=_yerr([series]),
                    capsize=2,
                )
                ax.annotate(
                    f"{series.median:.1f}",
                    (series.max, at),
                    xytext=(4, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize="x-small",
                )
                _target(ax, run, key, at, height, named=i == 0)
            y += 1
    ax.set_yticks(ticks, labels, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlim(left=0)
    ax.margins(x=0.08)
    ax.set_xlabel("wall time of the whole command, ms (median; whiskers min to max)")
    ax.grid(True, axis="x", alpha=0.3)
    handles: list[object] = [Patch(facecolor=r.color, label=f"run {r.label}") for r in runs]
    handles += [
        Patch(facecolor="grey", label="minifs"),
        Patch(facecolor="grey", alpha=0.55, hatch="//", label="peer or baseline"),
        Line2D(
            [],
            [],
            color="black",
            linestyle="--",
            label="target: the peer's median times the ratio allowed",
        ),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False, fontsize="small")
    return fig


def _target(ax: Axes, run: TimedRun, key: str, at: float, height: float, named: bool) -> None:
    """A dashed tick across minifs command `key`'s bar where each of its
    targets (a ratio of a peer's median) puts the limit in ms; `named` on the
    top bar of a command only, so that the words do not cover the bars below."""
    for c in run.timing.comparisons:
        peer = run.timing.commands.get(c.peer)
        if c.minifs == key and c.target is not None and peer is not None:
            limit = c.target * peer.samples.median
            ax.vlines(limit, at - height / 2, at + height / 2, colors="black", linestyles="--")
            if not named:
                continue
            ax.annotate(
                f"target: {c.target:g}x",
                (limit, at - height / 2),
                xytext=(-2, 1),
                textcoords="offset points",
                fontsize="x-small",
                ha="right",
                va="bottom",
            )


CLI_PLOT: Plot[TimedRun] = Plot(
    "cli",
    "Whole commands beside their peers",
    "Wall time of whole processes, from before fork to after wait, as a user waits for "
    "them: each minifs command (solid) above the peers and baselines it is compared with "
    "(hatched), timed in the same rounds, interleaved, in rotating order. The bar is the "
    "median, the whiskers the minimum and maximum; the dashed tick on a minifs bar is its "
    "target, the peer's median times the ratio the target allows. One colour per run.",
    commands,
)


PLOTS: tuple[Plot[Entry], ...] = (
    Plot(
        "latency",
        "Create and delete latency against layer depth",
        "Clone+mount and umount+remove through minifs, per driver, at each depth of the "
        "layer chain; dotted in the same colour: the bare kernel operation the clone stands "
        "for, done by hand on the same disk in the same run. The gap is minifs's own cost.",
        latency,
    ),
    Plot(
        "amplification",
        "Write amplification",
        "Left: bytes the bench disk's block device received for a 4-byte update in the "
        "middle of a lower-layer file, against the file's size; the dashed line is the file "
        "itself (a whole-file copy), dotted is what making the clone wrote. Right: device "
        "bytes over bytes written, per workload. The bench measures no bare-filesystem "
        "baseline for writes; 1x is the ideal.",
        amplification,
    ),
    Plot(
        "lookup",
        "Lookup cost against layer depth",
        "stat() of a file in the bottom layer and of a name in no layer, through L-1 empty "
        "layers, cold (caches dropped), on a fresh mount, and warm. The bench measures no "
        "bare baseline for lookups: depth 1 (the file's own layer) is the reference.",
        lookup,
    ),
    Plot(
        "footprint",
        "Inodes and space per clone",
        "What one mounted clone of the image took on the bench disk (statvfs before and "
        "after), beside what the driver's own usage() reports. 'unknown': the driver keeps "
        "no inode count (btrfs, zfs).",
        footprint,
    ),
    Plot(
        "clones",
        "How many clones fit",
        "Left: clones of the image made and mounted on a small dedicated disk until one "
        "failed, with the resource that ran out, beside the count the first clone's cost "
        "predicted. Right: the same prediction for the full-size bench disk.",
        clones,
    ),
)


def write(entries: Sequence[Entry], runs: Sequence[TimedRun], out: Path) -> list[tuple[Plot, Path]]:
    """Every plot the data supports, as out/NAME.png; the ones written."""
    figures = [(plot, plot.draw(entries)) for plot in PLOTS]
    figures.append((CLI_PLOT, CLI_PLOT.draw(runs)))
    written: list[tuple[Plot, Path]] = []
    for plot, fig in figures:
        if fig is None:
            continue
        fig.suptitle(plot.title, fontsize="large", fontweight="bold")
        path = out / f"{plot.name}.png"
        fig.savefig(path)
        written.append((plot, path))
    return written
