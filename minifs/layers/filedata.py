"""Where pass 2 of an apply gets the bytes of regular files from.

Pass 1 records at which offset of the uncompressed tar each file's data
starts. When those bytes sit in a file (an uncompressed layer, or the
decompressed copy pass 1 spooled), pass 2 copies each file kernel-side from
that offset: `copy_file_range` (no copy through user space, a reflink where
the file system can), else `sendfile` (also in-kernel), stepping down the
first time the kernel refuses (EXDEV: a copy across file systems of
different types, as from a tmpfs spool to an ext4 clone). Otherwise (a layer
handed over as a BytesIO, a zstd one, a gzip'd one whose spool was given up)
the tar is read forward once more, and only the data parts of it are kept.

Spooling the decompressed tar of a gzip'd layer in pass 1 saves inflating
it twice (inflate runs at ~150 MiB/s here, slower than everything else an
apply does; zstd is read twice instead, as it decompresses faster than the
spool is written). The spool is an unnamed temporary file, so a crash
leaves nothing, and its pages are dropped unwritten when it is closed unless
the layer is large enough to push them out. It never takes more than a
quarter of the space that was free when it started, so neither a genuine
layer that needs the disk for itself nor a decompression bomb (refused only
at the size limit) can fill the disk through it: past that, or on a full
disk, the spool is dropped and pass 2 decompresses again.
"""

from __future__ import annotations

import errno
import os
from typing import BinaryIO

from minifs.layers.scratch import unnamed_file

_CHUNK = 1 << 20
_UNSUPPORTED = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class Spool:
    """A write-only copy of the decompressed tar that gives up past its room."""

    def __init__(self, where: str | os.PathLike[str] | None) -> None:
        self._file: BinaryIO | None = unnamed_file(where, buffering=0)
        fs = os.fstatvfs(self._file.fileno())
        self._room = fs.f_bavail * fs.f_frsize // 4
        self._written = False

    def write(self, data: bytes) -> None:
        if self._file is None:
            return
        self._room -= len(data)
        if self._room < 0:
            self.close()
            return
        self._written = True
        try:
            view = memoryview(data)
            while view:
                view = view[self._file.write(view) :]
        except OSError as exc:
            if exc.errno not in _NO_ROOM:
                raise
            self.close()

    def fileno(self) -> int | None:
        """The spool's descriptor, or None if it holds nothing (not written to,
        or given up)."""
        return self._file.fileno() if self._file is not None and self._written else None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Positional:
    """File data read at its offsets from a descriptor (`base` is where the tar starts)."""

    def __init__(self, fd: int, base: int = 0) -> None:
        self._fd = fd
        self._base = base
        self._sendfile = False  # once copy_file_range was refused

    def copy(self, out: int, offset: int, size: int) -> None:
        position = self._base + offset
        end = position + size
        while position < end:
            if self._sendfile:
                done = os.sendfile(out, self._fd, position, end - position)
            else:
                try:
                    done = os.copy_file_range(self._fd, out, end - position, position)
                except OSError as exc:
                    if exc.errno not in _UNSUPPORTED:
                        raise
                    self._sendfile = True
                    continue
            if done == 0:
                raise OSError(errno.EIO, "the layer file shrank while it was being applied")
            position += done


class Sequential:
    """File data read forward from the tar stream itself (offsets only grow)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._position = 0

    def _read(self, n: int) -> bytes:
        data = self._stream.read(min(n, _CHUNK))
        if not data:
            raise OSError(errno.EIO, "the layer ended early while it was being applied")
        self._position += len(data)
        return data

    def copy(self, out: int, offset: int, size: int) -> None:
        while self._position < offset:
            self._read(offset - self._position)
        while size:
            view = memoryview(self._read(size))
            size -= len(view)
            while view:
                view = view[os.write(out, view) :]
