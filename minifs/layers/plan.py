"""The entries pass 1 of an apply accepted, kept for pass 2 in compact batches.

Pass 2 then never parses the archive again (on a layer of small files, header
parsing is half the work of a pass), and it can only ever write what pass 1
validated: a source file changed between the passes changes at most the bytes
of a file, never a name, a type, a link target or an owner.

A layer may hold millions of entries, so the records do not stay in memory:
they are marshalled (C speed, and only plain bytes, ints, strs, tuples and
dicts, so loading them runs no code) in batches into an unnamed temporary file
(O_TMPFILE where the file system has it: nothing is left behind by a crash).
"""

from __future__ import annotations

import marshal
import os
import struct
from collections.abc import Iterator
from typing import NamedTuple

from minifs.layers.safefs import Parts
from minifs.layers.scratch import unnamed_file


class Record(NamedTuple):
    """One entry to write. `link` is the target's parts for a hard link, the
    target for a symlink; `offset` is where a file's data starts in the
    uncompressed tar."""

    type: str
    parts: Parts
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    link: bytes | Parts
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes]
    offset: int
    size: int


_LENGTH = struct.Struct("<Q")


def _weight(record: Record) -> int:
    """Roughly the bytes a record takes as Python objects (a bytes object is
    ~40 bytes before its data, a tuple slot 8)."""
    link = record.link
    weight = 400 + 48 * len(record.parts) + sum(map(len, record.parts))
    weight += 48 * len(link) + sum(map(len, link)) if isinstance(link, tuple) else len(link)
    if record.xattrs:
        weight += sum(100 + len(k) + len(v) for k, v in record.xattrs.items())
    return weight


class Plan:
    """Records appended in archive order, then read back once, in that order.

    A batch is flushed at BATCH records or at about BATCH_BYTES of Python
    objects, whichever comes first: a hostile layer may give every entry
    ~2,000 path components or a megabyte of xattrs."""

    BATCH = 2048
    BATCH_BYTES = 4 << 20

    def __init__(self, where: str | os.PathLike[str] | None) -> None:
        self._file = unnamed_file(where)
        self._batch: list[tuple] = []  # type: ignore[type-arg]
        self._bytes = 0

    def add(self, record: Record) -> None:
        self._batch.append(tuple(record))  # marshal takes plain tuples only
        self._bytes += _weight(record)
        if len(self._batch) >= self.BATCH or self._bytes >= self.BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            blob = marshal.dumps(self._batch)
            self._file.write(_LENGTH.pack(len(blob)) + blob)
            self._batch, self._bytes = [], 0

    def __iter__(self) -> Iterator[Record]:
        self._flush()
        self._file.seek(0)
        while head := self._file.read(_LENGTH.size):
            (length,) = _LENGTH.unpack(head)
            yield from map(Record._make, marshal.loads(self._file.read(length)))

    def close(self) -> None:
        self._file.close()
