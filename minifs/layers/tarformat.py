"""A strict, streaming reader and a reproducible writer for layer tars.

Python's `tarfile` is lenient where a layer must not be: it treats a corrupt
header in mid-archive as the end of the archive, accepts an archive cut at an
entry boundary as complete, and keeps every member in a list. Layers are
hostile input, so this reader fails on anything it does not understand, knows
where every byte went (the diff_id covers the whole stream), and keeps nothing
but the current entry.

Supported: POSIX ustar, PAX (local and global headers, `SCHILY.xattr.*` and
`LIBARCHIVE.xattr.*` xattrs, fractional mtimes), GNU long names and long link
names, base-256 numbers. Refused: GNU sparse files, multi-volume and vendor
entries, a PAX or long-name header that is too big, data after the
end-of-archive marker, and an archive without one.
"""

from __future__ import annotations

import base64
import hashlib
import stat
import struct
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO
from zlib import adler32

from minifs.errors import InvalidArgument

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_MODE_TO_MTIME = struct.Struct("8s8s8s12x12s")
MAX_META = 1 << 20
"""Largest PAX or GNU long-name header accepted: names are at most 4096 bytes."""

FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCKDEV, FIFO = (
    "file",
    "dir",
    "symlink",
    "hardlink",
    "char",
    "block",
    "fifo",
)

_TYPES = {
    b"0": FILE,
    b"\0": FILE,
    b"7": FILE,
    b"1": HARDLINK,
    b"2": SYMLINK,
    b"3": CHAR,
    b"4": BLOCKDEV,
    b"5": DIR,
    b"6": FIFO,
}
_FLAGS = {v: k for k, v in _TYPES.items() if k not in (b"\0", b"7")}
_IFMT = {
    FILE: stat.S_IFREG,
    DIR: stat.S_IFDIR,
    SYMLINK: stat.S_IFLNK,
    CHAR: stat.S_IFCHR,
    BLOCKDEV: stat.S_IFBLK,
    FIFO: stat.S_IFIFO,
}


class BadLayer(InvalidArgument):
    """A layer tar that is refused: corrupt, truncated, hostile or unsupported."""


def show(name: bytes) -> str:
    """An entry name as it can be printed on one line."""
    text = name.decode("utf-8", "backslashreplace")
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= 200 else text[:200] + "..."


@dataclass(slots=True)
class Entry:
    """One archive member, with names as raw bytes exactly as stored."""

    name: bytes
    type: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @property
    def ifmt(self) -> int:
        return _IFMT[self.type]


# -- reading ---------------------------------------------------------------------


def _octal_text(field_: bytes) -> bytes | None:
    """The digits of a NUL- or space-terminated octal field, or None if it has others."""
    text = field_.split(b"\0", 1)[0].strip(b" ")
    return None if text.translate(None, b"01234567") else text


def _number(field_: bytes, what: str, name: bytes) -> int:
    if field_[0] & 0x80:
        # GNU/star base-256: the marker bit, then a two's complement number in the
        # rest of the field (bit 0x40 of the first byte is its sign).
        if field_[0] & 0x40:
            raise BadLayer(f"entry {show(name)}: negative {what}")
        return int.from_bytes(bytes([field_[0] & 0x3F]) + field_[1:], "big")
    text = _octal_text(field_)
    if text is None:
        raise BadLayer(f"entry {show(name)}: {what} field {field_[:20]!r} is not octal")
    return int(text, 8) if text else 0


def _numbers(block: bytes, name: bytes) -> tuple[int, int, int, int]:
    """Mode, uid, gid and mtime (in seconds) of a header: `_number`, with the
    common case (octal digits, then NULs or spaces) in a few C calls, as a
    layer of many small files has a header per few KiB."""
    mode, uid, gid, mtime = _MODE_TO_MTIME.unpack_from(block, 100)
    mode, uid, gid = mode.rstrip(b"\0 "), uid.rstrip(b"\0 "), gid.rstrip(b"\0 ")
    mtime = mtime.rstrip(b"\0 ")
    if mode and uid and gid and mtime and (mode + uid + gid + mtime).isdigit():
        try:
            return int(mode, 8), int(uid, 8), int(gid, 8), int(mtime, 8)
        except ValueError:  # an 8 or a 9: the slow path names it
            pass
    return (
        _number(block[100:108], "mode", name),
        _number(block[108:116], "uid", name),
        _number(block[116:124], "gid", name),
        _number(block[136:148], "mtime", name),
    )


