"""The state directory: where the metadata store, the lock and driver homes live.

Chosen by `--root`, else `MINIFS_ROOT`, else /var/lib/minifs. Every driver gets
a home under `drivers/<name>/`; what a driver brings up outside its home
(daemons, loop devices, mounts) is recorded under that home's `run/`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from minifs.errors import InUse, StateDirError

DEFAULT_ROOT = Path("/var/lib/minifs")


LAYOUT = {
    "metadata.db": (stat.S_ISREG, "file"),
    "lock": (stat.S_ISREG, "file"),
    "drivers": (stat.S_ISDIR, "directory"),
    "tmp": (stat.S_ISDIR, "directory"),
    "content": (stat.S_ISDIR, "directory"),
    "containers": (stat.S_ISDIR, "directory"),
    "reserve": (stat.S_ISREG, "file"),
    "locks": (stat.S_ISDIR, "directory"),
}
"""What minifs keeps at the top of a state dir, and what each must be."""


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The state dir the user asked for, made absolute so records stay valid.

    An empty --root is refused rather than taken for the current directory,
    where it would scatter a store among the user's files (an empty
    MINIFS_ROOT counts as unset, as empty variables do for docker).
    """
    chosen = root if root is not None else os.environ.get("MINIFS_ROOT") or DEFAULT_ROOT
    if not str(chosen):
        raise StateDirError("--root is empty; pass --root DIR, or leave it out for the default")
    return Path(chosen).absolute()


class StateDir:
    """Paths inside one state directory, created on first use."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = resolve_root(root)

    @property
    def db_path(self) -> Path:
        return self.root / "metadata.db"

    @property
    def drivers_dir(self) -> Path:
        return self.root / "drivers"

    def home(self, driver: str) -> Path:
        return self.drivers_dir / driver

    def check(self) -> None:
        """Refuse a state dir that is not one minifs could have made, before a
        command trips over it with a bare ENOTDIR or EISDIR of its own. One
        that does not exist yet is fine: the first change makes it."""
        try:
            st = os.stat(self.root)
        except NotADirectoryError:
            raise StateDirError(
                f"state dir {self.root} cannot be made: part of its path is a file; "
                "pass --root DIR / set MINIFS_ROOT to a directory"
            ) from None
        except OSError:
            return  # absent (made on first change) or unreachable (the command says why)
        if not stat.S_ISDIR(st.st_mode):
            raise StateDirError(
                f"state dir {self.root} is not a directory; "
                "pass --root DIR / set MINIFS_ROOT to a directory"
            )
        for name, (test, kind) in LAYOUT.items():
            try:
                mode = os.stat(self.root / name).st_mode
            except OSError:
                continue  # absent (made when needed) or unreadable (the command says)
            if not test(mode):
                raise StateDirError(
                    f"state dir {self.root} is damaged: {name} is not a {kind}; move it "
                    "aside, or pass --root DIR / set MINIFS_ROOT to another state dir"
                )

    def ensure(self) -> None:
        """Create the state dir, or say in one line why it cannot be used."""
        try:
            self.drivers_dir.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = "run as root" if exc.errno in (errno.EACCES, errno.EPERM) else "pick another"
            raise StateDirError(
                f"state dir {self.root} is not usable ({reason}); "
                f"{hint} or pass --root DIR / set MINIFS_ROOT to a writable directory"
            ) from None

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state dir's exclusive lock; re-entrant within one process.

        The lock guards the metadata store's read-check-write steps and
        recovery, which are short: long backend work (a copy, a layer apply)
        lets go of it (`unlocked`) and keeps its snapshot to itself with the
        snapshot's own lock (`working_on`) instead, so readers and work on
        other snapshots never wait for a copy.

        The hold is shared by every StateDir of this process on the same root:
        flock on a second descriptor would block on the first, so two Storage
        objects (say overlay2 and vfs during an image rm) could deadlock.
        flock is released by the kernel when a process dies, so a SIGKILL never
        leaves the store locked; rows it left half-done are recovered by the
        next holder (see Storage.recover).
        """
        held = _HELD.setdefault(self.root, _Hold())
        if held.depth == 0:
            held.fd = _flocked_fd(self.root / "lock")
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0:
                os.close(held.fd)
                held.fd = -1

    @contextmanager
    def unlocked(self) -> Iterator[None]:
        """Let go of the state dir's lock for the block and take it back after,
        when this process holds it once. Held deeper (a caller wrapped a whole
        sequence of steps in `locked`), it stays held: that caller asked to
        have the store to itself."""
        held = _HELD.get(self.root)
        if held is None or held.depth != 1:
            yield
            return
        os.close(held.fd)
        held.fd, held.depth = -1, 0
        try:
            yield
        finally:
            held.fd = _flocked_fd(self.root / "lock")
            held.depth = 1

    @contextmanager
    def working_on(self, key: str) -> Iterator[None]:
        """Hold `key`'s own lock (a snapshot id, or a layer being unpacked)
        for the block. Outside the state dir's lock it waits for another
        holder; under it, it cannot (that holder may be waiting for the state
        dir's lock to finish), so a key held elsewhere is InUse there. Callers
        check `busy` first under the lock, where every snapshot lock is taken."""
        path = self._lock_path(key)
        path.parent.mkdir(exist_ok=True)
        held = _HELD.get(self.root)
        wait = held is None or held.depth == 0  # never wait holding the state dir's lock
        while True:
            try:
                fd = _flocked_fd(path, wait)
            except BlockingIOError:
                raise InUse(
                    f"{key} is in use by another minifs command; try again when it has finished"
                ) from None
            if _still_linked(fd, path):
                break
            os.close(fd)  # its holder removed the file as it let go: take the new one
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # before letting go, so no one waits on a file that is gone
            os.close(fd)

    def busy(self, key: str) -> bool:
        """Whether a live process holds `key`'s lock (`working_on`) now."""
        path = self._lock_path(key)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _lock_path(self, key: str) -> Path:
        return self.root / "locks" / key


def _flocked_fd(path: Path, wait: bool = True) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _still_linked(fd: int, path: Path) -> bool:
    """Whether the file locked through `fd` is still the one at `path`."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class _Hold:
    """One process's hold on one state dir's lock."""

    fd = -1
    depth = 0


_HELD: dict[Path, _Hold] = {}
