"""`minifs report FILES… [--out DIR]`: bench results as PNG plots, one
self-contained HTML page and a terminal summary with findings in words.

Only argparse is imported to build the parser; matplotlib (over a second to
import) is loaded when the command runs, so no other command pays for it.
"""

from __future__ import annotations

import argparse
import os

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import Any

DEFAULT_OUT = "results/report"


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path  # not at the top: ~4 ms that every other command would pay

    from rich.console import Console

    from minifs.errors import InvalidArgument
    from minifs.output import error
    from minifs.report.runs import entries, load, timed_runs

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidArgument(f"--out {out} is not a directory; name a directory for the report")
    loaded = load([Path(f) for f in args.files])
    if not loaded.results and not loaded.timings:  # one line per file; the last is the error
        for reason in loaded.refused[:-1]:
            error(reason)
        raise InvalidArgument(loaded.refused[-1])
    for reason in loaded.refused:
        error(reason)
    from minifs.report import page, plots
    from minifs.report.findings import findings
    from minifs.report.summary import print_report

    out.mkdir(parents=True, exist_ok=True)
    series = entries(loaded.results)
    runs = timed_runs(loaded.timings)
    found = {r.path: findings(r) for r in [*loaded.results, *loaded.timings]}
    drawn = plots.write(series, runs, out)
    html = out / "report.html"
    tmp = out / f".report.html.{os.getpid()}.tmp"
    tmp.write_text(page.render(loaded.results, series, runs, drawn, found, loaded.refused))
    os.replace(tmp, html)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped into a log: do not fold the table to 80 columns
    written = [html, *(path for _, path in drawn)]
    print_report(console, loaded.results, series, runs, found, written)
    return 2 if loaded.refused else 0


def add_report_parser(sub: Any) -> None:
    """Add `report` to the top-level subparsers `sub`."""
    from minifs.arguments import path

    help = "plot bench results: PNGs, one HTML page and findings in words"
    p = sub.add_parser(
        "report",
        help=help,
        description=help + ". Several files (drivers, runs, machines) are shown side by side.",
    )
    p.set_defaults(func=cmd_report)
    p.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        type=path,
        help="results JSON files ('minifs bench' or 'minifs bench --cli')",
    )
    p.add_argument(
        "--out",
        "-o",
        default=DEFAULT_OUT,
        metavar="DIR",
        type=path,
        help=f"directory for report.html and the PNGs (default {DEFAULT_OUT})",
    )
