"""What the bench reads from the kernel: block-device read and write counters,
statvfs inode and block counts, and the caches it drops for cold measurements.

Write amplification is counted where it cannot be faked: the sectors the bench
disk's block device actually received (/sys/block/<dev>/stat), after the
driver's flush (syncfs, or a zpool's forced commit) has pushed everything the
workload dirtied down to it. The same counters show
whether a "cold" lookup really went to the device.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from minifs import linux
from minifs.errors import BackendError

SECTOR = 512
"""/sys/block/*/stat counts 512-byte sectors whatever the device's block size."""


class DeviceCounter:
    """Bytes a block device has read and written since it was attached.

    The kernel's counters are cumulative over the device's life (a reused
    /dev/loopN keeps counting), so only differences between two readings mean
    anything. They count what the filesystem on the device submitted, once: a
    loop device's own writes to its backing file go to another device.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.stat_path = Path("/sys/block") / os.path.basename(device) / "stat"

    def _sectors(self, field: int) -> int:
        # Fields 3 and 7 are "sectors read" and "sectors written" (Documentation/block/stat.rst).
        return int(self.stat_path.read_text().split()[field]) * SECTOR

    def bytes_read(self) -> int:
        return self._sectors(2)

    def bytes_written(self) -> int:
        return self._sectors(6)


class WriteMeter:
    """Bytes a device received between `start` and `stop`.

    `flush` (the driver's: syncfs of its filesystem, a forced commit of a
    zpool) runs at both ends: before, so earlier dirt is not billed to the
    work; after, so all of the work's dirt (data, journal, and the metadata
    written home) has reached the device. Whatever a flush writes by itself
    with nothing dirty (a zpool's forced commit does) is in every reading;
    `idle` measures it, so it can be reported and taken off.
    """

    def __init__(self, counter: DeviceCounter, flush: Callable[[], None]) -> None:
        self.counter = counter
        self.flush = flush
        self._start = 0

    def _synced(self) -> int:
        self.flush()
        return self.counter.bytes_written()

    def start(self) -> None:
        self._start = self._synced()

    def stop(self) -> int:
        return self._synced() - self._start

    def measure(self, work: Callable[[], object]) -> int:
        self.start()
        work()
        return self.stop()

    def idle(self) -> int:
        """What one reading costs with no work at all: the flush's own writes."""
        return self.measure(lambda: None)


@dataclass(frozen=True)
class FsCounts:
    """One reading of the space where a driver keeps its data. Inode counts are
    None where there is no fixed number of them (btrfs, zfs)."""

    inodes_total: int | None
    inodes_free: int | None
    bytes_total: int
    bytes_free: int

    @property
    def inodes_used(self) -> int | None:
        if self.inodes_total is None or self.inodes_free is None:
            return None
        return self.inodes_total - self.inodes_free

    @property
    def bytes_used(self) -> int:
        return self.bytes_total - self.bytes_free

    def to_dict(self) -> dict[str, int | None]:
        return asdict(self)


def inodes_taken(before: FsCounts, after: FsCounts) -> int | None:
    """Inodes used between two readings, None when they are not counted."""
    if before.inodes_used is None or after.inodes_used is None:
        return None
    return after.inodes_used - before.inodes_used


def fs_counts(path: Path) -> FsCounts:
    """statvfs of `path`; free counts include root's reserve, as the bench runs as root."""
    st = os.statvfs(path)
    return FsCounts(
        inodes_total=st.f_files,
        inodes_free=st.f_ffree,
        bytes_total=st.f_blocks * st.f_frsize,
        bytes_free=st.f_bfree * st.f_frsize,
    )


def drop_caches(fs: Path | None, fstype: str | None) -> None:
    """Drop the page cache, dentries and inodes machine-wide (the only way the
    kernel offers), so the next lookup on `fs` must read from its device.

    syncfs first, so that the bench disk's pages are clean and can go. On ext4
    that is not enough: metadata blocks of recent transactions stay pinned in
    memory by the journal's checkpoint lists until the journal is checkpointed,
    and a "cold" lookup of a freshly made tree would read nothing at all. So
    the journal is checkpointed too (EXT4_IOC_CHECKPOINT, Linux 5.13+). With no
    filesystem (a driver on the raw device) the caller has flushed the driver.
    """
    if fs is not None:
        linux.syncfs(fs)
        if fstype == "ext4":
            _checkpoint_journal(fs)
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
        f.write("3")


EXT4_IOC_CHECKPOINT = 0x4004662B
"""_IOW('f', 43, __u32): flush ext4's journal and write everything home."""


def _checkpoint_journal(fs: Path) -> None:
    fd = os.open(fs, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, EXT4_IOC_CHECKPOINT, struct.pack("I", 0))
    except OSError as exc:
        raise BackendError(
            f"cannot checkpoint the journal of {fs} ({exc.strerror}), so cold lookups "
            "would not be cold; run the lookup metric on Linux 5.13 or newer"
        ) from None
    finally:
        os.close(fd)


def elapsed_ms(start_ns: int) -> float:
    return (time.perf_counter_ns() - start_ns) / 1e6
