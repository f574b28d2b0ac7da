"""The summary printed at the end of a run: one rich table per metric, every
driver side by side, each table followed by the definitions of its columns."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.table import Table

from minifs.output import human_size


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _med(summary: dict, key: str, digits: int = 2) -> str:
    """The median of `key`; "unknown" for a count the driver does not keep."""
    if key in summary and summary[key] is None:
        return "unknown"
    entry = summary.get(key)
    return "-" if not entry or not entry.get("n") else _num(entry["median"], digits)


def _size(summary: dict, key: str) -> str:
    entry = summary.get(key)
    return "-" if not entry or not entry.get("n") else human_size(entry["median"])


def _table(title: str, columns: Sequence[str]) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold", box=None)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < 2 else "right")
    return table


def _definitions(console: Console, definitions: dict[str, str]) -> None:
    for key, text in definitions.items():
        console.print(f"  [dim]{key}: {text}[/dim]", highlight=False)
    console.print()


def _metrics(doc: dict, metric: str) -> Iterable[tuple[str, dict]]:
    for name, entry in doc["drivers"].items():
        record = entry.get("metrics", {}).get(metric)
        if record and record.get("definitions"):
            yield name, record


def print_summary(doc: dict, console: Console) -> None:
    settings = doc["settings"]
    state = "PARTIAL " if doc["partial"] else ""
    console.print(
        f"[bold]{state}minifs bench[/bold]: {', '.join(doc['drivers']) or 'no driver'}, "
        f"--layers {settings['layers']}, --runs {settings['runs']}, "
        f"{_num(doc['wall_seconds'], 1)} s on {doc['machine']['cpus']} CPUs, "
        f"kernel {doc['machine']['kernel']}"
    )
    for name, reason in doc["skipped"].items():
        console.print(f"  skipped {name}: {reason}")
    console.print()
    _latency(doc, console)
    _amplification(doc, console)
    _lookup(doc, console)
    _footprint(doc, console)
    for name, entry in doc["drivers"].items():
        console.print(f"{name}: {_num(entry.get('wall_seconds'), 1)} s")
        for error in entry.get("errors", []):
            console.print(f"  [red]error[/red] {error}", highlight=False)


def _latency(doc: dict, console: Console) -> None:
    found = list(_metrics(doc, "latency"))
    if not found:
        return
    table = _table(
        "create / delete latency, ms (median, p95 in brackets)",
        ("driver", "depth", "create", "delete", "driver only", "bare", "create x", "delete x"),
    )
    for name, record in found:
        for point in record["points"]:
            s = point.get("summary", {})
            if not s:
                continue
            create = s["create"]
            table.add_row(
                name,
                str(point["depth"]),
                f"{create['median']:.2f} [{create['p95']:.2f}]",
                _med(s, "delete"),
                _med(s, "driver_create"),
                _med(s, "bare_create"),
                _num(point["overhead"]["create"]),
                _num(point["overhead"]["delete"]),
            )
        commit = record["commit"]["summary"]
        if commit.get("n"):
            table.add_row(name, "commit", f"{commit['median']:.2f} [{commit['p95']:.2f}]")
    console.print(table)
    _definitions(console, found[0][1]["definitions"])


def _amplification(doc: dict, console: Console) -> None:
    found = list(_metrics(doc, "amplification"))
    if not found:
        return
    table = _table(
        "write amplification (medians)",
        (
            "driver",
            "workload",
            "file",
            "written",
            "device",
            "net",
            "amplification x",
            "net x",
            "clone device",
            "clone net",
            "clone inodes",
        ),
    )
    for name, record in found:
        for w in record["workloads"]:
            s = w.get("summary")
            if not s:
                continue
            table.add_row(
                name,
                w["workload"],
                human_size(w["file_size"]) if w["file_size"] else "new",
                human_size(w["logical_bytes"]),
                _size(s, "device_bytes"),
                _size(s, "device_bytes_net"),
                _med(s, "amplification", 1),
                _med(s, "amplification_net", 1),
                _size(s, "clone_device_bytes"),
                _size(s, "clone_device_bytes_net"),
                _med(s, "clone_inodes", 0),
            )
    console.print(table)
    for name, record in found:
        idle = record.get("idle_flush", {}).get("summary", {})
        if idle.get("n"):
            console.print(
                f"  {name}: idle flush {human_size(idle['median'])} (median of {idle['n']}, "
                f"{human_size(idle['min'])} .. {human_size(idle['max'])}), taken off in net",
                highlight=False,
            )
    _definitions(console, found[0][1]["definitions"])


def _lookup(doc: dict, console: Console) -> None:
    found = list(_metrics(doc, "lookup"))
    if not found:
        return
    columns = [
        f"{op} {state}" for op in ("stat", "read", "miss") for state in ("cold", "first", "warm")
    ]
    table = _table("layer-depth lookup, µs (medians)", ("driver", "depth", *columns))
    for name, record in found:
        for point in record["points"]:
            s = point.get("summary", {})
            if s:
                table.add_row(
                    name,
                    str(point["depth"]),
                    *(_med(s, c.replace(" ", "_"), 1) for c in columns),
                )
    console.print(table)
    for name, record in found:
        if record.get("not_cold"):
            console.print(
                f"  [red]{name}: {record['not_cold']} cold lookups read nothing from the bench "
                "disk; their figures are not cold[/red]",
                highlight=False,
            )
    _definitions(console, found[0][1]["definitions"])


def _footprint(doc: dict, console: Console) -> None:
    found = list(_metrics(doc, "footprint"))
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
    for name, record in found:
        for what, key in (("per layer", "layer"), ("per clone", "clone")):
            s = record.get(key, {}).get("summary")
            if not s:
                continue
            suffix = "_mounted" if key == "clone" else ""
            table.add_row(
                name,
                what + (" (mounted)" if suffix else ""),
                _med(s, "inodes" + suffix, 0),
                _size(s, "bytes" + suffix),
                f"{_size(s, 'driver_bytes')}, {_med(s, 'driver_inodes', 0)} inodes",
            )
        run = record.get("scenario")
        bench = record.get("bench_disk")
        if run and bench:
            scenario.add_row(
                name,
                human_size(run["disk_size"]),
                str(run["clones"]),
                run["first_exhausted"],
                human_size(run["at_end"]["bytes_free"]),
                _num((run["predicted"] or {}).get("predicted_clones"), 0),
                _num(bench["predicted_clones"], 0),
                str(bench["predicted_first_exhausted"]),
            )
    console.print(table)
    console.print(scenario)
    _definitions(console, found[0][1]["definitions"])
