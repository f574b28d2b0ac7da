"""devicemapper: the redirect-on-write driver, thin devices with ext4 on each.

Docker's devicemapper driver in minifs words: a thin pool over a data device
(a sparse file in the home, or `devicemapper.device`), a base thin device
formatted with ext4 once, and every clone, view and layer a thin snapshot:
a clone is a snapshot of its layer's device (of the base without one), a
commit marks the clone's device read-only (same id), a view is a read-only
snapshot. Mount records are `ext4` on a loop device over the thin device.

The pool is the userspace one (thin_pool, served by thin_daemon over FUSE):
this kernel has no device-mapper. Which thin ids exist, their names (the
snapshot ids), sizes and read-only marks live in the pool's own metadata,
never in files beside it that could disagree after a crash. The daemon is
started by the first command that needs the pool and kept until
`minifs down`; loop devices are attached when mount records are asked for
and detached on remove, commit, `unmounted` and `down`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from minifs import linux
from minifs.driver import AUTO, Driver
from minifs.errors import BackendError, InUse, InvalidArgument, MissingPrerequisite, NotSupported
from minifs.hookspecs import hookimpl
from minifs.loopdisk import fitting_size, image_size, make_image, parse_size
from minifs.model import DriverKind, Kind, Mount, Usage
from minifs.resources import describe, flocked, run
from minifs_drivers import devicemapper_kernel

BASE = "base"
"""The thin device formatted once, which parentless clones and views snapshot."""
SID_RE = re.compile(r"[0-9a-f]{32}")
DEFAULT_DATA_SIZE = "10G"
DEFAULT_BASE_SIZE = "10G"
MIN_DATA_SIZE = 64 << 20
MIN_BASE_SIZE = 16 << 20
DAEMON_WAIT = 30.0
BASE_FORMAT_SIZE = 16 << 20
"""The base is formatted this small and every parentless clone grown from it
to `basesize` (or --size): resize2fs grows ext4 by adding block groups, and
shrinks it back by removing them, whereas an ext4 made at 10G keeps inode
tables and a journal sized for 10G that no --size of 20M can hold."""
MKFS = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-G", "1"]
MKFS += ["-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"]
"""Lazy init is safe on a thin device (unwritten blocks read as zeros), and
writing every inode table of the base once per pool would be slow; mounts
pass `noinit_itable`, or each clone's kernel thread would write them again
and give every clone its own copy of the tables. One block group per flex
group (`-G 1`) keeps each group's inode table inside it, so a clone of a
10G layer still shrinks to a 20M `--size` (with 16 per flex group, the
tables of removed groups sit in the first ones and keep ~22M)."""


class _Backend:
    """`backend` names the engine and, where the kernel cannot serve, why."""

    def __get__(self, obj: object, owner: type | None = None) -> str:
        why = devicemapper_kernel.unavailable()
        kernel = f"unavailable, {why}" if why else "present, not used by this minifs"
        return f"userspace thin pool over FUSE; kernel dm-thin {kernel} (userspace)"


def _size_option(options: Mapping[str, str], key: str, minimum: int, why: str) -> None:
    value = options.get(key, AUTO)
    if value != AUTO:
        image_size(value, f"devicemapper.{key}", minimum, why)


class DevicemapperDriver(Driver):
    name = "devicemapper"
    kind = DriverKind.ROW
    backend = _Backend()  # type: ignore[assignment]
    disk_filesystem = None
    min_disk_size = MIN_DATA_SIZE
    size_limit = "the thin device's virtual size (ext4 resized to it)"
    options_help = {
        "datasize": f"size of the sparse data file of the pool (default auto: "
        f"{DEFAULT_DATA_SIZE}, or 90% of the free space where it is smaller)",
        "device": "a block device for the pool's data, instead of a file in the home",
        "basesize": f"virtual size of the base device and so of every clone without "
        f"--size (default {DEFAULT_BASE_SIZE})",
        "blocksize": "the pool's block size, a power of two from 4K to 1G (default 64K)",
        "engine": "userspace (default) or kernel (dm-thin; refused where the kernel lacks it)",
    }
    option_defaults = {
        "datasize": AUTO,
        "basesize": DEFAULT_BASE_SIZE,
        "blocksize": "64K",
        "engine": "userspace",
    }

    def check_options(self, options: Mapping[str, str], settled: bool) -> None:
        engine = options.get("engine", "userspace")
        if engine == "kernel":
            why = devicemapper_kernel.unavailable() or "minifs has no kernel engine yet"
            raise InvalidArgument(
                f"devicemapper.engine=kernel cannot run here ({why}); leave it out to use "
                "the userspace thin pool"
            )
        if engine != "userspace":
            raise InvalidArgument(f"devicemapper.engine={engine} is not one of userspace, kernel")
        if "device" in options and options.get("datasize", AUTO) != AUTO:
            raise InvalidArgument(
                "devicemapper.datasize is for the data file minifs makes; with "
                "devicemapper.device the device's own size counts, so give one or the other"
            )
        _size_option(options, "datasize", MIN_DATA_SIZE, "a pool of a few hundred blocks")
        _size_option(options, "basesize", MIN_BASE_SIZE, "the smallest useful ext4")
        block = parse_size(options.get("blocksize", "64K"))
        if block < 4096 or block > 1 << 30 or block & (block - 1):
            raise InvalidArgument(
                f"devicemapper.blocksize={options['blocksize']} is not a power of two from "
                "4K to 1G; Docker's default is 64K"
            )
        device = options.get("device")
        if device is not None and not Path(device).is_block_device():
            raise InvalidArgument(
                f"devicemapper.device={device} is not a block device; give one like "
                "/dev/sdb, or leave it out for a data file in the home"
            )

    def settle_options(self, options: dict[str, str]) -> dict[str, str]:
        if "device" in options:
            options.pop("datasize", None)
        elif options["datasize"] == AUTO:
            wanted = parse_size(DEFAULT_DATA_SIZE)
            size = fitting_size(self.home, wanted, MIN_DATA_SIZE, "a thin pool's data file")
            options["datasize"] = f"{size >> 20}M"
        return options

    @classmethod
    def probe(cls) -> None:
        if os.geteuid() != 0:
            raise NotSupported("devicemapper attaches loop devices and mounts ext4; run as root")
        if not os.path.exists("/dev/fuse"):
            raise NotSupported(
                "the userspace thin pool needs FUSE (/dev/fuse); load it ('modprobe fuse')"
            )
        try:
            import pyfuse3  # noqa: F401
        except ImportError:
            raise MissingPrerequisite(
                "pyfuse3 is not installed (it builds against Debian's libfuse3-dev); "
                "run 'make setup'"
            ) from None
        missing = [t for t in ("losetup", "mkfs.ext4", "resize2fs", "debugfs") if not _which(t)]
        if missing:
            raise MissingPrerequisite(f"{', '.join(missing)} not found; run 'make setup'")

    @classmethod
    def version(cls) -> str:
        import pyfuse3

        return f"minifs thin pool, pyfuse3 {pyfuse3.__version__}"

    # -- where things live ---------------------------------------------------------

    @property
    def meta_dir(self) -> Path:
        return self.home / "pool" / "metadata"

    @property
    def data_path(self) -> Path:
        device = self.options.get("device")
        return Path(device) if device else self.home / "pool" / "data"

    @property
    def mnt_dir(self) -> Path:
        """Where minifs mounts each thin device's ext4 (a shared mount: see mounts)."""
        return self.home / "mnt"

    @property
    def devices_dir(self) -> Path:
        """The daemon's FUSE mount: one file per thin device, and `.control`."""
        return self.home / "devices"

    # -- lifecycle -------------------------------------------------------------------

    def bring_up(self) -> None:
        """Make the pool the first time, start its daemon (or find it running),
        and format the base device once. A first start that fails leaves
        nothing behind, so the next one starts afresh."""
        fresh = not self.config_path.exists()
        try:
            if fresh:
                self._make_pool()
            self.resources.bind_shared("mnt", self.mnt_dir)
            os.chmod(self.mnt_dir, 0o700)  # clones under it are writable
            self._daemon_up()
            if BASE not in self._ask({"op": "status"})["devices"]:
                self._make_base()
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            if fresh:
                shutil.rmtree(self.home / "pool", ignore_errors=True)
            raise

    def _make_pool(self) -> None:
        from minifs_drivers.thin_pool import ThinPool

        shutil.rmtree(self.home / "pool", ignore_errors=True)  # a failed first start's
        self.meta_dir.mkdir(parents=True)
        if "device" not in self.options:
            try:
                make_image(self.data_path, parse_size(self.options["datasize"]), None)
            except OSError as exc:
                raise BackendError(
                    f"cannot make the thin pool's data file {self.data_path} ({exc.strerror}); "
                    "free space there or pick a smaller devicemapper.datasize"
                ) from None
        ThinPool.format(self.meta_dir, self.data_path, parse_size(self.options["blocksize"]))

    def _daemon_up(self) -> None:
        found = self.resources.find("daemon")
        if found and self.resources.alive(found):
            return
        self._forget_dead_daemon()
        self.devices_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "minifs_drivers.thin_daemon",
            str(self.meta_dir),
            str(self.data_path),
            str(self.devices_dir),
        ]
        self.resources.daemon(
            "daemon",
            argv,
            ready=lambda: (self.devices_dir / ".control").exists(),
            timeout=DAEMON_WAIT,
            log=self.home / "run" / "thin-daemon.log",
            grace=30.0,
        )

    def _forget_dead_daemon(self) -> None:
        """What a killed daemon left: ext4 mounts and loop devices over its
        files (their I/O fails now) and its FUSE mount, which nothing else
        can undo. Binds of those mounts elsewhere (a container's) keep
        failing until their owners unmount them."""
        for record in reversed(self.resources.load()):
            if record["key"] == "mnt":
                continue
            if record["type"] == "mount" and self.resources.alive(record):
                linux.umount(record["target"], linux.MNT_DETACH)
            if record["type"] == "loop" and self.resources.alive(record):
                run(["losetup", "--detach", record["device"]], f"detach {record['device']}")
            self.resources.forget(record["key"])
        if linux.is_mountpoint(self.devices_dir):
            linux.umount(self.devices_dir, linux.MNT_DETACH)

    def stop(self) -> list[str]:
        """Loop devices first (refused while a clone is mounted), then the
        daemon, which commits and unmounts itself on SIGTERM; a mount a dead
        daemon left is detached."""
        stopped = super().stop()
        if linux.is_mountpoint(self.devices_dir):
            linux.umount(self.devices_dir, linux.MNT_DETACH)
            stopped.append(f"mount {self.devices_dir}")
        return stopped

    def _make_base(self) -> None:
        """Made under another name and renamed when formatted, so a crash
        never leaves a half-formatted base that later clones would copy."""
        making = f"{BASE}.new"
        self._ask({"op": "delete", "name": making})
        self._ask({"op": "create", "name": making, "size": BASE_FORMAT_SIZE})
        device = str(self.devices_dir / making)
        run([*MKFS, device], "format the base thin device")
        # A layer tar lists what is in it: an empty clone must be empty.
        run(["debugfs", "-w", "-R", "rmdir lost+found", device], "tidy the base thin device")
        self._ask({"op": "set", "name": making, "readonly": True, "rename": BASE})

    # -- talking to the pool -----------------------------------------------------------

    def _ask(self, request: dict) -> object:
        """One request on the daemon's control file, its answer back."""
        control = self.devices_dir / ".control"
        try:
            answer = pool_request(self.devices_dir, request)
        except _NoDaemon as exc:
            raise BackendError(
                f"the thin pool daemon does not answer at {control} ({exc.args[0]}); "
                "run 'minifs down', then retry (see its log in "
                f"{self.home / 'run' / 'thin-daemon.log'})"
            ) from None
        except OSError as exc:
            raise BackendError(
                f"the thin pool daemon failed during {request['op']} ({exc.strerror}); "
                f"'minifs gc' restarts it and finishes or undoes the operation (its log: "
                f"{self.home / 'run' / 'thin-daemon.log'})"
            ) from None
        if "error" in answer:
            if answer.get("full"):
                raise self._full()
            raise BackendError(f"thin pool: {answer['error']}")
        return answer["ok"]

    def _full(self) -> BackendError:
        return BackendError(
            f"the thin pool in {self.home} is full; remove snapshots ('minifs rm "
            "NAME') or make the store with a larger devicemapper.datasize"
        )

    def _release(self, sid: str) -> None:
        """Unmount minifs's own mount of `sid` and detach its loop device;
        refused (InUse) while something still uses them (a container's bind,
        a mount made from the records elsewhere)."""
        from minifs.resources import _refuse_if_busy

        with self._loops_locked():
            mounted = self.resources.find(f"mnt-{sid}")
            if mounted is not None:
                if self.resources.alive(mounted):
                    try:
                        linux.umount(mounted["target"])
                    except OSError as exc:
                        raise InUse(
                            f"{mounted['target']} is busy ({exc.strerror}); unmount what is "
                            "mounted from it (also in containers), then retry"
                        ) from None
                self.resources.forget(mounted["key"])
            with contextlib.suppress(OSError):
                (self.mnt_dir / sid).rmdir()
            record = self.resources.find(f"loop-{sid}")
            if record is not None:
                if self.resources.alive(record):
                    _refuse_if_busy(record["device"])
                    run(["losetup", "--detach", record["device"]], f"detach {describe(record)}")
                self.resources.forget(record["key"])

    def _loops_locked(self) -> contextlib.AbstractContextManager[None]:
        """Driver operations run outside the state dir's lock, concurrently
        across processes; the loop records they add and drop share one file."""
        return flocked(str(self.home / "run" / "loops.lock"))

    # -- snapshots -------------------------------------------------------------------

    def prepare(
        self, sid: str, parents: Sequence[str], size: int | None = None, readonly: bool = False
    ) -> None:
        """A thin snapshot of the parent layer (of the base without one),
        resized to `size` with its ext4 when given, as Docker's
        `--storage-opt size` grows a devicemapper container's device (and,
        unlike Docker's, shrinks it while what the layer holds fits)."""
        self.remove(sid)  # what a crashed earlier attempt left
        origin = parents[0] if parents else BASE
        self._ask({"op": "snapshot", "origin": origin, "name": sid})
        if size is None and not parents:
            size = parse_size(self.options["basesize"])
        if size is not None:
            self._resize(sid, size)
        if readonly:
            self._ask({"op": "set", "name": sid, "readonly": True})

    def _resize(self, sid: str, size: int) -> None:
        device = self.devices_dir / sid
        have = self._ask({"op": "status"})["devices"][sid]["size"]  # type: ignore[index]
        size = size >> 12 << 12  # whole ext4 blocks
        if size == have:
            return
        if size > have:
            self._ask({"op": "set", "name": sid, "size": size})
        try:
            run(["resize2fs", "-f", str(device), f"{size >> 10}K"], "resize the clone's ext4")
        except BackendError as exc:
            raise BackendError(
                f"cannot fit the clone in --size {size >> 20}M ({exc}); its layer's "
                "filesystem needs more than that, so give a larger --size"
            ) from None
        if size < have:
            self._ask({"op": "set", "name": sid, "size": size})

    def view(self, sid: str, parents: Sequence[str]) -> None:
        self.prepare(sid, parents, readonly=True)

    def commit(self, sid: str, parents: Sequence[str]) -> None:
        """Detach the clone's loop device (its ext4 is unmounted: the core
        checked), replay its ext4 journal if a crash left one to replay
        (a layer is mounted read-only and could not), then mark the device
        read-only. Each step is a no-op when done, so repeating finishes it."""
        self._release(sid)
        status = self._ask({"op": "status"})["devices"]  # type: ignore[index]
        if status[sid]["readonly"]:
            return
        if _needs_recovery(self.devices_dir / sid):
            run(
                ["e2fsck", "-y", "-E", "journal_only", str(self.devices_dir / sid)],
                "replay the clone's ext4 journal",
            )
        self._ask({"op": "set", "name": sid, "readonly": True})

    def remove(self, sid: str) -> None:
        self._release(sid)
        try:
            self._ask({"op": "delete", "name": sid})
        except BackendError as exc:
            if "is open" in str(exc):
                raise InUse(
                    f"thin device {sid} is still open (a loop device attached outside "
                    "minifs?); detach it, then retry"
                ) from None
            raise

    def mounts(self, sid: str, kind: Kind, parents: Sequence[str]) -> list[Mount]:
        """A bind of `<home>/mnt/<sid>`, where minifs mounts the thin device's
        ext4 (through a loop device over its file) on first use, as zfs-fuse
        serves datasets. Not an ext4 record of the loop device: the launcher
        mounts after joining a devices cgroup that denies block devices, and
        a bind needs none. A layer's or view's device is read-only in the
        pool, so losetup attaches it read-only by itself."""
        image = self.devices_dir / sid
        if not image.exists():
            raise BackendError(f"thin device {sid} is missing from the pool")
        mode = "rw" if kind is Kind.CLONE else "ro"
        with self._loops_locked():
            device = self.resources.loop(f"loop-{sid}", image)
            if Path(f"/sys/block/{Path(device).name}/loop/dio").read_text().strip() != "1":
                # Direct I/O: the ext4 above caches, FUSE below is direct_io;
                # a loop cache in between would only copy every block again.
                run(["losetup", "--direct-io=on", device], f"set direct I/O on {device}")
            target = self.mnt_dir / sid
            try:
                self.resources.mount(f"mnt-{sid}", device, target, "ext4", f"{mode},noinit_itable")
            except BackendError:
                # ext4 writes its superblock on mount: in a full pool that
                # write fails, and mount(2) says only "Input/output error".
                if self._ask({"op": "status"})["free_blocks"] == 0:  # type: ignore[index]
                    raise self._full() from None
                raise
        return [Mount("bind", str(target), ("bind", mode))]

    def unmounted(self, sid: str) -> None:
        """Let go of minifs's own mount and loop device while nothing uses them."""
        with contextlib.suppress(InUse):
            self._release(sid)

    def usage(self, sid: str) -> Usage:
        """Bytes: the pool blocks `sid` maps differently from the device it
        was snapshotted from (its own writes). Inodes: its ext4's used
        inodes less its origin's, from the superblocks (exact once the
        filesystem is unmounted, which writes the counts back): minifs's own
        mount is let go first when nothing uses it, else synced."""
        self.unmounted(sid)
        with contextlib.suppress(OSError):
            if linux.is_mountpoint(self.mnt_dir / sid):
                linux.syncfs(self.mnt_dir / sid)
        own = self._ask({"op": "usage", "name": sid})
        used = _used_inodes(self.devices_dir / sid)
        origin = self._ask({"op": "status"})["devices"][sid].get("origin")  # type: ignore[index]
        base = _used_inodes(self.devices_dir / origin) if origin else 0
        return Usage(size=int(own), inodes=max(0, used - base))  # type: ignore[arg-type]

    def ids(self) -> set[str]:
        devices = self._ask({"op": "status"})["devices"]  # type: ignore[index]
        return {name for name in devices if SID_RE.fullmatch(name)}

    # -- measuring -------------------------------------------------------------------

    def flush(self) -> None:
        """syncfs of every thin device's ext4 minifs has mounted (what a clone
        wrote sits in its own page cache until then, not in the pool's), then
        commit the pool (its data and metadata on their device), then syncfs
        of the home."""
        for record in self.resources.load():
            if record["type"] == "mount" and record["key"].startswith("mnt-"):
                with contextlib.suppress(OSError):  # unmounted meanwhile: nothing dirty
                    linux.syncfs(record["target"])
        self._ask({"op": "commit"})
        super().flush()

    def space(self) -> dict[str, int | None]:
        status = self._ask({"op": "status"})
        block = status["block"]  # type: ignore[index]
        return {
            "bytes_total": status["nr_blocks"] * block,  # type: ignore[index]
            "bytes_free": status["free_blocks"] * block,  # type: ignore[index]
            "inodes_total": None,
            "inodes_free": None,
        }

    def dump(self) -> str:
        """The pool's mappings as thin_dump XML (`minifs thin dump`)."""
        return str(self._ask({"op": "dump"}))


