"""The zfs-fuse daemon: one per machine, started by minifs only when none answers.

zfs-fuse is ZFS in a userspace daemon; the `zfs`/`zpool` commands talk to it
over a fixed socket, so there is at most one per machine. A daemon that minifs
did not start is used as it is and never stopped. One minifs starts is
recorded in the starting home's resources (pid and start time) and stopped by
its `minifs down`, but only once no pool at all is imported in it any more:
other homes (or other people) may have imported theirs meanwhile.

The daemon mounts each dataset itself, as a FUSE mount in its own mount
namespace, so it is started from the minifs process (the host's namespace).
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from minifs import linux
from minifs.resources import Resources, flocked

SOCKET = "/var/run/zfs/zfs_socket"
"""Where zfs-fuse listens; fixed in its source, not configurable."""

LOCK = "/run/lock/minifs-zfs-fuse.lock"
"""Held while one minifs checks for, starts or stops the daemon, machine-wide:
two homes finding it dead at once must not both start one."""

KEY = "zfs-fuse"

ARGV = (
    "zfs-fuse",
    "--no-daemon",  # stays our child's pid, so the record names the daemon itself
    "--no-kstat-mount",  # no /zfs-kstat mount left on the host
    "--enable-xattr",  # off by default; containers need xattrs (capabilities, ACLs)
    "--fuse-mount-options",
    "default_permissions",  # the kernel checks modes, so caching attributes is safe
    "--fuse-attr-timeout",
    "3600",
    "--fuse-entry-timeout",
    "3600",
    "--vdev-cache-size",
    "0",  # as OpenZFS (off by default, since removed): a read fetches what it asks for
)
"""Explicit, so /etc/zfs/zfsrc (read by the daemon too) cannot turn xattrs off."""

START_TIMEOUT = 10.0
"""Seconds a fresh daemon gets to answer on its socket (it takes ~10 ms here)."""

STOP_GRACE = 0.3
"""zfs-fuse takes 3-4 s to exit on SIGTERM even when idle; it is only stopped
once no pool is imported in it, when there is nothing left to lose, so it gets
this long before SIGKILL."""


def answering() -> bool:
    """True when a daemon accepts connections on the socket (a stale socket
    file left by a killed daemon refuses them)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(SOCKET)
        except OSError:
            return False
    return True


def machine_lock() -> contextlib.AbstractContextManager[None]:
    """zfs-fuse is one daemon per machine: starting it is serialised machine-wide."""
    return flocked(LOCK)


def ensure(resources: Resources, log: Path) -> bool:
    """Make sure a daemon answers; start (and record) one if none does.
    Returns True when this call started it, so pools must be imported anew."""
    if answering():
        return False
    with machine_lock():
        if answering():
            return False  # another minifs started one while we waited
        resources.daemon(
            KEY,
            ARGV,
            ready=answering,
            timeout=START_TIMEOUT,
            log=log,
            idle_probe=("zpool", "list", "-H", "-o", "name"),
            lock=LOCK,
            grace=STOP_GRACE,
        )
    return True


def detach_dead_mounts(pool: str) -> list[str]:
    """Lazily detach the FUSE mounts of `pool`'s datasets that a dead daemon
    left behind ("Transport endpoint is not connected"): zfs cannot mount a
    dataset again over one. Returns the targets detached."""
    detached = []
    prefix = f"{pool}/"
    for entry in linux.mountinfo():
        if entry.fstype == "fuse.zfs" and (entry.source == pool or entry.source.startswith(prefix)):
            with contextlib.suppress(OSError):
                linux.umount(entry.target, linux.MNT_DETACH)
                detached.append(entry.target)
    return detached
