"""Dedicated loop-backed disks for one bench run, and the sweep of stale ones.

Every driver is measured on a fresh disk made for the run, so the block
device's write counters and the filesystem's inode counts belong to that
driver alone. Disks are attached and mounted through `Resources`, which records
them; teardown, Ctrl-C and the next run's sweep after a SIGKILL all undo the
records, so no loop device or mount outlives the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from minifs import linux
from minifs.errors import InUse
from minifs.loopdisk import make_image
from minifs.resources import Resources, process_start_time

EXT4_MOUNT_OPTIONS = "noinit_itable"
"""mkfs.ext4 zeroes the journal itself but leaves the inode tables to a kernel
thread that starts within seconds of the first mount and writes 32 MiB on a
2 GiB disk; that background writing would be billed to whatever the bench
measures. With this option an idle bench disk receives nothing."""

OWNER_FILE = "owner.json"
BUSY_WAIT = 10.0
"""Seconds teardown waits for a busy bench disk to be let go (see down_patiently)."""


class BenchDisk:
    """One sparse image on a loop device, formatted and mounted unless the
    driver takes the raw device (`fstype` None)."""

    def __init__(self, workdir: Path, name: str, size: int, fstype: str | None) -> None:
        self.image = workdir / f"{name}.img"
        self.size = size
        self.fstype = fstype
        self.resources = Resources(workdir / f"{name}.run")
        self.device = ""
        self.mountpoint: Path | None = None

    def up(self, mountpoint: Path | None) -> None:
        """Make, attach and (for a filesystem) mount the disk at `mountpoint`."""
        make_image(self.image, self.size, self.fstype)
        self.device = self.resources.loop("loop", self.image)
        if self.fstype is not None and mountpoint is not None:
            options = EXT4_MOUNT_OPTIONS if self.fstype == "ext4" else ""
            self.resources.mount("mount", self.device, mountpoint, self.fstype, options)
            self.mountpoint = mountpoint

    def down(self) -> None:
        """Unmount, detach and delete; safe to call on a half-made disk."""
        down_patiently(self.resources)
        self.image.unlink(missing_ok=True)
        self.image.with_name(self.image.name + ".partial").unlink(missing_ok=True)

    def describe(self) -> dict[str, object]:
        """What a reader needs to interpret the counters: the filesystem, its
        block size, and whether the loop device bypasses the host page cache."""
        loop = Path("/sys/block") / os.path.basename(self.device) / "loop"
        try:
            direct_io = (loop / "dio").read_text().strip() == "1"
        except OSError:
            direct_io = None
        return {
            "image": str(self.image),
            "size": self.size,
            "filesystem": self.fstype,
            "block_size": os.statvfs(self.mountpoint).f_frsize if self.mountpoint else None,
            "device": self.device,
            "loop_direct_io": direct_io,
            "mount_options": EXT4_MOUNT_OPTIONS if self.fstype == "ext4" else "",
        }


def detach_mounts_under(directory: Path, keep: set[str] = frozenset()) -> None:
    """Lazily detach every mount below `directory` but those in `keep`, deepest
    first: what a failed or interrupted step left mounted (a file it held open
    may keep a mount busy, so a plain umount could fail)."""
    prefix = str(directory) + "/"
    stray = [t for t in linux.mount_targets() if t.startswith(prefix) and t not in keep]
    for target in sorted(stray, key=len, reverse=True):
        with contextlib.suppress(OSError):
            linux.umount(target, linux.MNT_DETACH)


def down_patiently(resources: Resources, wait: float = BUSY_WAIT) -> list[str]:
    """`Resources.down`, retried while a loop device is busy.

    A process that makes a private mount namespace (a container starting
    anywhere on the machine) while the bench disk is mounted holds a copy of
    that mount until it pivots away from the host's tree; the device is busy
    until then, so teardown waits for it instead of failing the run.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            return resources.down()
        except InUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def claim(workdir: Path) -> None:
    """Mark `workdir` as this process's, so a later sweep knows whether it is stale."""
    workdir.mkdir(parents=True)
    owner = {"pid": os.getpid(), "start_time": process_start_time(os.getpid())}
    (workdir / OWNER_FILE).write_text(json.dumps(owner))


def _is_stale(workdir: Path) -> bool:
    try:
        owner = json.loads((workdir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return True
    return process_start_time(owner["pid"]) != owner["start_time"]


def release(workdir: Path) -> list[str]:
    """Tear down everything under `workdir`: clone mounts first, then what the
    drivers recorded in their homes (which live on the bench disks), then the
    disks, then the directory itself. Returns what was stopped."""
    homes = sorted(workdir.glob("*/*/drivers/*/run/resources.json"))
    disks = sorted(workdir.glob("*/*.run/resources.json"))
    recorded = {
        r["target"]
        for path in (*homes, *disks)
        for r in Resources(path.parent).load()
        if r["type"] == "mount"
    }
    detach_mounts_under(workdir, keep=recorded)
    stopped = []
    for path in (*homes, *disks):
        stopped.extend(down_patiently(Resources(path.parent)))
    shutil.rmtree(workdir, ignore_errors=True)
    return stopped


def sweep_stale(bench_root: Path) -> list[str]:
    """Release the run dirs of bench processes that died without cleaning up."""
    stopped = []
    with contextlib.suppress(FileNotFoundError):
        for workdir in sorted(bench_root.iterdir()):
            if workdir.is_dir() and _is_stale(workdir):
                stopped.extend(release(workdir))
    return stopped