class _NoDaemon(Exception):
    """The control file cannot be opened: no daemon serves the pool."""


def pool_request(devices: Path, request: Mapping[str, object]) -> dict:
    """One request written to the pool daemon's control file (`devices/.control`,
    the daemon's whole interface, as `dmsetup message` is a kernel pool's), and
    its JSON answer: `{"ok": ...}` or `{"error": ...}`."""
    try:
        fd = os.open(devices / ".control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise _NoDaemon(exc.strerror) from None
    try:
        os.write(fd, json.dumps(request).encode())
        chunks, at = [], 0
        while chunk := os.pread(fd, 1 << 20, at):
            chunks.append(chunk)
            at += len(chunk)
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN once the daemon is gone
            os.close(fd)
    return json.loads(b"".join(chunks))


def _superblock(device: Path) -> bytes:
    with open(device, "rb", buffering=0) as f:
        return os.pread(f.fileno(), 1024, 1024)


def _used_inodes(device: Path) -> int:
    count, free = struct.unpack_from("<I12xI", _superblock(device))
    return count - free


def _needs_recovery(device: Path) -> bool:
    (incompat,) = struct.unpack_from("<I", _superblock(device), 0x60)
    return bool(incompat & 0x4)  # EXT4_FEATURE_INCOMPAT_RECOVER


def _which(program: str) -> bool:
    return shutil.which(program, path=os.environ.get("PATH", "") + ":/sbin:/usr/sbin") is not None


@hookimpl
def register_drivers(register) -> None:
    register(DevicemapperDriver)


@hookimpl
def register_commands(add_command) -> None:
    """`minifs thin dump [-o FILE]`: the pool as thin_dump XML, which
    thin_restore turns into kernel dm-thin metadata over the same data device."""
    about = "the devicemapper driver's thin pool (dump: its mappings as thin_dump XML)"
    thin = add_command("thin", help=about, description=about)
    actions = thin.add_subparsers(dest="thin_command", metavar="ACTION", required=True)
    dump = actions.add_parser(
        "dump",
        help="write the pool's mappings in thin_dump's XML (for thin_restore)",
        description="write the pool's mappings in thin_dump's XML (for thin_restore)",
    )
    dump.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    dump.set_defaults(func=_cmd_thin_dump)


def _cmd_thin_dump(args) -> int:  # type: ignore[no-untyped-def]
    from minifs.arguments import open_storage

    with open_storage(args, DevicemapperDriver.name) as storage:
        storage.up()
        xml = storage.driver.dump()
    if args.output is None:
        sys.stdout.write(xml)
        return 0
    output = Path(args.output)
    if output.exists() and not output.is_file():
        raise InvalidArgument(f"-o {output} is not a regular file; give a file path")
    tmp = output.with_name(output.name + ".partial")
    try:
        tmp.write_text(xml)
        os.replace(tmp, output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BackendError(f"cannot write {output}: {exc.strerror}") from None
    return 0
