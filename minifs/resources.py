"""What a driver brought up outside its home: loop devices, mounts, daemons.

Each driver records these in `<home>/run/resources.json`, in the order it made
them. `start()` re-attaches to what is still alive after a restart of minifs,
and `down()` tears down exactly what was recorded, in reverse, checking each
thing is still the one minifs made (a pid with the same start time, a loop
device on the same backing file) so nothing else on the machine is touched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from minifs import linux
from minifs.errors import BackendError, InUse, StateDirError

OWNER_ENV = "MINIFS_OWNER"
"""Set in the environment of every daemon minifs starts, so leaks can be found."""


def run(argv: Sequence[str], what: str) -> str:
    """Run a backend command; its own error text becomes a one-line BackendError."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BackendError(f"{what}: {argv[0]} is not installed; run 'make setup'") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise BackendError(f"{what}: {detail[-1] if detail else f'exit {done.returncode}'}")
    return done.stdout


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None  # exited, only not reaped yet
    return int(fields[19])


def loop_backing_file(device: str) -> str | None:
    name = os.path.basename(device)
    try:
        return Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


class Resources:
    """The recorded resources of one driver home."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "resources.json"

    def load(self) -> list[dict]:
        try:
            records = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except ValueError:
            records = None
        if not isinstance(records, list) or not all(
            isinstance(r, dict) and "key" in r and "type" in r for r in records
        ):
            raise StateDirError(
                f"{self.path} is damaged; stop what it lists by hand (mounts, loop devices, "
                "daemons), then delete the file"
            )
        return records

    def _save(self, records: list[dict]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1))
        os.replace(tmp, self.path)

    def _add(self, record: dict) -> None:
        records = [r for r in self.load() if r["key"] != record["key"]]
        records.append(record)
        self._save(records)

    def _drop(self, key: str) -> None:
        self._save([r for r in self.load() if r["key"] != key])

    def _find(self, key: str) -> dict | None:
        return next((r for r in self.load() if r["key"] == key), None)

    @staticmethod
    def alive(record: dict) -> bool:
        if record["type"] == "loop":
            return loop_backing_file(record["device"]) == record["image"]
        if record["type"] == "mount":
            return linux.is_mountpoint(record["target"])
        return process_start_time(record["pid"]) == record["start_time"]

    # -- bring up (idempotent: re-attach to what is alive) --------------------

    def loop(self, key: str, image: Path) -> str:
        """Attach `image` to a loop device, or return the one already attached."""
        found = self._find(key)
        if found and self.alive(found):
            return found["device"]
        device = run(["losetup", "--find", "--show", str(image)], f"attach {image}").strip()
        self._add({"key": key, "type": "loop", "device": device, "image": str(image.resolve())})
        return device

    def mount(self, key: str, source: str, target: Path, fstype: str, options: str = "") -> None:
        """Mount once; a later start finds it mounted and leaves it."""
        found = self._find(key)
        if found and self.alive(found):
            return
        target.mkdir(parents=True, exist_ok=True)
        try:
            linux.mount(source, target, fstype, 0, options)
        except OSError as exc:
            raise BackendError(f"cannot mount {source} on {target}: {exc.strerror}") from None
        self._add({"key": key, "type": "mount", "target": str(target)})

    def spawn(
        self,
        key: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> int:
        """Start a daemon in its own session, or return the pid of the live one."""
        found = self._find(key)
        if found and self.alive(found):
            return found["pid"]
        full_env = {**os.environ, **(env or {}), OWNER_ENV: str(self.run_dir)}
        out = open(log or os.devnull, "ab")  # noqa: SIM115 - handed to the child
        with out:
            proc = subprocess.Popen(
                argv,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        start_time = process_start_time(proc.pid)
        self._add(
            {
                "key": key,
                "type": "process",
                "pid": proc.pid,
                "start_time": start_time,
                "argv": list(argv),
            }
        )
        return proc.pid

    # -- tear down -------------------------------------------------------------

    def down(self) -> list[str]:
        """Undo every recorded resource, newest first; returns what was stopped."""
        stopped = []
        for record in reversed(self.load()):
            if self.alive(record):
                self._stop(record)
                stopped.append(describe(record))
            self._drop(record["key"])
        return stopped

    def _stop(self, record: dict) -> None:
        if record["type"] == "mount":
            try:
                linux.umount(record["target"])
            except OSError as exc:
                raise InUse(
                    f"{record['target']} is busy ({exc.strerror}); unmount the clones "
                    "mounted from it ('minifs umount DIR'), then run 'minifs down' again"
                ) from None
        elif record["type"] == "loop":
            _refuse_if_busy(record["device"])
            run(["losetup", "--detach", record["device"]], f"detach {record['device']}")
        else:
            _terminate(record["pid"], record["start_time"])


def _refuse_if_busy(device: str) -> None:
    """A mounted filesystem holds its device exclusively, in whatever mount
    namespace it is mounted. losetup would only mark such a device for
    autoclear and succeed, and the next start would attach the image again."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise InUse(
                f"{device} is still in use by a mounted filesystem (a clone mounted "
                "elsewhere?); unmount it, then run 'minifs down' again"
            ) from None
        raise
    os.close(fd)


def _terminate(pid: int, start_time: int, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, a process we started; never another with a reused pid."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while process_start_time(pid) == start_time:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + grace
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)


def describe(record: dict) -> str:
    if record["type"] == "loop":
        return f"loop device {record['device']} ({record['image']})"
    if record["type"] == "mount":
        return f"mount {record['target']}"
    return f"process {record['pid']} ({' '.join(record['argv'])})"