def _size(block: bytes) -> int:
    text = block[124:136].rstrip(b"\0 ")
    if text.isdigit() and b"8" not in text and b"9" not in text:
        return int(text, 8)
    return _number(block[124:136], "size", block[:100].split(b"\0", 1)[0])


def _checksum_ok(block: bytes) -> bool:
    stored = _octal_text(block[148:156])
    if not stored:
        return False
    # The sum of the bytes, the checksum field counted as spaces. adler32's low
    # half is 1 + the byte sum mod 65521, exact for 256 bytes (at most 65280),
    # and far cheaper than sum() over 512 ints.
    total = (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2
    unsigned = total - sum(block[148:156]) + 8 * 32
    if int(stored, 8) == unsigned:
        return True
    # Some old writers summed signed chars.
    signed = unsigned - 256 * sum(1 for b in (*block[:148], *block[156:]) if b > 127)
    return int(stored, 8) == signed


def _pax_records(data: bytes) -> Iterator[tuple[str, bytes]]:
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # some writers pad the record block with NULs
            break
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            raise BadLayer("malformed PAX header record")
        length = int(data[pos:space])
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n"):
            raise BadLayer("malformed PAX header record")
        key, sep, value = record[:-1].partition(b"=")
        if not sep:
            raise BadLayer("malformed PAX header record")
        try:
            yield key.decode("utf-8"), value
        except UnicodeDecodeError:
            raise BadLayer("PAX header key is not UTF-8") from None
        pos += length


def _pax_time(value: bytes) -> int:
    text = value.decode("ascii", "replace")
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise BadLayer(f"bad PAX time {value[:30]!r}")
    ns = int(whole) * 1_000_000_000 + int(frac[:9].ljust(9, "0"))
    return -ns if negative else ns


class TarReader:
    """Iterate the entries of a tar stream. Their data is passed over: right
    after `next`, `offset` says where the entry's data starts in the stream,
    for whoever reads it from there (pass 2 of an apply, image import).

    The stream is read in large chunks into one buffer that headers are sliced
    from and skipped data only moves a position in: a layer of many small files
    then costs a few Python operations per entry, not several reads. Every byte
    of the stream is still read, in order, so a hashing wrapper below sees the
    whole archive, trailing padding included.
    """

    CHUNK = 1 << 20

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._buf = b""
        self._pos = 0  # next unread byte in _buf
        self._rest = 0  # the current entry's data and padding, not read yet
        self.offset = 0
        self._globals: dict[str, bytes] = {}
        self.current: Entry | None = None
        self._last: bytes | None = None

    def _read(self, n: int) -> bytes:
        """Up to `n` bytes, fewer only at the end of the stream."""
        pos = self._pos
        end = pos + n
        if end <= len(self._buf):
            self._pos = end
            self.offset += n
            return self._buf[pos:end]
        chunks = [self._buf[pos:]] if pos < len(self._buf) else []
        have = len(self._buf) - pos if chunks else 0
        while have < n:
            chunk = self._stream.read(max(self.CHUNK, n - have))
            if not chunk:
                break
            chunks.append(chunk)
            have += len(chunk)
        data = b"".join(chunks)
        self._buf, self._pos = data, min(n, len(data))
        self.offset += self._pos
        return data[:n]

    def _skip(self, n: int) -> None:
        """Pass over `n` bytes (read, so they are hashed, but never copied out)."""
        rest = len(self._buf) - self._pos
        if n <= rest:
            self._pos += n
            self.offset += n
            return
        self.offset += rest
        n -= rest
        self._buf, self._pos = b"", 0
        while n:
            chunk = self._stream.read(self.CHUNK)
            if not chunk:
                raise BadLayer(f"archive is truncated inside {self._where()}")
            if len(chunk) > n:
                self._buf, self._pos = chunk, n
                self.offset += n
                return
            self.offset += len(chunk)
            n -= len(chunk)

    def _exact(self, n: int, what: str | None = None) -> bytes:
        """Exactly `n` bytes; `what` names the part for the error (default: the
        current entry, worked out only when it is needed)."""
        data = self._read(n)
        if len(data) != n:
            raise BadLayer(f"archive is truncated inside {what or self._where()}")
        return data

    def _where(self) -> str:
        return f"entry {show(self.current.name)}" if self.current else "a header"

    def _skip_rest(self) -> None:
        if self._rest:
            self._skip(self._rest)
            self._rest = 0

    def _member_data(self, size: int, what: str) -> bytes:
        if size > MAX_META:
            raise BadLayer(f"{what} of {size} bytes is larger than the {MAX_META} allowed")
        data = self._exact(size, what)
        self._exact(-size % BLOCK, what)
        return data

    def __iter__(self) -> Iterator[Entry]:
        while (entry := self.next()) is not None:
            yield entry

    def next(self) -> Entry | None:
        """The next entry, or None at a well-formed end of the archive."""
        self._skip_rest()
        self.current = None
        pax: dict[str, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            block = self._read(BLOCK)
            if not block:
                raise BadLayer("archive is truncated: it ends without an end-of-archive marker")
            if len(block) != BLOCK:
                raise BadLayer("archive is truncated inside a header")
            if block == _ZERO_BLOCK:
                self._finish()
                return None
            if not _checksum_ok(block):
                after = f", after entry {show(self._last)}" if self._last else ""
                where = self.offset - BLOCK
                raise BadLayer(f"corrupt header at byte {where}{after} (bad checksum)")
            flag = block[156:157]
            size = _size(block)
            if flag in (b"x", b"g"):
                records = dict(_pax_records(self._member_data(size, "PAX header")))
                (pax if flag == b"x" else self._globals).update(records)
                if sum(len(k) + len(v) for k, v in self._globals.items()) > MAX_META:
                    # Global headers accumulate over the whole archive: bound them too.
                    raise BadLayer(f"PAX global headers exceed {MAX_META} bytes")
                continue
            if flag == b"L":
                long_name = self._member_data(size, "GNU long name").split(b"\0", 1)[0]
                continue
            if flag == b"K":
                long_link = self._member_data(size, "GNU long link name").split(b"\0", 1)[0]
                continue
            if self._globals:
                pax = {**self._globals, **pax}
            entry = self._entry(block, flag, size, pax, long_name, long_link)
            self.current = entry
            self._last = entry.name
            self._rest = entry.size + -entry.size % BLOCK  # 0 but for a file
            return entry

    def _entry(
        self,
        block: bytes,
        flag: bytes,
        size: int,
        pax: Mapping[str, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> Entry:
        name = block[0:100].split(b"\0", 1)[0]
        if block[257:265] == b"ustar\x0000" and block[345]:
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        if long_name is not None:
            name = long_name
        if pax:
            name = pax.get("path", name)
            # GNU sparse 0.x/1.0 in PAX form store the real name apart; name that one.
            name = pax.get("GNU.sparse.name", name)
        kind = _TYPES.get(flag)
        if kind is None:
            what = {b"S": "a GNU sparse file", b"V": "a volume label", b"M": "multi-volume"}
            raise BadLayer(
                f"entry {show(name)}: unsupported entry type "
                f"{what.get(flag, repr(flag.decode('latin-1')))}"
            )
        if kind == FILE and name.endswith(b"/"):
            kind = DIR
        if pax and any(k.startswith("GNU.sparse") for k in pax):
            raise BadLayer(
                f"entry {show(name)}: GNU sparse files are not supported; "
                "archive it without --sparse"
            )
        mode, uid, gid, mtime = _numbers(block, name)
        link = block[157:257].split(b"\0", 1)[0] if block[157] else b""
        entry = Entry(name, kind, mode & 0o7777, uid, gid, size, mtime * 1_000_000_000, link)
        if kind in (CHAR, BLOCKDEV):
            entry.devmajor = _number(block[329:337], "devmajor", name)
            entry.devminor = _number(block[337:345], "devminor", name)
        if long_link is not None:
            entry.linkname = long_link
        for key, value in pax.items():
            if key == "linkpath":
                entry.linkname = value
            elif key in ("size", "uid", "gid"):
                if not value.isdigit():
                    raise BadLayer(f"entry {show(name)}: PAX {key} {value[:30]!r} is not a number")
                setattr(entry, key, int(value))
            elif key == "mtime":
                entry.mtime_ns = _pax_time(value)
            elif key.startswith("SCHILY.xattr."):
                entry.xattrs[key[13:]] = value
            elif key.startswith("LIBARCHIVE.xattr."):
                try:
                    xname = urllib.parse.unquote(key[17:], errors="strict")
                    entry.xattrs[xname] = base64.b64decode(value + b"==", validate=False)
                except (UnicodeDecodeError, ValueError):
                    raise BadLayer(f"entry {show(name)}: malformed LIBARCHIVE xattr") from None
        if entry.type != FILE:
            # Only regular files carry data; a size on anything else is a lie.
            if entry.size and entry.type != HARDLINK:
                raise BadLayer(f"entry {show(name)}: a {entry.type} cannot carry data")
            entry.size = 0
        return entry

    def _finish(self) -> None:
        """After the first zero block only zeros may follow, up to the end."""
        while chunk := self._read(1 << 16):
            if chunk.count(0) != len(chunk):
                raise BadLayer(
                    "data after the end-of-archive marker (a second archive or a corrupt header)"
                )


# -- writing ---------------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _fits(text: bytes, width: int) -> bool:
    return len(text) < width and text.isascii()


def _header(
    name: bytes, flag: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, **more: object
) -> bytes:
    block = bytearray(BLOCK)
    block[0:100] = name[:100].ljust(100, b"\0")
    block[100:108] = _octal(mode, 8)
    block[108:116] = _octal(uid, 8)
    block[116:124] = _octal(gid, 8)
    block[124:136] = _octal(size, 12)
    block[136:148] = _octal(mtime, 12)
    block[156:157] = flag
    link = more.get("linkname", b"")
    assert isinstance(link, bytes)
    block[157:257] = link[:100].ljust(100, b"\0")
    block[257:265] = b"ustar\x0000"
    block[329:337] = _octal(int(more.get("devmajor", 0)), 8)  # type: ignore[call-overload]
    block[337:345] = _octal(int(more.get("devminor", 0)), 8)  # type: ignore[call-overload]
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


class TarWriter:
    """Write PAX tars whose bytes depend only on the entries given.

    No user or group names, whole-second mtimes, PAX records in sorted order
    and only when a value does not fit the ustar header, and exactly two zero
    blocks at the end (no record padding), as Go's archive/tar writes them.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self.digest.update(data)
        self.size += len(data)

    def add(self, entry: Entry, data: Iterator[bytes] | None = None) -> None:
        """Write one entry; `data` yields exactly `entry.size` bytes for a file."""
        mtime = entry.mtime_ns // 1_000_000_000
        pax: dict[str, bytes] = {}
        name = (
            entry.name + b"/" if entry.type == DIR and not entry.name.endswith(b"/") else entry.name
        )
        if not _fits(name, 100):
            pax["path"] = name
        if entry.linkname and not _fits(entry.linkname, 100):
            pax["linkpath"] = entry.linkname
        for key, limit in (("uid", 0o7777777), ("gid", 0o7777777), ("size", 0o77777777777)):
            if getattr(entry, key) > limit:
                pax[key] = str(getattr(entry, key)).encode()
        for key, value in entry.xattrs.items():
            pax["SCHILY.xattr." + key] = value
        if any(not v.isascii() for k, v in pax.items() if k in ("path", "linkpath")):
            try:
                for k in ("path", "linkpath"):
                    pax.get(k, b"").decode("utf-8")
            except UnicodeDecodeError:
                pax["hdrcharset"] = b"BINARY"
        if pax:
            body = b"".join(_pax_record(k, pax[k]) for k in sorted(pax))
            self._write(_header(b"././@PaxHeader", b"x", 0o644, 0, 0, len(body), 0))
            self._write(body + bytes(-len(body) % BLOCK))

        def clamp(v: int, limit: int) -> int:
            return v if v <= limit else 0

        size = entry.size if entry.type == FILE else 0
        self._write(
            _header(
                name if _fits(name, 100) else bytes(c if c < 128 else 63 for c in name[:99]),
                _FLAGS[entry.type],
                entry.mode & 0o7777,
                clamp(entry.uid, 0o7777777),
                clamp(entry.gid, 0o7777777),
                clamp(size, 0o77777777777),
                max(mtime, 0),
                linkname=entry.linkname if _fits(entry.linkname, 100) else b"",
                devmajor=entry.devmajor,
                devminor=entry.devminor,
            )
        )
        if size:
            written = 0
            for chunk in data or ():
                self._write(chunk)
                written += len(chunk)
            if written != size:
                raise BadLayer(f"{show(entry.name)} changed size while it was being archived")
            self._write(bytes(-size % BLOCK))

    def close(self) -> None:
        self._write(bytes(2 * BLOCK))
