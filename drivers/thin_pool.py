"""A thin pool in userspace: dm-thin's redirect-on-write model on a data file.

The pool has a data device (a sparse file, or a block device) cut into
fixed-size blocks (64 KiB by default, as Docker's loop-lvm) and metadata
that maps each thin device's virtual blocks to pool blocks. A snapshot
copies its origin's mapping, so both share every block; the first write to a
shared block allocates a new pool block (copying the rest of the old block
for a partial write) and leaves the other device's block alone. Deleting a
device or discarding a range frees the blocks no device maps any more.

Crash safety, as dm-thin's: the metadata on disk is always the last
*committed* transaction. A commit (the device's flush, and every device
operation) writes the data first, then appends one checksummed batch of
changes to a journal and fsyncs it; from time to time the whole state is
written to a checkpoint (checksummed, renamed into place) and the journal
emptied. Blocks freed in the open transaction are not handed out again
before it commits, so a crash never leaves the committed state pointing at
data written since. Reference counts are derived from the mappings on open
rather than stored: two records of one truth could disagree after a crash,
and counting 1M mappings takes milliseconds.

Opening verifies every checksum: a damaged checkpoint, or a damaged batch
with valid ones after it, is refused with ThinCorrupt. Only the journal's
last batch may be torn (a crash mid-append), and it is dropped: that
transaction never committed.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from minifs import failpoints
from minifs.errors import BackendError

DEFAULT_BLOCK = 64 << 10
UNMAPPED = -1
CHECKPOINT_MAGIC = b"MFTHINC1"
BATCH_MAGIC = b"MFJB"
_CHECKPOINT_HEAD = struct.Struct("<8sIQI")  # magic, header length, body length, crc32
_BATCH_HEAD = struct.Struct("<4sQII")  # magic, transaction id, payload length, crc32
JOURNAL_LIMIT = 64 << 20
"""Journal bytes after which a commit writes a checkpoint and empties it."""
MAX_THIN_ID = (1 << 24) - 1
"""dm-thin's device ids are 24 bits; kept so a dump restores into a kernel pool."""


class ThinCorrupt(BackendError):
    """The metadata fails its checksums: reported, never used."""


class ThinFull(BackendError):
    """No free block is left in the pool."""


class ThinBusy(BackendError):
    """A device operation on a device that is open."""


@dataclass
class Device:
    """One thin device: a name (the snapshot id), its virtual size, its mapping."""

    thin_id: int
    name: str
    size: int
    mapping: array
    readonly: bool = False
    origin: int | None = None
    """The device it was snapshotted from (None for a fresh device), for usage."""
    creation_time: int = 0
    snap_time: int = 0

    def header(self) -> dict:
        return {
            "id": self.thin_id,
            "name": self.name,
            "size": self.size,
            "readonly": self.readonly,
            "origin": self.origin,
            "creation_time": self.creation_time,
            "snap_time": self.snap_time,
            "blocks": len(self.mapping),
        }


@dataclass
class _Pending:
    """The open transaction: mapping changes and device operations since the
    last commit, and blocks freed that may not be reused before it commits."""

    ops: list[dict] = field(default_factory=list)
    maps: dict[int, dict[int, int]] = field(default_factory=dict)
    freed: set[int] = field(default_factory=set)

    def empty(self) -> bool:
        return not (self.ops or self.maps)


