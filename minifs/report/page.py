"""The report as one self-contained HTML page: the plots embedded as data
URLs, the figures behind them as tables, the machine and settings of every
run, the findings, and the definition of every metric as the bench recorded
it. Nothing is fetched when it is opened: it can be mailed or archived alone.
Command-line timings (`minifs bench --cli`) have a section of their own, which
says which files it came from, as the storage sections do.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from minifs.output import human_size
from minifs.report.findings import CONFIRMS, CONTRADICTS, MET, NOT_MET, Finding
from minifs.report.plots import CLI_PLOT, Plot
from minifs.report.runs import Entry, TimedRun, command_groups, run_name
from minifs_bench.results import CACHE_STATES, METRIC_NAMES, BenchResult, CliTiming, Series

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1280px;
       padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; max-width: 70em; }
.confirms { color: #1a7f37; } .contradicts { color: #b42318; } .refused { color: #b42318; }
.verdict { font-weight: 600; font-size: 12px; text-transform: uppercase; margin-right: 0.4em; }
dl dt { font-weight: 600; margin-top: 0.4em; } dl dd { margin-left: 1.5em; color: #444; }
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(head: Sequence[str], rows: Iterable[Sequence[object]], left: int = 2) -> str:
    """An HTML table; the first `left` columns are words, the rest figures."""

    def cells(tag: str, values: Sequence[object]) -> str:
        return "".join(
            f"<{tag}{' class=l' if i < left else ''}>{_e(v)}</{tag}>" for i, v in enumerate(values)
        )

    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f"<table><tr>{cells('th', head)}</tr>{body}</table>"


def _spread(series: Series | None, digits: int = 2, unknown: str = "-") -> str:
    """median (min-max) of the raw samples."""
    if series is None:
        return unknown
    if series.n == 1:
        return f"{series.median:.{digits}f}"
    return f"{series.median:.{digits}f} ({series.min:.{digits}f}-{series.max:.{digits}f})"


def _size(series: Series | None, unknown: str = "-") -> str:
    if series is None:
        return unknown
    if series.n == 1 or series.min == series.max:
        return human_size(series.median)
    return f"{human_size(series.median)} ({human_size(series.min)}-{human_size(series.max)})"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _runs(results: Sequence[BenchResult]) -> str:
    rows = []
    for r in results:
        m = r.machine
        commit = (r.git_commit or "unknown")[:12] + (" (dirty)" if r.git_dirty else "")
        rows.append(
            (
                r.path.name,
                run_name(r),
                ", ".join(r.drivers),
                f"{r.layers} / {r.runs}",
                m.kernel,
                f"{m.cpu}, {m.cpus} CPUs",
                "-" if m.memory_bytes is None else human_size(m.memory_bytes),
                m.bench_disk_on,
                commit,
                "partial" if r.partial else "complete",
                "; ".join(f"{n}: {why}" for n, why in r.skipped.items()) or "-",
            )
        )
    return _table(
        (
            "file",
            "started",
            "drivers",
            "layers / runs",
            "kernel",
            "cpu",
            "memory",
            "bench images on",
            "commit",
            "state",
            "skipped",
        ),
        rows,
        left=11,
    )


VERDICT_CSS = {
    CONFIRMS: "confirms",
    CONTRADICTS: "contradicts",
    MET: "confirms",
    NOT_MET: "contradicts",
}


def _findings(results: Sequence[BenchResult | CliTiming], found: dict[Path, list[Finding]]) -> str:
    parts = []
    for r in results:
        if len(results) > 1:
            parts.append(f"<h3>{_e(run_name(r))} ({_e(r.path.name)})</h3>")
        items = []
        for f in found.get(r.path, []):
            css = VERDICT_CSS.get(f.verdict, "")
            badge = f'<span class="verdict {css}">{_e(f.verdict)}</span>' if css else ""
            items.append(f"<li>{badge}{_e(f.text)}</li>")
        parts.append(f"<ul>{''.join(items)}</ul>" if items else "<p>No finding.</p>")
    return "".join(parts)


def _latency_table(entries: Sequence[Entry]) -> str:
    rows = []
    for e in entries:
        lat = e.driver.latency
        for p in lat.points if lat else ():
            rows.append(
                (
                    e.label,
                    p.depth,
                    _spread(p.create),
                    _spread(p.bare_create),
                    _ratio(p.create_overhead),
                    _spread(p.delete),
                    _spread(p.bare_delete),
                    _ratio(p.delete_overhead),
                )
            )
    head = (
        "driver",
        "depth",
        "create ms",
        "bare create ms",
        "create x",
        "delete ms",
        "bare delete ms",
        "delete x",
    )
    return _table(head, rows, left=1) if rows else ""


def _amplification_table(entries: Sequence[Entry]) -> str:
    rows = []
    for e in entries:
        amp = e.driver.amplification
        for w in amp.workloads if amp else ():
            rows.append(
                (
                    e.label,
                    w.name,
                    human_size(w.file_size) if w.file_size else "new",
                    human_size(w.logical_bytes),
                    _size(w.device),
                    _spread(w.amplification, 1),
                    _size(w.clone_device),
                    _spread(w.clone_inodes, 0, unknown="unknown"),
                )
            )
    head = (
        "driver",
        "workload",
        "file",
        "written",
        "device bytes",
        "amplification x",
        "clone device bytes",
        "clone inodes",
    )
    return _table(head, rows, left=2) if rows else ""


def _lookup_table(entries: Sequence[Entry]) -> str:
    keys = [(op, state) for op in ("stat", "read", "miss") for state in CACHE_STATES]
    rows = []
    for e in entries:
        lk = e.driver.lookup
        for p in lk.points if lk else ():
            rows.append((e.label, p.depth, *(_spread(p.time(*k), 1) for k in keys)))
    head = ("driver", "depth", *(f"{op} {state} µs" for op, state in keys))
    return _table(head, rows, left=1) if rows else ""


def _footprint_table(entries: Sequence[Entry]) -> str:
    rows = []
    for e in entries:
        fp = e.driver.footprint
        if fp is None:
            continue
        for what, cost in (("per layer", fp.layer), ("per mounted clone", fp.clone)):
            if cost is not None:
                rows.append(
                    (
                        e.label,
                        what,
                        _spread(cost.inodes, 0, unknown="unknown"),
                        _size(cost.bytes),
                        _spread(cost.driver_inodes, 0, unknown="unknown"),
                        _size(cost.driver_bytes),
                    )
                )
    head = ("driver", "what", "inodes", "bytes", "driver: inodes", "driver: bytes")
    table = _table(head, rows) if rows else ""
    rows = []
    for e in entries:
        fp = e.driver.footprint
        run = fp.scenario if fp else None
        if fp is None or run is None:
            continue
        bench = fp.bench_disk
        rows.append(
            (
                e.label,
                human_size(run.disk_size),
                run.clones,
                run.first_exhausted,
                "-" if run.bytes_free_at_end is None else human_size(run.bytes_free_at_end),
                "-" if not run.predicted or run.predicted.clones is None else run.predicted.clones,
                "-" if not bench or bench.clones is None else f"{bench.clones:.0f}",
                "-" if not bench else bench.first_exhausted,
            )
        )
    head = (
        "driver",
        "small disk",
        "clones",
        "ran out first",
        "free at end",
        "predicted",
        "bench disk fits",
        "its limit",
    )
    return table + (_table(head, rows, left=1) if rows else "")


TABLES = {
    "latency": ("Create and delete latency, ms", _latency_table),
    "amplification": ("Write amplification", _amplification_table),
    "lookup": ("Lookups, µs", _lookup_table),
    "footprint": ("Inodes, space and clones that fit", _footprint_table),
}


def _definitions(results: Sequence[BenchResult]) -> str:
    """Every metric's definitions as the runs recorded them (the first
    wording of each term wins, so a term is defined once)."""
    parts = []
    for metric in METRIC_NAMES:
        seen: dict[str, str] = {}
        for r in results:
            for d in r.drivers.values():
                record = getattr(d, metric)
                for key, text in (record.definitions if record else {}).items():
                    seen.setdefault(key, text)
        if seen:
            items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in seen.items())
            parts.append(f"<h3>{_e(metric)}</h3><dl>{items}</dl>")
    return "".join(parts)


def _figure(plot: Plot, path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<h2 id="{_e(plot.name)}">{_e(plot.title)}</h2><figure>'
        f'<img alt="{_e(plot.title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(plot.caption)}</figcaption></figure>"
    )


def _files(results: Sequence[BenchResult | CliTiming]) -> str:
    return ", ".join(f"<code>{_e(r.path.name)}</code>" for r in results)


def _timing_runs(runs: Sequence[TimedRun]) -> str:
    rows = []
    for r in runs:
        t, m = r.timing, r.timing.machine
        commit = (t.git_commit or "unknown")[:12] + (" (dirty)" if t.git_dirty else "")
        rows.append(
            (
                t.path.name,
                r.label,
                f"{t.rounds} (+{t.warmup_rounds} warm-up)",
                "-" if t.wall_seconds is None else f"{t.wall_seconds:.1f}",
                m.kernel,
                f"{m.cpu}, {m.cpus} CPUs",
                " ".join(f"{v:.2f}" for v in t.load_average_end) or "-",
                "; ".join(f"{k}: {v}" for k, v in t.versions.items()) or "-",
                commit,
                "partial: " + ("; ".join(t.errors) or "interrupted") if t.partial else "complete",
                "; ".join(f"{k}: {why}" for k, why in t.skipped.items()) or "-",
            )
        )
    head = (
        "file",
        "run",
        "rounds",
        "took s",
        "kernel",
        "cpu",
        "load at end",
        "versions",
        "commit",
        "state",
        "left out",
    )
    return _table(head, rows, left=11)


def _timing_tables(runs: Sequence[TimedRun]) -> str:
    """Every command of every run (median, min-max, n, and each step's
    median), then every comparison with its target and verdict."""
    rows = []
    for key in (k for g in command_groups([r.timing for r in runs]) for k in g):
        for r in runs:
            command = r.timing.commands.get(key)
            if command is None:
                continue
            s = command.samples
            steps = " + ".join(f"{step.median:.1f}" for step in command.steps) or "-"
            rows.append(
                (
                    command.label,
                    r.label,
                    f"{s.median:.1f}",
                    f"{s.min:.1f}-{s.max:.1f}",
                    s.n,
                    steps,
                )
            )
    commands = _table(("command", "run", "median ms", "min-max ms", "n", "steps ms"), rows)
    rows = []
    for r in runs:
        for c in r.timing.comparisons:
            if c.ratio is None:
                verdict = f"not measured: {c.reason}"
            elif c.target is None:
                verdict = "for comparison only"
            else:
                verdict = "met" if c.met else "NOT met"
            rows.append(
                (
                    r.timing.name(c.minifs),
                    r.timing.name(c.peer),
                    r.label,
                    _ratio(c.ratio),
                    _ratio(c.paired),
                    "-" if c.target is None else f"<= {c.target:.1f}",
                    verdict,
                )
            )
    head = ("minifs", "against", "run", "ratio of medians", "paired ratio", "target", "verdict")
    return commands + _table(head, rows, left=3)


def _timing(
    runs: Sequence[TimedRun], plots: Sequence[tuple[Plot, Path]], found: dict[Path, list[Finding]]
) -> str:
    """The command-line timing section: where it came from, how it was
    measured, its findings, its plot and its tables."""
    timings = [r.timing for r in runs]
    how = "".join(
        f"<dt>{_e(word)}</dt><dd>{_e(text)}</dd>"
        for word, text in (
            ("clock", next((t.clock for t in timings if t.clock), None)),
            ("order", next((t.order for t in timings if t.order), None)),
        )
        if text
    )
    figure = "".join(_figure(plot, path) for plot, path in plots if plot.name == CLI_PLOT.name)
    return (
        "<h1>Command-line timing</h1>"
        f"<p>From {_files(timings)}, written by <code>minifs bench --cli</code>: whole "
        "commands as a user types them, minifs beside its peers on the same machine in the "
        "same rounds. Figures are medians of the raw samples in ms.</p>"
        f"<h2>Runs</h2>{_timing_runs(runs)}<dl>{how}</dl>"
        f"<h2>Findings</h2>{_findings(timings, found)}"
        f"{figure}"
        f"<h2>The figures</h2>{_timing_tables(runs)}"
    )


def _storage(
    results: Sequence[BenchResult],
    entries: Sequence[Entry],
    plots: Sequence[tuple[Plot, Path]],
    found: dict[Path, list[Finding]],
) -> str:
    """The storage bench's sections: runs, findings, plots, tables, definitions."""
    figures = "".join(_figure(plot, path) for plot, path in plots if plot.name != CLI_PLOT.name)
    tables = "".join(
        f"<h3>{_e(title)}</h3>{body}" for title, make in TABLES.values() if (body := make(entries))
    )
    return (
        "<h1>Storage drivers</h1>"
        f"<p>From {_files(results)}, written by <code>minifs bench</code>. Figures are medians "
        "of the raw samples, with their minimum and maximum in parentheses; every plot's bars "
        "span the same.</p>"
        f"<h2>Runs: machine and settings</h2>{_runs(results)}"
        f"<h2>Findings</h2>{_findings(results, found)}"
        f"{figures}"
        f"<h2>The figures</h2>{tables}"
        f"<h2>Definitions</h2>{_definitions(results)}"
    )


def render(
    results: Sequence[BenchResult],
    entries: Sequence[Entry],
    runs: Sequence[TimedRun],
    plots: Sequence[tuple[Plot, Path]],
    found: dict[Path, list[Finding]],
    refused: Sequence[str],
) -> str:
    """The whole page: the storage bench's sections, then the command-line
    timing's, each only when it has files."""
    refused_html = (
        "<h2>Files left out</h2><ul>"
        + "".join(f'<li class="refused">{_e(r)}</li>' for r in refused)
        + "</ul>"
        if refused
        else ""
    )
    made = time.strftime("%Y-%m-%d %H:%M %Z")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        "<title>minifs report</title>"
        f"<style>{STYLE}</style></head><body>"
        "<h1>minifs report</h1>"
        f"<p>Made {_e(made)} by <code>minifs report</code> from {len(results)} bench "
        f"result(s) and {len(runs)} command-line timing file(s).</p>"
        f"{refused_html}"
        f"{_storage(results, entries, plots, found) if results else ''}"
        f"{_timing(runs, plots, found) if runs else ''}"
        "</body></html>\n"
    )
