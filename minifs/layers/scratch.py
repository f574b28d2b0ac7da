"""Scratch space under the state dir, and the sweep that reclaims what crashes left.

Layer spools, image import staging and private mount points live in
`<state>/tmp`, on the state dir's own disk. A process killed mid-import or
mid-apply leaves them behind, and a mount point may still have a clone mounted
on it. Imports stage without the state lock (copying a multi-GB archive under
it would stall every other command), so the lock cannot tell live work from
leftovers. The name can: every entry is named `<kind>-<pid>.<start>.<pidns>-<random>`,
its creator's pid, that process's start time (clock ticks since boot, so a
reused pid does not match) and pid namespace. `sweep` removes an entry only
when that exact process is gone, unmounting anything still mounted inside it
first and never descending into another filesystem.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from minifs import linux
from minifs.layers import safefs
from minifs.resources import owner_alive, owner_tag

_NAME = re.compile(r"(ingest|layer|mnt)-(\d+\.\d+\.\d+)-")


def scratch_dir(state_root: str | os.PathLike[str]) -> Path:
    path = Path(state_root) / "tmp"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def make_dir(where: str | os.PathLike[str], kind: str) -> Path:
    """A new private directory in `where` owned by this process (kind: ingest or mnt)."""
    return Path(tempfile.mkdtemp(prefix=f"{kind}-{owner_tag()}-", dir=where))


def make_file(where: str | os.PathLike[str] | None, kind: str, suffix: str = "") -> tuple[int, str]:
    """A new file (fd, path) in `where` (None: the system's temp dir) owned by this process."""
    return tempfile.mkstemp(prefix=f"{kind}-{owner_tag()}-", suffix=suffix, dir=where)


def unnamed_file(where: str | os.PathLike[str] | None, buffering: int = -1) -> BinaryIO:
    """A temporary file for this process only, gone when closed. It has no name
    (O_TMPFILE), so a crash leaves nothing; where the file system cannot do
    that, tempfile names it briefly, and names it so `sweep` knows it."""
    return tempfile.TemporaryFile(dir=where, prefix=f"layer-{owner_tag()}-", buffering=buffering)


def sweep(state_root: str | os.PathLike[str], dry_run: bool = False) -> list[str]:
    """Remove scratch entries whose creating process is gone; returns what it did."""
    where = Path(state_root) / "tmp"
    try:
        names = sorted(os.listdir(where))
    except FileNotFoundError:
        return []
    done = []
    for name in names:
        match = _NAME.match(name)
        if match is None or owner_alive(match.group(2)):
            continue
        path = where / name
        prefix = "would " if dry_run else ""
        mounts = sorted(
            (t for t in linux.mount_targets() if t == str(path) or t.startswith(f"{path}/")),
            key=len,
            reverse=True,
        )
        try:
            for target in mounts:
                done.append(f"{prefix}unmount leftover {target}")
                if not dry_run:
                    linux.umount(target, linux.MNT_DETACH)
            done.append(f"{prefix}remove leftover {path}")
            if not dry_run:
                _remove(where, name)
        except OSError as exc:  # one stuck entry must not stop the rest of gc
            done.append(f"cannot reclaim {path}: {exc.strerror or exc}; left in place")
    return done


def _remove(where: Path, name: str) -> None:
    """Remove `where/name` without following symlinks or leaving the filesystem
    `where` is on (a mount that appeared meanwhile is refused, not emptied)."""
    fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = safefs.lstat_at(fd, os.fsencode(name))
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode) and st.st_dev != os.fstat(fd).st_dev:
            raise OSError(f"{where / name} is still a mount point")
        safefs.remove_at(fd, os.fsencode(name), same_device=True)
    finally:
        os.close(fd)
