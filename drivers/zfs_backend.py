"""How the zfs driver talks to ZFS: one small interface, picked by probing.

`ZfsBackend` is everything the driver asks of ZFS: datasets (create, clone,
snapshot, destroy, properties, children) and pools (create, import, export,
commit the open transaction group). `CommandBackend` runs the `zfs`/`zpool`
commands and works with kernel OpenZFS and with zfs-fuse alike, which only
takes commands (its libzfs talks to the daemon over a socket; there is no
/dev/zfs for libzfs_core to open). A libzfs_core backend (pyzfs) would fit the
same interface on kernel OpenZFS; it is not written (see `pick`).

Errors are classified from the commands' own words into the `Zfs*` classes
below, so the driver can retry a busy dataset or treat an existing snapshot as
done, and everything else reaches the user as one line.
"""

from __future__ import annotations

import abc
import os
import subprocess
from collections.abc import Mapping, Sequence

from minifs.errors import BackendError, InUse, NotFound

COMMAND_TIMEOUT = 120.0
"""Seconds one zfs/zpool command may take. A zfs-fuse daemon that stopped
answering would otherwise hang every minifs command for good."""


class ZfsError(BackendError):
    """A zfs or zpool command failed; the message carries its own words."""


class ZfsNotFound(ZfsError, NotFound):
    """The pool, dataset or snapshot does not exist."""


class ZfsExists(ZfsError):
    """The dataset or snapshot to make exists already."""


class ZfsBusy(ZfsError, InUse):
    """A dataset or pool is still in use (open files, a mount elsewhere, or
    zfs-fuse not yet done with an unmount a moment ago)."""


class ZfsHasClones(ZfsError, InUse):
    """A snapshot has dependent clones, so it cannot be destroyed."""


class ZfsNoSpace(ZfsError):
    """The pool is full."""


class ZfsDaemonDown(ZfsError):
    """zfs-fuse does not answer: not started, or it died."""


_CLASSES: tuple[tuple[tuple[str, ...], type[ZfsError]], ...] = (
    (
        (
            "connection refused",
            "failed to initialize zfs library",
            "zfs-fuse daemon is running",
            "no such file or directory\nplease make sure",
        ),
        ZfsDaemonDown,
    ),
    (("dataset is busy", "pool is busy", "device busy", "is busy"), ZfsBusy),
    (("dependent clones",), ZfsHasClones),
    (("out of space", "no space left"), ZfsNoSpace),
    (("already exists",), ZfsExists),
    (("does not exist", "no such pool", "no such dataset", "not found"), ZfsNotFound),
)


def classify(stderr: str) -> type[ZfsError]:
    """Which ZfsError a command's error text stands for."""
    text = stderr.lower()
    for needles, cls in _CLASSES:
        if any(n in text for n in needles):
            return cls
    return ZfsError


class ZfsBackend(abc.ABC):
    """What the driver needs from ZFS; names are full dataset names."""

    name: str
    """Shown by `minifs drivers` as the driver's backend."""

    # -- datasets --------------------------------------------------------------

    @abc.abstractmethod
    def create(self, dataset: str, props: Mapping[str, str]) -> None:
        """`zfs create -o ... DATASET` (its parent must exist)."""

    @abc.abstractmethod
    def clone(self, origin: str, dataset: str, props: Mapping[str, str]) -> None:
        """`zfs clone -o ... ORIGIN@SNAP DATASET`."""

    @abc.abstractmethod
    def snapshot(self, snapshot: str) -> None:
        """`zfs snapshot DATASET@SNAP`; ZfsExists when it is there already."""

    @abc.abstractmethod
    def destroy(self, name: str, recursive: bool = False) -> None:
        """Destroy a dataset (with its snapshots when `recursive`) or a
        snapshot, unmounting it first."""

    @abc.abstractmethod
    def get(self, name: str, props: Sequence[str]) -> dict[str, str]:
        """Property values, exact numbers for sizes; ZfsNotFound when absent."""

    @abc.abstractmethod
    def set(self, name: str, props: Mapping[str, str]) -> None:
        """`zfs set PROP=VALUE ... NAME`."""

    @abc.abstractmethod
    def children(self, dataset: str) -> list[str]:
        """Names of the filesystems directly under `dataset`."""

    @abc.abstractmethod
    def mount(self, dataset: str, readonly: bool = False) -> None:
        """Mount at its mountpoint property (the backend's own mount)."""

    @abc.abstractmethod
    def unmount(self, dataset: str) -> None:
        """Undo `mount`."""

    def exists(self, name: str) -> bool:
        try:
            self.get(name, ["type"])
        except ZfsNotFound:
            return False
        return True

    # -- pools -----------------------------------------------------------------

    @abc.abstractmethod
    def pools(self) -> dict[str, str]:
        """Imported pools: name -> guid."""

    @abc.abstractmethod
    def pool_create(
        self, pool: str, vdev: str, props: Mapping[str, str], fs_props: Mapping[str, str]
    ) -> None:
        """`zpool create` on one file or device."""

    @abc.abstractmethod
    def pool_destroy(self, pool: str) -> None:
        """`zpool destroy -f`, for a pool minifs made a moment ago and must undo."""

    @abc.abstractmethod
    def pool_import(self, pool: str, search_dir: str) -> None:
        """Import `pool` from the vdevs found in `search_dir`, without a cache file."""

    @abc.abstractmethod
    def pool_vdevs(self, pool: str) -> list[str]:
        """The paths of the pool's vdevs as `zpool status` names them."""

    @abc.abstractmethod
    def sync(self, pool: str, dataset: str) -> None:
        """Commit the pool's open transaction group to disk before returning."""


