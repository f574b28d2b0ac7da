"""One driver's bench session: its Storage on its own disk, and the layers the
metrics share (the image, and the empty-layer chain stacked on it).

Everything goes through the core API users have (`Storage` for snapshots,
`mounter` for mounts): a driver hands back mount records and the bench mounts
them itself, so prepare, mount, write and commit are timed apart.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from minifs import mounter
from minifs.model import Mount
from minifs.plugins import get_driver
from minifs.state import StateDir
from minifs.storage import Storage
from minifs_bench.content import write_image
from minifs_bench.disk import BenchDisk, detach_mounts_under
from minifs_bench.probes import DeviceCounter, FsCounts, WriteMeter, drop_caches, elapsed_ms

IMAGE = "image"
"""The bottom layer every clone-based metric stands on."""


class Progress(Protocol):
    """Where a metric reports its steps; the runner draws them as a bar."""

    def step(self, text: str) -> None: ...

    def advance(self, steps: int = 1) -> None: ...


@dataclass
class LayerRecord:
    """What making one layer of the chain cost."""

    depth: int
    name: str
    clone_ms: float
    commit_ms: float


@dataclass
class Session:
    driver: str
    storage: Storage
    disk: BenchDisk
    workdir: Path
    runs: int
    progress: Progress
    chain: list[LayerRecord] = field(default_factory=list)
    _names: Iterator[int] = field(default_factory=itertools.count)
    _records: dict[Path, tuple[str, list[Mount]]] = field(default_factory=dict)

    @property
    def device(self) -> DeviceCounter:
        """The bench disk's block-device counters."""
        return DeviceCounter(self.disk.device)

    def meter(self) -> WriteMeter:
        """Counts what the bench disk's block device receives, flushed by the driver."""
        return WriteMeter(self.device, self.storage.driver.flush)

    def make_cold(self, target: Path) -> None:
        """Make the next access through `target` go to the bench disk's device.

        The clone is unmounted while the driver drops its own caches (zfs
        exports its pool to empty the ARC), mounted again from fresh records,
        then the driver is flushed and the kernel's caches are dropped: what is
        looked up next is read from the device, the mount itself excepted.
        """
        name, records = self._records[target]
        mounter.unmount_all(records, target)
        self.storage.driver.drop_caches()
        records = self.storage.mounts(name)
        self._records[target] = (name, records)
        mounter.mount_all(records, target)
        self.storage.driver.flush()
        drop_caches(self.disk.mountpoint, self.disk.fstype)

    @property
    def scratch(self) -> Path:
        """Where the bare operations make what they make: on the bench disk's
        filesystem beside the driver's own data, or for a driver on the raw
        device (zfs) the work dir, as only mount points are made there."""
        return self.disk.mountpoint or self.workdir

    def counts(self) -> FsCounts:
        """Bytes and inodes, total and free, as the driver sees its space."""
        return FsCounts(**self.storage.driver.space())

    def name(self, prefix: str) -> str:
        return f"{prefix}-{next(self._names)}"

    def target(self) -> Path:
        """A fresh empty directory to mount on, outside the bench disk."""
        path = self.workdir / "mnt" / str(next(self._names))
        path.mkdir(parents=True)
        return path

    # -- mounting through the records the driver returns -----------------------

    @contextlib.contextmanager
    def mounted(self, name: str) -> Iterator[Path]:
        """Mount `name`'s records on a fresh directory for the block's duration;
        afterwards the driver may let go of what it mounted to serve them."""
        target = self.target()
        self._records[target] = (name, self.storage.mounts(name))
        try:
            with mounter.mounted(self._records[target][1], target):
                yield target
        finally:
            del self._records[target]
        target.rmdir()
        self.storage.driver.unmounted(self.storage.stat(name).id)

    def remount(self, target: Path) -> None:
        """Unmount and mount again, so what is read next comes from the driver's
        store and not from the mount's own caches."""
        _, records = self._records[target]
        mounter.unmount_all(records, target)
        mounter.mount_all(records, target)

    # -- layers ------------------------------------------------------------------

    def make_layer(
        self, name: str, parent: str | None, populate: Callable[[Path], None] | None = None
    ) -> tuple[float, float]:
        """Clone `parent`, fill it (if asked), commit it as `name`; returns the
        clone and commit times in ms."""
        clone = self.name(f"{name}-work")
        start = time.perf_counter_ns()
        self.storage.clone(clone, parent)
        clone_ms = elapsed_ms(start)
        if populate is not None:
            with self.mounted(clone) as path:
                populate(path)
        start = time.perf_counter_ns()
        self.storage.snapshot(clone, name)
        return clone_ms, elapsed_ms(start)

    def build_image(self) -> None:
        """The bottom layer of the chain: an image of many small files."""
        self.chain.append(LayerRecord(1, IMAGE, *self.make_layer(IMAGE, None, write_image)))

    def build_chain(self, layers: int) -> None:
        """Stack empty layers on the image until the chain is `layers` deep,
        recording how long each clone and commit took."""
        parent = IMAGE
        for depth in range(2, layers + 1):
            name = self.layer_at(depth)
            clone_ms, commit_ms = self.make_layer(name, parent)
            self.chain.append(LayerRecord(depth, name, clone_ms, commit_ms))
            parent = name
            self.progress.advance()

    def layer_at(self, depth: int) -> str:
        """The layer whose chain is `depth` layers deep (1 is the image itself)."""
        return IMAGE if depth == 1 else f"layer{depth}"

    def detach_strays(self) -> None:
        """Detach what a failed step left mounted, so the next one can run."""
        detach_mounts_under(self.workdir / "mnt")


def open_on_disk(
    driver: str, workdir: Path, disk_name: str, size: int
) -> tuple[BenchDisk, Storage]:
    """A fresh disk and a started Storage whose driver lives on it alone.

    A driver that formats its disk gets the filesystem mounted as its home;
    one that takes a raw device (a zpool, a thin pool) gets it as its `device`
    option. The metadata store stays off the disk, so the disk's counters see
    the driver's work and nothing else. The backend is brought up here, so
    the driver's hooks (space, flush) answer before the first snapshot.
    """
    cls = get_driver(driver)
    disk = BenchDisk(workdir, disk_name, size, cls.disk_filesystem)
    state = workdir / f"{disk_name}-state"
    storage = None
    try:
        disk.up(StateDir(state).home(driver) if cls.disk_filesystem else None)
        options = {"device": disk.device} if cls.disk_filesystem is None else {}
        storage = Storage(driver, state, options)
        with storage.changing():
            pass
        return disk, storage
    except BaseException:
        if storage is not None:
            _down(storage)
        disk.down()
        raise


def _down(storage: Storage) -> None:
    try:
        storage.down()
    finally:
        storage.close()


def close_on_disk(storage: Storage, disk: BenchDisk, workdir: Path) -> None:
    """Undo `open_on_disk`: what the bench left mounted under `workdir`/mnt, the
    driver's backend (which takes down what it mounted itself), the disk."""
    detach_mounts_under(workdir / "mnt")
    try:
        _down(storage)
    finally:
        disk.down()
