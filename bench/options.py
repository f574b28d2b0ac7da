"""The `minifs bench` command-line options.

Imported by `minifs.cli` while it builds its parser, so it imports nothing but
argparse: `minifs --help` must not pay for rich, pluggy or the bench itself.
"""

from __future__ import annotations

import argparse

METRICS = ("latency", "amplification", "lookup", "footprint")
"""Metric groups, in the order they run; `footprint` is inodes and space."""

DEFAULT_LAYERS = 50
DEFAULT_RUNS = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--driver",
        "-d",
        default="overlay2",
        metavar="D[,D2...]|all",
        help="drivers to measure, comma-separated, or 'all' for every one that runs here "
        "(default overlay2)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=DEFAULT_LAYERS,
        metavar="N",
        help=f"deepest layer chain to sweep to (default {DEFAULT_LAYERS})",
    )
    parser.add_argument(
        "--metrics",
        default=",".join(METRICS),
        metavar="M[,M2...]",
        help=f"which to measure: {', '.join(METRICS)} (inodes and space; default all)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=DEFAULT_RUNS,
        metavar="R",
        help=f"repetitions of every measurement (default {DEFAULT_RUNS})",
    )
    parser.add_argument(
        "--disk-size",
        default="auto",
        metavar="SIZE",
        help="size of each driver's dedicated loop-backed bench disk, e.g. 4G "
        "(default auto: what the run needs, at least 2G; the image is sparse)",
    )
    parser.add_argument(
        "--cli",
        action="store_true",
        help="time whole minifs commands (run, clone+rm, ls, --help) beside runc, containerd, "
        "docker and python instead of the drivers; --runs R sets the rounds",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="where to write the JSON results (default results/<driver>-<timestamp>.json)",
    )
