"""The FUSE daemon that serves a userspace thin pool, one file per thin device.

`python -m minifs_drivers.thin_daemon META DATA MOUNTPOINT` opens the pool
(refusing damaged metadata: see thin_pool) and mounts a flat directory: each
thin device is a file named after it, which the driver attaches to a loop
device and mounts as ext4. A separate process, so the kernel's loop I/O never
waits on the process that issued it. Files are opened with FUSE direct_io: the
loop device does its own caching above, and a second page cache here would
only copy every block twice.

`.control` is the pool's message channel, as `dmsetup message` is dm-thin's:
open it, write one JSON request, read the JSON answer from the same handle.
Requests: create, snapshot, delete, set (readonly, size, name), usage, status,
dump (thin_dump XML). Each device operation commits before it answers.

The device's flush (fsync through the loop device, which ext4 sends at each
journal commit) commits the pool's open transaction; SIGTERM or an unmount
commits, writes a checkpoint and exits. A SIGKILL loses only what no flush
had committed, as a power cut loses a disk's volatile cache.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import stat
import sys
import traceback
from pathlib import Path

import pyfuse3
import trio

from minifs_drivers.thin_dump import dump_xml
from minifs_drivers.thin_pool import ThinBusy, ThinFull, ThinPool

CONTROL = ".control"
CONTROL_INODE = 2
FIRST_DEVICE_INODE = 16


class ThinFS(pyfuse3.Operations):
    """A flat directory of thin devices plus the control file."""

    def __init__(self, pool: ThinPool) -> None:
        super().__init__()
        self.pool = pool
        self.handles: dict[int, str] = {}
        """Open device handles: fh -> device name."""
        self.answers: dict[int, bytes] = {}
        """Open control handles: fh -> the answer to their request."""
        self.fhs = itertools.count(1)

    # -- names and attributes ----------------------------------------------------------

    def _name_of(self, inode: int) -> str:
        for device in self.pool.devices.values():
            if device.thin_id + FIRST_DEVICE_INODE == inode:
                return device.name
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_nlink = 1
        attr.st_uid = attr.st_gid = 0
        attr.entry_timeout = attr.attr_timeout = 0
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o700
            attr.st_nlink = 2
        elif inode == CONTROL_INODE:
            attr.st_mode = stat.S_IFREG | 0o600
        else:
            device = self.pool.device(self._name_of(inode))
            attr.st_mode = stat.S_IFREG | (0o400 if device.readonly else 0o600)
            attr.st_size = device.size
            attr.st_blksize = self.pool.block
            attr.st_blocks = (
                (len(device.mapping) - device.mapping.count(-1)) * self.pool.block // 512
            )
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if text == CONTROL:
            return self._attr(CONTROL_INODE)
        device = self.pool.by_name.get(text)
        if device is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(device.thin_id + FIRST_DEVICE_INODE)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size and inode != CONTROL_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)  # sizes change through .control
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        first = FIRST_DEVICE_INODE
        devices = sorted((d.name, d.thin_id + first) for d in self.pool.devices.values())
        entries = [(CONTROL, CONTROL_INODE), *devices]
        for index, (name, inode) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(inode), index):
                return

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        status = self.pool.status()
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = status["block"]
        data.f_blocks = status["nr_blocks"]
        data.f_bfree = data.f_bavail = status["free_blocks"]
        data.f_namemax = 255
        return data

    # -- device I/O ----------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh = next(self.fhs)
        if inode == CONTROL_INODE:
            self.answers[fh] = b""
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        name = self._name_of(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY and self.pool.device(name).readonly:
            raise pyfuse3.FUSEError(errno.EROFS)
        self.handles[fh] = name
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh in self.answers:
            return self.answers[fh][off : off + size]
        return self._io(lambda: self.pool.read(self.handles[fh], off, size))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh in self.answers:
            self.answers[fh] = self._control(buf)
            return len(buf)
        return self._io(lambda: self.pool.write(self.handles[fh], off, buf))

    def _io(self, call):  # type: ignore[no-untyped-def]
        try:
            return call()
        except ThinFull:
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except OSError as exc:
            traceback.print_exc()
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            traceback.print_exc()
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._io(self.pool.commit)

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        self.handles.pop(fh, None)
        self.answers.pop(fh, None)

    # -- the control channel ---------------------------------------------------------------

    def _control(self, request: bytes) -> bytes:
        try:
            message = json.loads(request)
            answer = {"ok": self._do(message)}
        except ThinFull as exc:
            answer = {"error": str(exc), "full": True}
        except Exception as exc:
            answer = {"error": str(exc) or type(exc).__name__}
        return json.dumps(answer).encode()

    def _do(self, message: dict) -> object:
        op = message["op"]
        pool = self.pool
        if op == "create":
            pool.create(message["name"], int(message["size"]))
        elif op == "snapshot":
            pool.snapshot(message["origin"], message["name"])
        elif op == "delete":
            if message["name"] in self.handles.values():
                raise ThinBusy(f"thin device {message['name']} is open (a loop device?)")
            pool.delete(message["name"])
        elif op == "set":
            changes = {k: message[k] for k in ("readonly", "size") if k in message}
            if "rename" in message:
                changes["name"] = message["rename"]
            pool.set(message["name"], **changes)
        elif op == "usage":
            return pool.own_blocks(message["name"]) * pool.block
        elif op == "status":
            return pool.status()
        elif op == "dump":
            return dump_xml(pool)
        elif op == "commit":
            pool.commit()
        else:
            raise ValueError(f"unknown request {op!r}")
        return None


async def _serve() -> None:
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()

        nursery.start_soon(on_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> int:
    meta, data, mountpoint = (Path(a) for a in argv)
    try:
        pool = ThinPool(meta, data)
    except Exception as exc:
        print(f"cannot open the thin pool: {exc}", flush=True)
        return 1
    options = set(pyfuse3.default_options) - {"default_permissions"}
    options |= {"fsname=minifs-thin"}
    pyfuse3.init(ThinFS(pool), str(mountpoint), options)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