class CommandBackend(ZfsBackend):
    """The `zfs` and `zpool` commands: kernel OpenZFS and zfs-fuse alike."""

    def __init__(self, flavour: str) -> None:
        self.flavour = flavour
        self.name = f"zfs/zpool commands ({flavour})"
        self._zpool_sync = flavour == "kernel"
        self._txg = 0

    def run(self, argv: Sequence[str], what: str) -> str:
        """One command; its last error line becomes a classified ZfsError."""
        try:
            done = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                check=False,
                timeout=COMMAND_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise ZfsError(f"{what}: {argv[0]} is not installed; run 'make setup'") from None
        except subprocess.TimeoutExpired:
            raise ZfsError(
                f"{what}: no answer from ZFS in {COMMAND_TIMEOUT:.0f} s (is zfs-fuse hung? "
                "see 'minifs down', or restart it)"
            ) from None
        if done.returncode != 0:
            text = (done.stderr or done.stdout).strip()
            cls = classify(text)
            lines = [line for line in text.splitlines() if line.strip()]
            if cls is ZfsDaemonDown:
                detail = "the zfs-fuse daemon does not answer"
            else:
                detail = lines[0] if lines else f"exit {done.returncode}"
            raise cls(f"{what}: {detail}")
        return done.stdout

    @staticmethod
    def _props(props: Mapping[str, str]) -> list[str]:
        return [arg for key, value in props.items() for arg in ("-o", f"{key}={value}")]

    def create(self, dataset: str, props: Mapping[str, str]) -> None:
        self.run(["zfs", "create", *self._props(props), dataset], f"zfs create {dataset}")

    def clone(self, origin: str, dataset: str, props: Mapping[str, str]) -> None:
        self.run(["zfs", "clone", *self._props(props), origin, dataset], f"zfs clone {origin}")

    def snapshot(self, snapshot: str) -> None:
        self.run(["zfs", "snapshot", snapshot], f"zfs snapshot {snapshot}")

    def destroy(self, name: str, recursive: bool = False) -> None:
        flags = ["-r"] if recursive else []
        self.run(["zfs", "destroy", *flags, name], f"zfs destroy {name}")

    def get(self, name: str, props: Sequence[str]) -> dict[str, str]:
        out = self.run(
            ["zfs", "get", "-H", "-p", "-o", "property,value", ",".join(props), name],
            f"zfs get {name}",
        )
        values = {}
        for line in out.splitlines():
            key, _, value = line.partition("\t")
            values[key] = value
        return values

    def set(self, name: str, props: Mapping[str, str]) -> None:
        for key, value in props.items():  # zfs-fuse's `zfs set` takes one at a time
            self.run(["zfs", "set", f"{key}={value}", name], f"zfs set {key} on {name}")

    def children(self, dataset: str) -> list[str]:
        out = self.run(
            ["zfs", "list", "-H", "-o", "name", "-t", "filesystem", "-d", "1", dataset],
            f"zfs list {dataset}",
        )
        return [n for n in out.splitlines() if n and n != dataset]

    def mount(self, dataset: str, readonly: bool = False) -> None:
        options = ["-o", "ro"] if readonly else []
        self.run(["zfs", "mount", *options, dataset], f"zfs mount {dataset}")

    def unmount(self, dataset: str) -> None:
        self.run(["zfs", "unmount", dataset], f"zfs unmount {dataset}")

    def pools(self) -> dict[str, str]:
        out = self.run(["zpool", "list", "-H", "-o", "name,guid"], "zpool list")
        return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)

    def pool_create(
        self, pool: str, vdev: str, props: Mapping[str, str], fs_props: Mapping[str, str]
    ) -> None:
        fs = [arg for key, value in fs_props.items() for arg in ("-O", f"{key}={value}")]
        self.run(
            ["zpool", "create", "-f", *self._props(props), *fs, pool, vdev],
            f"zpool create {pool} on {vdev}",
        )

    def pool_destroy(self, pool: str) -> None:
        self.run(["zpool", "destroy", "-f", pool], f"zpool destroy {pool}")

    def pool_import(self, pool: str, search_dir: str) -> None:
        self.run(
            ["zpool", "import", "-d", search_dir, "-o", "cachefile=none", pool],
            f"zpool import {pool} from {search_dir}",
        )

    def pool_vdevs(self, pool: str) -> list[str]:
        out = self.run(["zpool", "status", pool], f"zpool status {pool}")
        return [w for line in out.splitlines() for w in line.split()[:1] if w.startswith("/")]

    def sync(self, pool: str, dataset: str) -> None:
        """`zpool sync` where it exists (OpenZFS 0.8+). zfs-fuse has none, and
        sync(2) does not reach its transaction groups; setting a property is a
        sync task, and ZFS returns from one only once the transaction group
        holding it (with every write before it) is on disk."""
        if self._zpool_sync:
            try:
                self.run(["zpool", "sync", pool], f"zpool sync {pool}")
                return
            except ZfsError:
                self._zpool_sync = False
        self._txg += 1
        self.set(dataset, {"minifs:sync": f"{os.getpid()}.{self._txg}"})


def pick(flavour: str) -> ZfsBackend:
    """The backend for this machine.

    libzfs_core (pyzfs) would only save the fork of a command per call on
    kernel OpenZFS, and cannot reach zfs-fuse at all; without a kernel module
    here it could not be tested once, so it is not offered: every flavour
    uses the commands.
    """
    return CommandBackend(flavour)
