"""The unionfs-fuse engine of the aufs driver: one daemon per mounted union.

`unionfs -o cow` merges its branches as AUFS does: the first branch is the
writable one, a lookup searches the branches from the top down, a write to a
lower file copies the whole file up first, and a deletion is recorded in the
writable branch as an empty file `.unionfs-fuse/PATH_HIDDEN~` (a directory
removed and made again hides everything below it in lower branches: the
opaque directory of OCI). Records in read-only branches hide what lies below
them too, so a committed branch keeps its whiteouts in that form as it is.

Each union is served by its own daemon, recorded under its own resources file
(`<home>/run/unionfs/<sid>/resources.json`), so one union can be stopped
without touching the others and `minifs down` finds every one. A daemon runs
in the foreground of its own session; SIGTERM makes it unmount and exit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from minifs import linux
from minifs.errors import BackendError, TooManyLayers
from minifs.resources import OWNER_ENV, Resources, process_start_time

PROGRAM = "unionfs"

META_DIR = ".unionfs-fuse"
"""Where unionfs-fuse keeps its whiteout records inside a writable branch."""

ARG_MAX_STRLEN = 32 * 4096
"""The kernel's MAX_ARG_STRLEN: the longest single argument execve(2) passes
(terminating NUL included). unionfs-fuse takes all its branches in one
argument, and has no other limit of its own: this is the layer limit."""

BRANCH_SPEC_LEN = len("/" + "0" * 32 + "=RO:")
"""One branch in that argument: its path below the chroot (`/<sid>`), the
mode and the separator (the last one's separator is the NUL)."""

MAX_BRANCHES = ARG_MAX_STRLEN // BRANCH_SPEC_LEN

READY_WAIT = 10.0
"""Seconds a daemon gets to mount its union (it takes ~5 ms for a few, ~20 ms
for 3000 branches here)."""


def fsname(sid: str) -> str:
    """The mount source a union shows in mountinfo, naming its snapshot."""
    return f"minifs-aufs:{sid}"


def version() -> str:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "unionfs-fuse"],
        capture_output=True,
        text=True,
        check=False,
    )
    return f"unionfs-fuse {done.stdout.strip()}" if done.returncode == 0 else "unionfs-fuse"


def installed() -> bool:
    return shutil.which(PROGRAM) is not None


