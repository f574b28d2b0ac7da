"""Layer tars on named snapshots of any driver.

A driver with an overlay diff dir (`Driver.diff_dir`) is written and read
there directly, in overlayfs's whiteout form. Any other driver holds full
trees: its snapshot is mounted (through its own mount records and the shared
mounter, in a private directory under the state dir, unmounted after) and gets
real deletes; a diff compares it with its parent layer mounted read-only.
An apply holds its clone's own lock and takes the state lock only for the
clone's state changes, so other commands go on while it writes; a diff holds
the state lock throughout (nothing may change what it reads).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from minifs import mounter
from minifs.errors import InvalidArgument
from minifs.layers import scratch
from minifs.layers.apply import LayerStats, apply_layer
from minifs.layers.diff import DiffStats, write_diff
from minifs.model import Info, Kind
from minifs.storage import Storage


def scratch_dir(storage: Storage) -> Path:
    """Where spools and private mount points go: under the state dir, on its disk
    (named for their owner, so `minifs gc` can reclaim what a crash left)."""
    return scratch.scratch_dir(storage.state.root)


@contextlib.contextmanager
def mounted(storage: Storage, info: Info) -> Iterator[Path]:
    """`info` mounted by its own records in a private directory, for this block only."""
    records = storage.records(info)
    where = scratch.make_dir(scratch_dir(storage), "mnt")
    try:
        with mounter.mounted(records, where):
            yield where
    finally:
        with contextlib.suppress(OSError):
            where.rmdir()


def apply_to(
    storage: Storage,
    name: str,
    source: str | os.PathLike[str] | BinaryIO,
    *,
    expected_diff_id: str | None = None,
    allow_devices: bool = True,
    limit: int | None = None,
) -> LayerStats:
    """Apply a layer tar to clone `name`; a refused layer leaves it untouched,
    and one cut short (a crash, a full disk) leaves it marked partly applied."""
    with storage.applying(name) as (info, start):
        options = {
            "expected_diff_id": expected_diff_id,
            "allow_devices": allow_devices,
            "limit": limit,
            "spool_dir": scratch_dir(storage),
            "before_writing": lambda stats: start(stats.diff_id),
        }
        diff, lowers = storage.diff_dirs(info)
        if diff is not None:
            return apply_layer(source, diff, overlay=True, lowers=lowers, **options)  # type: ignore[arg-type]
        with mounted(storage, info) as root:
            return apply_layer(source, root, **options)  # type: ignore[arg-type]


def diff_of(storage: Storage, name: str, out: BinaryIO) -> DiffStats:
    """Write the layer tar of what clone or layer `name` changed over its parent."""
    with storage.changing():
        info = storage.stat(name)
        if info.kind is Kind.VIEW:
            raise InvalidArgument(f"{name} is a view; it changes nothing, so it has no diff")
        diff, _ = storage.diff_dirs(info)
        if diff is not None:
            return write_diff(out, diff, overlay=True)
        parent = storage.get_id(info.parent_id) if info.parent_id else None
        with contextlib.ExitStack() as stack:
            new_root = stack.enter_context(mounted(storage, info))
            old_root = stack.enter_context(mounted(storage, parent)) if parent else None
            return write_diff(out, new_root, old_root)
