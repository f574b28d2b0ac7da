"""The bare kernel operation each driver's clone+mount stands for, done by hand.

minifs's overhead is the ratio of its clone+mount to this in the same run, on
the same disk, with the same mount options: for overlay2 `mkdir` of an upper
and a work dir and one overlay mount (mount(2), or fsconfig past a page of
options, exactly as the mounter would pick); for vfs `cp -a` of the layer and a
bind mount with the clone's flags. What is left is minifs's own cost: Python, the metadata store and
its lock, the crash-safe ordering.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from minifs import linux, mounter
from minifs.errors import BackendError
from minifs.model import Mount
from minifs.resources import run


class Bare:
    """A clone+mount done by hand; `delete` is the same for every one."""

    what: str

    def create(
        self, clone: Sequence[Mount], layer: Sequence[Mount], scratch: Path, target: Path
    ) -> None:
        """Make what a clone of the layer needs under `scratch` and mount it at `target`,
        given the clone's and the layer's mount records."""
        raise NotImplementedError

    def delete(self, scratch: Path, target: Path) -> None:
        """Unmount `target` and delete `scratch`."""
        linux.umount(target)
        shutil.rmtree(scratch)


class BareOverlay(Bare):
    what = "mkdir upper+work, mount -t overlay with the clone's options"

    def create(
        self, clone: Sequence[Mount], layer: Sequence[Mount], scratch: Path, target: Path
    ) -> None:
        (record,) = clone
        upper, work = scratch / "upper", scratch / "work"
        scratch.mkdir()
        upper.mkdir()
        work.mkdir()
        options = tuple(
            f"upperdir={upper}"
            if o.startswith("upperdir=")
            else f"workdir={work}"
            if o.startswith("workdir=")
            else o
            for o in record.options
        )
        mounter.mount_one(Mount(record.type, record.source, options), target)


class BareCopy(Bare):
    what = "cp -a of the layer's directory, bind mount with the clone's options"

    def create(
        self, clone: Sequence[Mount], layer: Sequence[Mount], scratch: Path, target: Path
    ) -> None:
        (copied,) = layer
        (record,) = clone
        run(["cp", "-a", "--reflink=auto", copied.source, str(scratch)], "bare copy")
        mounter.mount_one(Mount(record.type, str(scratch), record.options), target)


class BareSnapshot(Bare):
    what = (
        "btrfs snapshot of the layer's subvolume and a bind mount with the clone's "
        "options; umount and subvolume delete (ioctls, libbtrfsutil)"
    )

    def create(
        self, clone: Sequence[Mount], layer: Sequence[Mount], scratch: Path, target: Path
    ) -> None:
        import btrfsutil

        (snapshotted,) = layer
        (record,) = clone
        btrfsutil.create_snapshot(snapshotted.source, str(scratch))
        mounter.mount_one(Mount(record.type, str(scratch), record.options), target)

    def delete(self, scratch: Path, target: Path) -> None:
        import btrfsutil

        linux.umount(target)
        btrfsutil.delete_subvolume(str(scratch))


class BareZfsClone(Bare):
    what = (
        "zfs clone of the layer's snapshot, mounted where zfs puts it and bound with "
        "the clone's options; umount and zfs destroy (the zfs command, busy retried)"
    )

    def __init__(self) -> None:
        self._origins: dict[str, str] = {}
        self._made: dict[Path, str] = {}

    def create(
        self, clone: Sequence[Mount], layer: Sequence[Mount], scratch: Path, target: Path
    ) -> None:
        (snapshotted,) = layer
        (record,) = clone
        origin = self._origin(snapshotted)
        dataset = f"{origin.split('@')[0].rsplit('/', 1)[0]}/{scratch.name}"
        run(["zfs", "clone", "-o", f"mountpoint={scratch}", origin, dataset], "bare zfs clone")
        self._made[scratch] = dataset
        options = record.options if record.type == "bind" else ("bind", *record.options)
        mounter.mount_one(Mount("bind", str(scratch), options), target)

    def delete(self, scratch: Path, target: Path) -> None:
        linux.umount(target)
        dataset = self._made.pop(scratch)
        delay, deadline = 0.02, time.monotonic() + 30
        while True:  # zfs-fuse: busy for a moment after the unmount, as for the driver
            done = subprocess.run(
                ["zfs", "destroy", dataset], capture_output=True, text=True, check=False
            )
            if done.returncode == 0:
                break
            if "busy" not in done.stderr or time.monotonic() > deadline:
                raise BackendError(f"bare zfs destroy {dataset}: {done.stderr.strip()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        with contextlib.suppress(OSError):
            scratch.rmdir()

    def _origin(self, layer: Mount) -> str:
        """The snapshot the layer's dataset is frozen as; looked up in the
        untimed warm-up round, then remembered."""
        if layer.source not in self._origins:
            dataset = layer.source
            if layer.type != "zfs":  # zfs-fuse: a bind of where the daemon mounted it
                (dataset,) = (
                    e.source
                    for e in linux.mountinfo()
                    if e.target == layer.source and e.fstype == "fuse.zfs"
                )
            listed = run(
                ["zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-d", "1", dataset],
                "zfs list",
            )
            self._origins[layer.source] = listed.split()[-1]
        return self._origins[layer.source]


class BareUnion(Bare):
    what = (
        "mkdir of a writable branch, unionfs -o cow over the layer's branches "
        "(the daemon forks once it has mounted); umount (the daemon exits) and rm -r"
    )

    def __init__(self) -> None:
        self._branches: dict[str, tuple[list[str], str]] = {}

    def create(
        self, clone: Sequence[Mount], layer: Sequence[Mount], scratch: Path, target: Path
    ) -> None:
        (union,) = layer
        options, branches = self._union_of(union)
        scratch.mkdir()
        argv = ["unionfs", "-o", options, ":".join([f"{scratch}=RW", *branches]), str(target)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BackendError(f"bare unionfs: {done.stderr.strip()}")

    def _union_of(self, layer: Mount) -> tuple[str, list[str]]:
        """The layer's daemon's options (its chroot, name and `ro` left out)
        and its branches as absolute paths; looked up in the untimed warm-up
        round, then remembered."""
        if layer.source not in self._branches:
            for pid in (p for p in os.listdir("/proc") if p.isdigit()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = f.read().decode().split("\0")[:-1]
                except OSError:
                    continue
                if argv[:1] == ["unionfs"] and argv[-1] == layer.source:
                    options = argv[argv.index("-o") + 1].split(",")
                    root = next(o[7:] for o in options if o.startswith("chroot="))
                    kept = [
                        o for o in options if o != "ro" and not o.startswith(("chroot=", "fsname="))
                    ]
                    branches = [f"{root}{b}" for b in argv[-2].split(":")]
                    self._branches[layer.source] = (",".join(kept), branches)
                    break
            else:
                raise BackendError(f"no unionfs daemon serves {layer.source}")
        return self._branches[layer.source]


def _pool(devices: Path, request: dict) -> dict:
    from minifs_drivers.devicemapper import pool_request

    answer = pool_request(devices, request)
    if "error" in answer:
        raise BackendError(f"bare thin {request['op']}: {answer['error']}")
    return answer


class BareThin(Bare):
    what = (
        "a thin snapshot of the layer's device (one request to the pool daemon, as "
        "dmsetup message create_snap), losetup with direct I/O, mount -t ext4 and a bind "
        "with the clone's options; umount, losetup -d and the pool's delete"
    )

    def __init__(self) -> None:
        self._made: dict[Path, tuple[Path, str]] = {}

    def create(
        self, clone: Sequence[Mount], layer: Sequence[Mount], scratch: Path, target: Path
    ) -> None:
        (snapshotted,) = layer
        (record,) = clone
        served = Path(snapshotted.source)  # <home>/mnt/<id>: the layer's ext4, mounted
        devices = served.parent.parent / "devices"
        _pool(devices, {"op": "snapshot", "origin": served.name, "name": scratch.name})
        device = run(
            ["losetup", "--find", "--show", "--direct-io=on", str(devices / scratch.name)],
            "bare losetup",
        ).strip()
        self._made[scratch] = (devices, device)
        scratch.mkdir()
        linux.mount(device, scratch, "ext4", 0, "noinit_itable")
        mounter.mount_one(Mount(record.type, str(scratch), record.options), target)

    def delete(self, scratch: Path, target: Path) -> None:
        devices, device = self._made.pop(scratch)
        linux.umount(target)
        linux.umount(scratch)
        scratch.rmdir()
        run(["losetup", "--detach", device], "bare losetup --detach")
        _pool(devices, {"op": "delete", "name": scratch.name})


BARE: dict[str, Bare] = {
    "overlay2": BareOverlay(),
    "vfs": BareCopy(),
    "btrfs": BareSnapshot(),
    "zfs": BareZfsClone(),
    "aufs": BareUnion(),
    "devicemapper": BareThin(),
}
"""Drivers with a bare equivalent; any other is measured without the ratio."""
