"""Layer compression: recognised by magic bytes, decompressed as a bounded stream.

OCI layers come uncompressed, gzip'd or zstd'd; the media type may lie or be
missing (docker save, a plain rootfs tarball), so the first bytes decide. A
decompressing reader counts what it produces and refuses past a limit, which is
what stops a gzip bomb before it fills the disk.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import zlib
from typing import BinaryIO, Protocol

from minifs.errors import InvalidArgument
from minifs.layers.tarformat import BadLayer

GZIP, ZSTD, NONE = "gzip", "zstd", "none"
_MAGIC = ((b"\x1f\x8b", GZIP), (b"\x28\xb5\x2f\xfd", ZSTD))
_REFUSED = ((b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x04\x22\x4d\x18", "lz4"))

LIMIT_ENV = "MINIFS_LAYER_LIMIT"
DEFAULT_LIMIT = 64 << 30
"""Most bytes one layer may decompress to; raise it with MINIFS_LAYER_LIMIT=200G."""


class Sink(Protocol):
    """Where a copy of the decompressed stream goes."""

    def write(self, data: bytes) -> None: ...


def default_limit() -> int:
    from minifs.loopdisk import parse_size

    text = os.environ.get(LIMIT_ENV)
    return parse_size(text) if text else DEFAULT_LIMIT


def sniff(head: bytes) -> str:
    """The compression of a stream that starts with `head`."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    for magic, kind in _REFUSED:
        if head.startswith(magic):
            raise BadLayer(f"{kind}-compressed layers are not supported; use gzip, zstd or none")
    return NONE


class _Counted(io.RawIOBase):
    """Pass reads through, hashing them, and refuse past `limit` bytes."""

    def __init__(
        self,
        inner: BinaryIO,
        limit: int,
        errors: tuple[type[Exception], ...],
        hashed: bool,
        tee: Sink | None,
    ) -> None:
        self._inner = inner
        self._tee = tee
        self.compressed = False
        self._limit = limit
        self._errors = errors
        self.count = 0
        self.digest = hashlib.sha256()
        self._hashed = hashed

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._inner.read(n if n >= 0 else 1 << 20)
        except self._errors as exc:
            raise BadLayer(f"corrupt compressed data ({exc})") from None
        self.count += len(data)
        if self.count > self._limit:
            raise BadLayer(
                f"layer decompresses to more than {self._limit} bytes (a decompression bomb?); "
                f"if it is genuine, raise the limit with {LIMIT_ENV}=SIZE"
            )
        if self._hashed:
            self.digest.update(data)
        if self._tee is not None:
            self._tee.write(data)
        return data

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def open_tar(
    raw: BinaryIO,
    limit: int | None = None,
    hashed: bool = True,
    tee: Sink | None = None,
) -> _Counted:
    """The uncompressed tar stream of `raw`, bounded, and hashed (its diff_id)
    unless a second read does not need it. A gzip'd one is also written to
    `tee` as it is read (see filedata.Spool): inflating runs at ~150 MiB/s, so
    writing it down once beats inflating it twice; zstd decompresses faster
    than that copy could be written and read back."""
    kind = sniff(_peek(raw))
    limit = default_limit() if limit is None else limit
    if kind == GZIP:
        inner: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
        errors: tuple[type[Exception], ...] = (OSError, EOFError, zlib.error)
    elif kind == ZSTD:
        import zstandard

        inner = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        errors, tee = (zstandard.ZstdError,), None
    else:
        inner, errors, tee = raw, (), None
    stream = _Counted(inner, limit, errors, hashed, tee)
    stream.compressed = kind != NONE
    return stream


def _peek(raw: BinaryIO) -> bytes:
    if hasattr(raw, "peek"):
        return raw.peek(8)[:8]
    position = raw.tell()
    head = raw.read(8)
    raw.seek(position)
    return head


def compression_of(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return sniff(f.read(8))


class Compressor(io.RawIOBase):
    """A writable stream compressing into `out`, counting and hashing what it writes
    (the blob's digest and size), for layers going into the content store."""

    def __init__(self, out: BinaryIO, kind: str) -> None:
        self._out = out
        self.kind = kind
        self.digest = hashlib.sha256()
        self.size = 0
        if kind == GZIP:
            # mtime 0 and no file name keep the blob reproducible.
            self._zlib = zlib.compressobj(6, zlib.DEFLATED, 31)
        elif kind == ZSTD:
            import zstandard

            self._zstd = zstandard.ZstdCompressor(level=3).compressobj()
        elif kind != NONE:
            raise InvalidArgument(f"unknown compression {kind!r}; use gzip, zstd or none")

    def writable(self) -> bool:
        return True

    def _emit(self, data: bytes) -> None:
        if data:
            self._out.write(data)
            self.digest.update(data)
            self.size += len(data)

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.kind == GZIP:
            self._emit(self._zlib.compress(data))
        elif self.kind == ZSTD:
            self._emit(self._zstd.compress(data))
        else:
            self._emit(bytes(data))
        return len(data)

    def finish(self) -> None:
        if self.kind == GZIP:
            self._emit(self._zlib.flush())
        elif self.kind == ZSTD:
            self._emit(self._zstd.flush())
