"""How commands print: JSON for scripts, rich tables for people.

rich is imported only when a table is printed (it costs ~140 ms), so `--json`
and commands that print a word stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def emit(args: argparse.Namespace, data: Any, human: Callable[[], None]) -> None:
    """`data` as JSON with --json, else whatever `human` prints."""
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        human()


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(box=None, header_style="bold")
    for column in columns:
        t.add_column(column, overflow="fold")
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    # Piped output is for grep and logs: one row per line, never folded at 80.
    Console(width=None if sys.stdout.isatty() else 250).print(t)


def span(seconds: float) -> str:
    """A duration the way `docker ps` shows one: 3d, 5h, 12m, 40s."""
    whole = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def ago(when: float) -> str:
    return f"{span(time.time() - when)} ago"


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