def _blocks(size: int, block: int) -> int:
    return -(-size // block)


class ThinPool:
    """An open pool: its data device and its metadata directory.

    Not thread-safe: the FUSE daemon calls it from one event loop."""

    def __init__(self, meta_dir: Path, data: Path) -> None:
        self.meta_dir = meta_dir
        self.data_path = data
        self.devices: dict[int, Device] = {}
        self.by_name: dict[str, Device] = {}
        self.transaction = 0
        self.time = 0
        self.block = DEFAULT_BLOCK
        self.nr_blocks = 0
        self.refcount = array("I")
        self.pending = _Pending()
        self._cursor = 0
        self._free = 0
        self._load()
        self.fd = os.open(data, os.O_RDWR | os.O_CLOEXEC)

    # -- making and opening ------------------------------------------------------

    @staticmethod
    def format(meta_dir: Path, data: Path, block: int) -> None:
        """Write the empty metadata of a new pool over the data device `data`
        (its size fixes the block count); refused where metadata exists."""
        if block < 4096 or block & (block - 1) or block > (1 << 30):
            raise BackendError(f"thin block size {block} is not a power of two from 4K to 1G")
        meta_dir.mkdir(parents=True, exist_ok=True)
        if (meta_dir / "checkpoint").exists():
            raise BackendError(f"{meta_dir} already holds a thin pool's metadata")
        nr_blocks = _device_size(data) // block
        if nr_blocks < 16:
            raise BackendError(f"the data device {data} holds fewer than 16 blocks of {block}")
        header = {"block": block, "nr_blocks": nr_blocks, "transaction": 0, "time": 0}
        _write_checkpoint(meta_dir, header, [])
        (meta_dir / "journal").write_bytes(b"")

    def _load(self) -> None:
        header, devices = _read_checkpoint(self.meta_dir)
        self.block = header["block"]
        self.nr_blocks = header["nr_blocks"]
        self.transaction = header["transaction"]
        self.time = header["time"]
        for device in devices:
            self._add(device)
        for txid, ops, maps in _read_journal(self.meta_dir / "journal"):
            if txid <= self.transaction:
                continue  # in the checkpoint already (a crash before the journal was emptied)
            if txid != self.transaction + 1:
                raise ThinCorrupt(
                    f"thin pool metadata in {self.meta_dir}: journal skips from transaction "
                    f"{self.transaction} to {txid}; restore the metadata from a backup"
                )
            self._replay(ops, maps)
            self.transaction = txid
        self.refcount = array("I", bytes(4 * self.nr_blocks))
        for device in self.devices.values():
            for pblock in device.mapping:
                if pblock != UNMAPPED:
                    self.refcount[pblock] += 1
        self._free = self.refcount.count(0)

    def _add(self, device: Device) -> None:
        self.devices[device.thin_id] = device
        self.by_name[device.name] = device

    def close(self) -> None:
        """Commit, write a checkpoint (a quick next open), close the data device."""
        self.commit()
        self.checkpoint()
        os.close(self.fd)

    # -- the metadata on disk ------------------------------------------------------

    def commit(self) -> None:
        """Make everything written so far durable: data first, then one
        journal batch. Blocks freed in the transaction become free after."""
        os.fsync(self.fd)
        if self.pending.empty():
            self._release_freed()
            return
        maps = array("q")
        ops = list(self.pending.ops)
        for thin_id, changes in self.pending.maps.items():
            ops.append({"op": "map", "id": thin_id, "at": len(maps) // 2, "n": len(changes)})
            for vblock, pblock in changes.items():
                maps.append(vblock)
                maps.append(pblock)
        _append_batch(self.meta_dir / "journal", self.transaction + 1, ops, maps)
        self.transaction += 1
        self.pending = _Pending(freed=self.pending.freed)
        self._release_freed()
        if (self.meta_dir / "journal").stat().st_size > JOURNAL_LIMIT:
            self.checkpoint()

    def _release_freed(self) -> None:
        for pblock in self.pending.freed:
            if self.refcount[pblock] == 0:
                self._free += 1
        self.pending.freed = set()

    def checkpoint(self) -> None:
        """The whole committed state in one checksummed file, then an empty journal."""
        self.commit_needed()
        header = {
            "block": self.block,
            "nr_blocks": self.nr_blocks,
            "transaction": self.transaction,
            "time": self.time,
        }
        _write_checkpoint(self.meta_dir, header, list(self.devices.values()))
        with open(self.meta_dir / "journal", "wb") as f:
            os.fsync(f.fileno())

    def commit_needed(self) -> None:
        if not self.pending.empty():
            self.commit()

    def _replay(self, ops: list[dict], maps: array) -> None:
        for op in ops:
            kind = op["op"]
            if kind == "create":
                blocks = _blocks(op["size"], self.block)
                self._add(Device(op["id"], op["name"], op["size"], array("q", [UNMAPPED]) * blocks))
                self.devices[op["id"]].creation_time = op["time"]
            elif kind == "snap":
                origin = self.devices[op["origin"]]
                self._add(_snapshot_of(origin, op["id"], op["name"], op["time"]))
                origin.snap_time = op["time"]
                self.time = max(self.time, op["time"])
            elif kind == "delete":
                gone = self.devices.pop(op["id"])
                del self.by_name[gone.name]
            elif kind == "set":
                device = self.devices[op["id"]]
                if "name" in op:
                    del self.by_name[device.name]
                    device.name = op["name"]
                    self.by_name[device.name] = device
                if "readonly" in op:
                    device.readonly = op["readonly"]
                if "size" in op:
                    _resize_mapping(device, op["size"], self.block)
            elif kind == "map":
                mapping = self.devices[op["id"]].mapping
                at = op["at"] * 2
                for i in range(at, at + op["n"] * 2, 2):
                    mapping[maps[i]] = maps[i + 1]
            else:
                raise ThinCorrupt(f"thin pool metadata in {self.meta_dir}: unknown step {kind!r}")

    # -- device operations (each commits) --------------------------------------------

    def device(self, name: str) -> Device:
        try:
            return self.by_name[name]
        except KeyError:
            raise BackendError(f"no thin device {name!r} in the pool") from None

    def _new_id(self) -> int:
        thin_id = max(self.devices, default=0) + 1
        if thin_id > MAX_THIN_ID:
            free = set(range(1, MAX_THIN_ID + 1)) - set(self.devices)
            if not free:
                raise ThinFull("the pool has no thin device id left")
            thin_id = min(free)
        return thin_id

    def _operation(self, op: dict) -> None:
        """Apply one device operation and commit it at once, as dm-thin does
        for create_thin/create_snap/delete: what it made is durable on return."""
        self.commit_needed()
        self._replay([op], array("q"))
        self.pending.ops.append(op)
        failpoints.hit(f"thin:{op['op']}-before-commit")  # the crash tests' daemon kill
        self.commit()

    def create(self, name: str, size: int) -> Device:
        self._unique(name)
        self._operation(
            {"op": "create", "id": self._new_id(), "name": name, "size": size, "time": self.time}
        )
        return self.by_name[name]

    def snapshot(self, origin: str, name: str) -> Device:
        self._unique(name)
        source = self.device(origin)
        self.commit_needed()  # the origin's writes so far belong to the snapshot
        op = {"op": "snap", "id": self._new_id(), "name": name, "origin": source.thin_id}
        op["time"] = self.time + 1
        self._operation(op)
        made = self.by_name[name]
        for pblock in made.mapping:
            if pblock != UNMAPPED:
                self.refcount[pblock] += 1
        return made

    def _unique(self, name: str) -> None:
        if name in self.by_name:
            raise BackendError(f"the pool already has a thin device {name!r}")

    def delete(self, name: str) -> None:
        device = self.by_name.get(name)
        if device is None:
            return
        self._operation({"op": "delete", "id": device.thin_id})
        freed = [p for p in device.mapping if p != UNMAPPED]
        self._unref(freed)
        self._release_freed()  # committed: the blocks are free now

    def set(self, device_name: str, **changes: object) -> None:
        """Rename, mark read-only, or resize (blocks past a smaller size are freed)."""
        device = self.device(device_name)
        if "name" in changes:
            self._unique(str(changes["name"]))
        dropped = []
        if "size" in changes:
            keep = _blocks(int(changes["size"]), self.block)  # type: ignore[arg-type]
            dropped = [p for p in device.mapping[keep:] if p != UNMAPPED]
        self._operation({"op": "set", "id": device.thin_id, **changes})
        self._unref(dropped)
        self._release_freed()

    def _unref(self, pblocks: list[int]) -> None:
        for pblock in pblocks:
            self.refcount[pblock] -= 1
            if self.refcount[pblock] == 0:
                self.pending.freed.add(pblock)

    # -- I/O -------------------------------------------------------------------------

    def _allocate(self) -> int:
        """The next free block after the cursor (dm-thin allocates in order too,
        which keeps a sequential write sequential on the data device)."""
        if self._free <= 0:
            raise ThinFull(f"the thin pool is full ({self.nr_blocks} blocks of {self.block})")
        refcount, freed = self.refcount, self.pending.freed
        for start, stop in ((self._cursor, self.nr_blocks), (0, self._cursor)):
            for pblock in range(start, stop):
                if refcount[pblock] == 0 and pblock not in freed:
                    self._cursor = pblock + 1
                    self._free -= 1
                    return pblock
        raise ThinFull(f"the thin pool is full ({self.nr_blocks} blocks of {self.block})")

    def _map(self, device: Device, vblock: int, pblock: int) -> None:
        device.mapping[vblock] = pblock
        self.pending.maps.setdefault(device.thin_id, {})[vblock] = pblock

    def _pieces(self, device: Device, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(virtual block, offset in it, length) covering a byte range, clipped
        to the device."""
        end = min(offset + length, device.size)
        while offset < end:
            vblock, inner = divmod(offset, self.block)
            take = min(self.block - inner, end - offset)
            yield vblock, inner, take
            offset += take

    def read(self, name: str, offset: int, length: int) -> bytes:
        device = self.device(name)
        out = bytearray()
        run_start, run_len = -1, 0  # a run of contiguous pool bytes, read with one pread
        for vblock, inner, take in self._pieces(device, offset, length):
            pblock = device.mapping[vblock]
            if pblock != UNMAPPED:
                where = pblock * self.block + inner
                if run_len and run_start + run_len == where:
                    run_len += take
                    continue
                if run_len:
                    out += os.pread(self.fd, run_len, run_start)
                run_start, run_len = where, take
                continue
            if run_len:
                out += os.pread(self.fd, run_len, run_start)
                run_len = 0
            out += bytes(take)
        if run_len:
            out += os.pread(self.fd, run_len, run_start)
        return bytes(out)

    def write(self, name: str, offset: int, data: bytes | memoryview) -> int:
        device = self.device(name)
        if device.readonly:
            raise BackendError(f"thin device {name} is read-only")
        if offset >= device.size:
            raise ThinFull(f"write past the end of thin device {name}")
        view = memoryview(data)
        buffers: list[memoryview | bytes] = []
        run_start, run_len, done = -1, 0, 0
        for vblock, inner, take in self._pieces(device, offset, len(view)):
            piece = view[done : done + take]
            done += take
            pblock = device.mapping[vblock]
            if pblock == UNMAPPED or self.refcount[pblock] > 1:
                pblock, piece = self._redirect(device, vblock, pblock, inner, piece)
                inner = 0
            where = pblock * self.block + inner
            if run_len and run_start + run_len == where:
                buffers.append(piece)
                run_len += len(piece)
                continue
            if run_len:
                _pwritev(self.fd, buffers, run_start)
            buffers, run_start, run_len = [piece], where, len(piece)
        if run_len:
            _pwritev(self.fd, buffers, run_start)
        return done

    def _redirect(
        self, device: Device, vblock: int, old: int, inner: int, piece: memoryview
    ) -> tuple[int, memoryview | bytes]:
        """Give `vblock` a block of its own; returns it and the whole block's
        new content when the write covers only part of it (the rest copied
        from the shared block, or zeros)."""
        new = self._allocate()
        if len(piece) != self.block:
            if old == UNMAPPED:
                whole = bytearray(self.block)
            else:
                whole = bytearray(os.pread(self.fd, self.block, old * self.block))
            whole[inner : inner + len(piece)] = piece
            piece = memoryview(whole)
        if old != UNMAPPED:
            self._unref([old])
        self.refcount[new] = 1
        self._map(device, vblock, new)
        return new, piece

    def discard(self, name: str, offset: int, length: int) -> None:
        """Unmap whole blocks in the range (freed where nothing else maps them)
        and zero the partial ones, as a punched hole reads."""
        device = self.device(name)
        for vblock, inner, take in list(self._pieces(device, offset, length)):
            pblock = device.mapping[vblock]
            if pblock == UNMAPPED:
                continue
            if take == self.block:
                self._map(device, vblock, UNMAPPED)
                self._unref([pblock])
            else:
                self.write(name, vblock * self.block + inner, bytes(take))

    # -- what the driver and `minifs thin dump` read --------------------------------

    def own_blocks(self, name: str) -> int:
        """Blocks `name` maps differently from its origin: what it holds itself."""
        device = self.device(name)
        origin = self.devices.get(device.origin) if device.origin is not None else None
        if origin is None:
            return len(device.mapping) - device.mapping.count(UNMAPPED)
        theirs = origin.mapping
        return sum(
            1
            for i, p in enumerate(device.mapping)
            if p != UNMAPPED and (i >= len(theirs) or theirs[i] != p)
        )

    def status(self) -> dict:
        return {
            "transaction": self.transaction,
            "block": self.block,
            "nr_blocks": self.nr_blocks,
            "free_blocks": self._free,
            "devices": {
                d.name: {
                    "id": d.thin_id,
                    "size": d.size,
                    "readonly": d.readonly,
                    "mapped": len(d.mapping) - d.mapping.count(UNMAPPED),
                    "origin": self.devices[d.origin].name if d.origin in self.devices else None,
                }
                for d in self.devices.values()
            },
        }


def _snapshot_of(origin: Device, thin_id: int, name: str, time: int) -> Device:
    return Device(
        thin_id,
        name,
        origin.size,
        array("q", origin.mapping),
        origin=origin.thin_id,
        creation_time=time,
        snap_time=time,
    )


def _resize_mapping(device: Device, size: int, block: int) -> None:
    blocks = _blocks(size, block)
    have = len(device.mapping)
    if blocks < have:
        del device.mapping[blocks:]
    else:
        device.mapping.extend(array("q", [UNMAPPED]) * (blocks - have))
    device.size = size


def _pwritev(fd: int, buffers: list, offset: int) -> None:
    total = sum(len(b) for b in buffers)
    written = os.pwritev(fd, buffers, offset)
    if written != total:  # short write: finish it piece by piece
        data = b"".join(bytes(b) for b in buffers)
        while written < total:
            written += os.pwrite(fd, data[written:], offset + written)


def _device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


# -- file formats ------------------------------------------------------------------


def _write_checkpoint(meta_dir: Path, header: dict, devices: list[Device]) -> None:
    """Header JSON then each device's mapping, one crc32 over both; written
    under a temporary name, fsynced, renamed, and the directory fsynced."""
    head = json.dumps({**header, "devices": [d.header() for d in devices]}).encode()
    crc = zlib.crc32(head)
    for device in devices:
        crc = zlib.crc32(device.mapping, crc)
    body = len(head) + sum(len(d.mapping) * 8 for d in devices)
    tmp = meta_dir / "checkpoint.tmp"
    with open(tmp, "wb") as f:
        f.write(_CHECKPOINT_HEAD.pack(CHECKPOINT_MAGIC, len(head), body, crc))
        f.write(head)
        for device in devices:
            f.write(device.mapping.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, meta_dir / "checkpoint")
    _fsync_dir(meta_dir)


def _read_checkpoint(meta_dir: Path) -> tuple[dict, list[Device]]:
    path = meta_dir / "checkpoint"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ThinCorrupt(
            f"thin pool metadata {path} is missing; restore it, or move the pool's home "
            "aside to start an empty store"
        ) from None
    damaged = ThinCorrupt(
        f"thin pool metadata {path} is damaged (checksum mismatch); restore it from a "
        "backup, or move the pool's home aside to start an empty store"
    )
    if len(raw) < _CHECKPOINT_HEAD.size:
        raise damaged
    magic, head_len, body_len, crc = _CHECKPOINT_HEAD.unpack_from(raw)
    body = memoryview(raw)[_CHECKPOINT_HEAD.size :]
    if magic != CHECKPOINT_MAGIC or len(body) != body_len or zlib.crc32(body) != crc:
        raise damaged
    try:
        header = json.loads(bytes(body[:head_len]))
    except ValueError:
        raise damaged from None
    devices, at = [], head_len
    for d in header.pop("devices"):
        mapping = array("q")
        mapping.frombytes(body[at : at + d["blocks"] * 8])
        at += d["blocks"] * 8
        devices.append(
            Device(
                d["id"],
                d["name"],
                d["size"],
                mapping,
                d["readonly"],
                d["origin"],
                d["creation_time"],
                d["snap_time"],
            )
        )
    return header, devices


def _append_batch(journal: Path, txid: int, ops: list[dict], maps: array) -> None:
    head = json.dumps(ops).encode()
    payload = struct.pack("<I", len(head)) + head + maps.tobytes()
    record = _BATCH_HEAD.pack(BATCH_MAGIC, txid, len(payload), zlib.crc32(payload)) + payload
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, record)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _read_journal(journal: Path) -> Iterator[tuple[int, list[dict], array]]:
    """Each whole, valid batch in order. A bad batch at the end is a torn
    append and ends the journal; one with more bytes after it is damage."""
    try:
        raw = journal.read_bytes()
    except FileNotFoundError:
        return
    at = 0
    while at < len(raw):
        end = at + _BATCH_HEAD.size
        magic, txid, length, crc = (
            _BATCH_HEAD.unpack_from(raw, at) if end <= len(raw) else (b"", 0, 0, 0)
        )
        payload = raw[end : end + length]
        if magic != BATCH_MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
            if end + length < len(raw) and magic == BATCH_MAGIC:
                raise ThinCorrupt(
                    f"thin pool journal {journal} is damaged at byte {at} (checksum mismatch "
                    "before later transactions); restore the metadata from a backup"
                )
            with contextlib.suppress(OSError):  # drop the torn tail so appends follow valid ones
                os.truncate(journal, at)
            return
        (head_len,) = struct.unpack_from("<I", payload)
        ops = json.loads(payload[4 : 4 + head_len])
        maps = array("q")
        maps.frombytes(payload[4 + head_len :])
        yield txid, ops, maps
        at = end + length


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