class Union:
    """The daemon serving snapshot `sid`'s union at `target`."""

    def __init__(self, run_dir: Path, sid: str, target: Path) -> None:
        self.sid = sid
        self.target = target
        self.resources = Resources(run_dir / sid)

    def running(self) -> bool:
        found = self.resources.find("unionfs")
        return found is not None and Resources.alive(found) and linux.is_mountpoint(self.target)

    def start(self, chroot: Path, writable: str | None, readonly: Sequence[str]) -> None:
        """Mount the branches (ids below `chroot`, the writable one first)
        at `target`, unless this union already serves them there."""
        count = len(readonly) + (writable is not None)
        if count > MAX_BRANCHES:
            raise TooManyLayers(
                f"{count} branches do not fit in one unionfs-fuse argument (at most "
                f"{MAX_BRANCHES}: the kernel passes 128 KiB per argument); flatten the image"
            )
        missing = [b for b in [writable, *readonly] if b and not (chroot / b).is_dir()]
        if missing:  # unionfs-fuse serves a union without them, silently, running or not
            raise BackendError(f"branch {chroot / missing[0]} of {self.sid} is missing")
        if self.running():
            return
        self.stop()  # what a dead daemon left: its record, its dead mount
        specs = ([f"/{writable}=RW"] if writable else []) + [f"/{b}=RO" for b in readonly]
        options = [
            "cow",
            "hide_meta_files",
            "use_ino",  # inode numbers of the branch files: hard links stay visible
            # No attribute cache: a copy-up creates the file in the branch's
            # directory, changing that directory's mtime behind the kernel's
            # back, and a cached one would show the old time for a second (two
            # diffs in a row would differ). Each stat asks the daemon instead.
            "attr_timeout=0",
            "allow_other",
            "suid",
            "dev",
            f"chroot={chroot}",
            f"fsname={fsname(self.sid)}",
            *([] if writable else ["ro"]),
        ]
        self.target.mkdir(parents=True, exist_ok=True)
        argv = [PROGRAM, "-f", "-o", ",".join(options), ":".join(specs), str(self.target)]
        # unionfs-fuse 1.0 writes a debug line to stderr for every entry a
        # readdir hides: its output goes nowhere (a log would fill the disk
        # the benchmark counts writes on).
        try:
            pid = self.resources.spawn("unionfs", argv)
        except BaseException:
            # Started but not recorded (a full disk refused the record): find
            # it by the owner tag every daemon minifs starts carries.
            for orphan in _tagged(self.resources.run_dir):
                os.kill(orphan, signal.SIGTERM)
            raise
        deadline = time.monotonic() + READY_WAIT
        while not linux.is_mountpoint(self.target):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if process_start_time(pid) is None or time.monotonic() > deadline:
                self.stop()
                raise BackendError(
                    f"unionfs-fuse did not mount {self.target} (branches "
                    f"{', '.join(specs[:3])}{', ...' if len(specs) > 3 else ''} under {chroot}); "
                    f"run 'minifs check' to see whether a layer is damaged"
                )
            time.sleep(0.002)

    def stop(self) -> list[str]:
        """SIGTERM the daemon (it unmounts as it exits); a mount it could not
        take along (it died, or was killed) is detached. Returns what stopped."""
        stopped: list[str] = []
        try:
            stopped = self.resources.down()
        except OSError as exc:
            # On a full disk the daemon is stopped but its record cannot be
            # rewritten without it; the record goes with its directory below.
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
        while linux.is_mountpoint(self.target):
            linux.umount(self.target, linux.MNT_DETACH)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.resources.run_dir)
        return stopped

    def shared(self) -> bool:
        """Whether a mount other than the daemon's own shows this union in this
        mount namespace (a bind of it still mounted somewhere)."""
        own = str(self.target)
        return any(
            entry.source == fsname(self.sid) and entry.target != own for entry in linux.mountinfo()
        )


def copy_directories(union: Path, branch: Path) -> None:
    """Make every directory `union` shows in the fresh `branch` too, with its
    mode, owner and times (symlinks not followed): a clone's eager directory
    copy-up.

    unionfs-fuse 1.0 copies a directory up with everything the one branch it
    found it in holds, whiteouts ignored, whenever the directory's mode, owner
    or times change (`copy_directory` in its cow.c): `rm /etc/x; touch /etc`
    brings x back, and every layer apply sets its directories' times. With
    every directory already in the writable branch no directory is ever
    copied up, and a file is copied up alone, as AUFS does."""
    made: list[tuple[Path, os.stat_result]] = []
    pending = [Path()]
    while pending:
        rel = pending.pop()
        with os.scandir(union / rel) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    target = branch / rel / entry.name
                    os.mkdir(target)
                    os.chown(target, st.st_uid, st.st_gid)  # before chmod: it clears set-id bits
                    os.chmod(target, stat.S_IMODE(st.st_mode))
                    made.append((target, st))
                    pending.append(rel / entry.name)
    root = os.lstat(union)
    os.chown(branch, root.st_uid, root.st_gid)
    os.chmod(branch, stat.S_IMODE(root.st_mode))
    made.append((branch, root))
    for target, st in reversed(made):  # children first: a mkdir changes its parent's mtime
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def sids_running(run_dir: Path) -> list[str]:
    """Snapshot ids with a union record under `run_dir`, alive or not."""
    try:
        return sorted(os.listdir(run_dir))
    except FileNotFoundError:
        return []


def _tagged(run_dir: Path) -> list[int]:
    """Pids of the processes started with `run_dir` as their MINIFS_OWNER."""
    marker = f"{OWNER_ENV}={run_dir}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read():
                    found.append(int(entry))
    return found
