"""The content store: blobs addressed by digest, independent of any driver.

As in containerd, an image's manifest, config and layer tars live here once,
whatever drivers they are later unpacked into. Writers stage blobs in a
private directory (`Staging`) and only move them into `blobs/sha256/` under the
state lock, together with the image record that references them; so the
garbage collector, which also runs under the lock, never sees a blob that an
import in progress still needs.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from minifs.errors import InvalidArgument, NotFound

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import BinaryIO

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_JSON = 4 << 20
"""Manifests and configs are small; a bigger one is refused rather than parsed."""


def check_digest(digest: str) -> str:
    if not DIGEST_RE.fullmatch(digest):
        raise InvalidArgument(f"bad digest {digest[:80]!r}; expected sha256:<64 hex digits>")
    return digest


def digest_bytes(data: bytes) -> str:
    """The digest of a small blob (a manifest, a config): checked on every read."""
    from minifs.smallhash import sha256

    return "sha256:" + sha256(data).hexdigest()


class ContentStore:
    def __init__(self, state_root: Path) -> None:
        self.root = state_root / "content"
        self.blobs = self.root / "blobs" / "sha256"

    def path(self, digest: str) -> Path:
        return self.blobs / check_digest(digest)[7:]

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def read(self, digest: str, limit: int = MAX_JSON) -> bytes:
        """A small blob (manifest, config), checked against its digest."""
        try:
            with open(self.path(digest), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise NotFound(
                f"blob {digest} is missing from the content store; import the image again"
            ) from None
        if len(data) > limit:
            raise InvalidArgument(f"blob {digest} is larger than {limit} bytes")
        if digest_bytes(data) != digest:
            raise InvalidArgument(f"blob {digest} is corrupt; remove the image and import it again")
        return data

    def digests(self) -> set[str]:
        try:
            return {"sha256:" + n for n in os.listdir(self.blobs) if len(n) == 64}
        except FileNotFoundError:
            return set()

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    @contextlib.contextmanager
    def staging(self, scratch: Path) -> Iterator[Staging]:
        """A private directory to stage blobs in; dropped afterwards whatever happens."""
        from minifs.layers.scratch import make_dir

        scratch.mkdir(parents=True, exist_ok=True)
        where = make_dir(scratch, "ingest")  # named for its owner: see scratch.sweep
        try:
            yield Staging(self, where)
        finally:
            import shutil  # only for writing: reading an image needs neither

            shutil.rmtree(where, ignore_errors=True)


class Staging:
    """Blobs being imported, not yet visible in the store."""

    def __init__(self, store: ContentStore, where: Path) -> None:
        self.store = store
        self.where = where
        self.staged: dict[str, Path] = {}

    def path(self, digest: str) -> Path:
        """Where a blob can be read now: staged, or already in the store."""
        staged = self.staged.get(digest)
        return staged if staged is not None else self.store.path(digest)

    def has(self, digest: str) -> bool:
        return digest in self.staged or self.store.has(digest)

    def add_bytes(self, data: bytes) -> str:
        digest = digest_bytes(data)
        if not self.has(digest):
            target = self.where / digest[7:]
            target.write_bytes(data)
            self.staged[digest] = target
        return digest

    def add_stream(self, stream: BinaryIO, expected: str | None = None) -> str:
        """Copy a blob in, hashing it; refuse it if it is not `expected`."""
        import hashlib
        import tempfile

        fd, tmp = tempfile.mkstemp(dir=self.where, prefix="part-")
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        found = "sha256:" + digest.hexdigest()
        if expected is not None and found != expected:
            os.unlink(tmp)
            raise InvalidArgument(
                f"blob should be {expected} but its content is {found}; the archive is corrupt"
            )
        if self.has(found):
            os.unlink(tmp)
        else:
            target = self.where / found[7:]
            os.replace(tmp, target)
            self.staged[found] = target
        return found

    def new_file(self) -> Path:
        """A path to write a blob to, then hand to `adopt` with its digest."""
        import tempfile

        fd, tmp = tempfile.mkstemp(dir=self.where, prefix="part-")
        os.close(fd)
        return Path(tmp)

    def adopt(self, path: Path, digest: str) -> str:
        """Stage a file written through `new_file`, whose digest the writer computed."""
        if self.has(check_digest(digest)):
            path.unlink()
        else:
            target = self.where / digest[7:]
            os.replace(path, target)
            self.staged[digest] = target
        return digest

    def commit(self, needed: set[str]) -> None:
        """Move staged blobs into the store, durably (the record that will point
        at them is committed with a full sync); call under the state lock."""
        self.store.blobs.mkdir(parents=True, exist_ok=True)
        for digest in sorted(needed):
            staged = self.staged.get(digest)
            if staged is not None:
                fd = os.open(staged, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(staged, self.store.path(digest))
            elif not self.store.has(digest):
                raise NotFound(
                    f"blob {digest} vanished from the content store during the import "
                    "(an 'image rm' ran meanwhile); import again"
                )
        fd = os.open(self.store.blobs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for digest in needed:
            # Only what moved: an archive's other images still need their staged blobs.
            self.staged.pop(digest, None)
