"""What the bench reads from the kernel: block-device write counters, statvfs
inode and block counts, and the page cache it drops for cold measurements.

Write amplification is counted where it cannot be faked: the sectors the bench
disk's block device actually received (/sys/block/<dev>/stat), after syncfs has
pushed everything the workload dirtied down to it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from minifs import linux

SECTOR = 512
"""/sys/block/*/stat counts 512-byte sectors whatever the device's block size."""


class WriteCounter:
    """Bytes a block device has received since it was attached."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stat_path = Path("/sys/block") / os.path.basename(device) / "stat"

    def bytes_written(self) -> int:
        # Field 7 of the stat file is "sectors written" (Documentation/block/stat.rst).
        return int(self.stat_path.read_text().split()[6]) * SECTOR


class WriteMeter:
    """Bytes a device received between `start` and `stop`.

    Every path in `sync` is syncfs'd at both ends: before, so earlier dirt is
    not billed to the work; after, so all of the work's dirt reaches the device.
    """

    def __init__(self, counter: WriteCounter, sync: Sequence[Path]) -> None:
        self.counter = counter
        self.sync = list(sync)
        self._start = 0

    def _synced(self) -> int:
        for path in self.sync:
            linux.syncfs(path)
        return self.counter.bytes_written()

    def start(self) -> None:
        self._start = self._synced()

    def stop(self) -> int:
        return self._synced() - self._start

    def measure(self, work: Callable[[], object]) -> int:
        self.start()
        work()
        return self.stop()


@dataclass(frozen=True)
class FsCounts:
    """One statvfs reading of a filesystem."""

    inodes_total: int
    inodes_free: int
    bytes_total: int
    bytes_free: int

    @property
    def inodes_used(self) -> int:
        return self.inodes_total - self.inodes_free

    @property
    def bytes_used(self) -> int:
        return self.bytes_total - self.bytes_free

    def to_dict(self) -> dict[str, int]:
        return {
            "inodes_total": self.inodes_total,
            "inodes_free": self.inodes_free,
            "bytes_total": self.bytes_total,
            "bytes_free": self.bytes_free,
        }


def fs_counts(path: Path) -> FsCounts:
    """statvfs of `path`; free counts include root's reserve, as the bench runs as root."""
    st = os.statvfs(path)
    return FsCounts(
        inodes_total=st.f_files,
        inodes_free=st.f_ffree,
        bytes_total=st.f_blocks * st.f_frsize,
        bytes_free=st.f_bfree * st.f_frsize,
    )


def drop_caches(sync: Sequence[Path]) -> None:
    """Drop the page cache, dentries and inodes machine-wide (the only way the
    kernel offers), after syncfs so that the bench disk's pages are all clean
    and really go."""
    for path in sync:
        linux.syncfs(path)
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
        f.write("3")


def elapsed_ms(start_ns: int) -> float:
    return (time.perf_counter_ns() - start_ns) / 1e6
