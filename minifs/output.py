"""How commands print: JSON for scripts, rich tables for people.

rich is imported only when a table is printed (it costs ~140 ms), so `--json`
and commands that print a word stay fast.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import Any

LONGEST_WORD = 400
"""Most characters of one word (a name, a path) an error line repeats: longer
ones are what a fuzzer or a runaway script passes, and ten thousand of them
would bury the message."""


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
    # Cells are data, never rich markup or emoji codes: a name `a:b:c` or a
    # command `echo [red]` must print as given.
    console = Console(width=None if sys.stdout.isatty() else 250, markup=False, emoji=False)
    console.print(t, highlight=False)


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


def shown(text: str) -> str:
    """`text` made fit for one line of a terminal: control characters (a newline
    in a path, a backend's multi-line complaint) escaped, and a word longer than
    LONGEST_WORD cut in the middle, keeping its ends and saying how much went."""

    def cut(match: re.Match[str]) -> str:
        word = match[0]
        return f"{word[:60]}…({len(word) - 80} more)…{word[-20:]}"

    text = re.sub(r"[\x00-\x1f\x7f]", lambda m: " " if m[0] == "\t" else repr(m[0])[1:-1], text)
    return re.sub(rf"\S{{{LONGEST_WORD + 1},}}", cut, text)


def error(message: str) -> None:
    """Print a user error the one way minifs prints them, on stderr."""
    print(f"minifs: error: {shown(message)}", file=sys.stderr)


def each(names: Iterable[str], action: Callable[[str], None]) -> int:
    """Run `action` on every name, as `docker rm a b c` does: a failure on one
    is reported on its own line and the rest still run; the exit status is the
    first failure's (0 when none failed)."""
    from minifs.errors import MinifsError

    status = 0
    for name in names:
        try:
            action(name)
        except MinifsError as exc:
            error(str(exc))
            status = status or exc.exit_code
    return status
