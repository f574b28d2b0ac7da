"""What a driver brought up outside its home: loop devices, mounts, daemons, pools.

Each driver records these in `<home>/run/resources.json`, in the order it made
them. `start()` re-attaches to what is still alive after a restart of minifs,
and `down()` tears down exactly what was recorded, in reverse, checking each
thing is still the one minifs made (a pid with the same start time, a loop
device on the same backing file, a pool with the same guid) so nothing else on
the machine is touched.

Record types, each with its own check and teardown:

| type | made by | alive when | teardown |
|---|---|---|---|
| loop | `loop()` | the device has the same backing file | losetup --detach |
| mount | `mount()`, `bind_shared()` | the target is a mount point | umount |
| process | `spawn()` | the pid has the same start time | SIGTERM, then SIGKILL |
| daemon | `daemon()` | the pid has the same start time | as process, but kept while in use |
| zpool | `zpool()` | a pool of that name and guid is imported | zpool export |

A daemon (zfs-fuse: one per machine) is kept, with its record, while its idle
probe says others still use it. A type not in this table is damage (a file
written by a newer minifs, or by hand) and is refused with the file's name,
never guessed at.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from minifs import linux
from minifs.errors import BackendError, InUse, StateDirError

TYPE_CHECKING = False  # subprocess (~2 ms) is loaded by the calls that start a process
if TYPE_CHECKING:
    import subprocess

OWNER_ENV = "MINIFS_OWNER"
"""Set in the environment of every daemon minifs starts, so leaks can be found."""


def run(argv: Sequence[str], what: str) -> str:
    """Run a backend command; its own error text becomes a one-line BackendError.

    The command dies with minifs (PR_SET_PDEATHSIG): a SIGKILLed `minifs clone`
    must not leave `cp -a` writing into a directory that the next `gc` removes.
    """
    import subprocess

    parent = os.getpid()
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            check=False,
            preexec_fn=lambda: _die_with(parent),
        )
    except FileNotFoundError:
        raise BackendError(f"{what}: {argv[0]} is not installed; run 'make setup'") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise BackendError(f"{what}: {detail[-1] if detail else f'exit {done.returncode}'}")
    return done.stdout


def _die_with(parent: int) -> None:
    """In a helper before exec: die when `parent` does, even if it already has."""
    linux.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(137)


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


def owner_tag() -> str:
    """`<pid>.<start>.<pidns>` of this process, for names and labels that must
    say which process made something: only what a dead process left is
    reclaimed, and the start time tells a reused pid from its first owner."""
    pid = os.getpid()
    return f"{pid}.{process_start_time(pid)}.{_pid_ns()}"


def owner_alive(tag: str) -> bool:
    """Whether the process an `owner_tag` names may still be running. From
    another pid namespace that cannot be told, so it counts as alive; a tag
    that is not one (made by an older minifs) counts as gone."""
    try:
        pid, start, ns = (int(part) for part in tag.split("."))
    except ValueError:
        return False
    return ns != _pid_ns() or process_start_time(pid) == start


def _pid_ns() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def loop_backing_file(device: str) -> str | None:
    name = os.path.basename(device)
    try:
        return Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


MS_SHARED = 1 << 20
"""mount(2)'s MS_SHARED (not in minifs.linux, which has what the core needs)."""

TYPES = ("loop", "mount", "process", "daemon", "zpool")

EXPORT_WAIT = 10.0
"""Seconds `zpool export` is retried while the pool is busy: zfs-fuse lets go
of a dataset a moment after its unmount, not at once."""


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
                "daemons, pools), then delete the file"
            )
        unknown = sorted({str(r["type"]) for r in records} - set(TYPES))
        if unknown:
            raise StateDirError(
                f"{self.path} records things of unknown type {', '.join(unknown)} (written by "
                "another minifs version?); stop them by hand, then delete the file"
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

    def find(self, key: str) -> dict | None:
        """The record under `key`, alive or not (None when there is none)."""
        return self._find(key)

    def forget(self, key: str) -> None:
        """Drop the record under `key` without tearing anything down: for
        what vanished by itself (a pool whose daemon died)."""
        self._drop(key)

    @staticmethod
    def alive(record: dict) -> bool:
        kind = record["type"]
        if kind == "loop":
            return loop_backing_file(record["device"]) == record["image"]
        if kind == "mount":
            return linux.is_mountpoint(record["target"])
        if kind in ("process", "daemon"):
            return process_start_time(record["pid"]) == record["start_time"]
        if kind == "zpool":
            return _pool_guid(record["pool"]) == record["guid"]
        raise StateDirError(f"unknown resource type {kind!r} in a resources.json")

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

    def bind_shared(self, key: str, target: Path) -> None:
        """Bind `target` on itself with shared propagation, once.

        Mounts a daemon makes below it later then also appear in mount
        namespaces copied from this one before they were made (and kept as
        slaves), which is how a container started before its clone was
        mounted still sees the clone."""
        found = self._find(key)
        if found and self.alive(found):
            return
        target.mkdir(parents=True, exist_ok=True)
        try:
            linux.mount(str(target), target, None, linux.MS_BIND)
        except OSError as exc:
            raise BackendError(f"cannot bind {target} on itself: {exc.strerror}") from None
        self._add({"key": key, "type": "mount", "target": str(target)})
        try:
            linux.mount("none", target, None, MS_SHARED)
        except OSError as exc:
            raise BackendError(f"cannot make {target} a shared mount: {exc.strerror}") from None

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
        proc = self._popen(argv, env, log)
        self._add(
            {
                "key": key,
                "type": "process",
                "pid": proc.pid,
                "start_time": process_start_time(proc.pid),
                "argv": list(argv),
            }
        )
        return proc.pid

    def _popen(
        self, argv: Sequence[str], env: Mapping[str, str] | None, log: Path | None
    ) -> subprocess.Popen:
        """A daemon in its own session, in / (so it never keeps a directory
        busy that a test or the user unmounts later), tagged with OWNER_ENV."""
        import subprocess

        full_env = {**os.environ, **(env or {}), OWNER_ENV: str(self.run_dir)}
        out = open(log or os.devnull, "ab")  # noqa: SIM115 - handed to the child
        with out:
            try:
                return subprocess.Popen(
                    list(argv),
                    env=full_env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                    cwd="/",
                )
            except FileNotFoundError:
                raise BackendError(f"{argv[0]} is not installed; run 'make setup'") from None

    def daemon(
        self,
        key: str,
        argv: Sequence[str],
        ready: Callable[[], bool],
        timeout: float,
        log: Path,
        idle_probe: Sequence[str] | None = None,
        lock: str | None = None,
        grace: float = 5.0,
    ) -> int:
        """Start a machine-wide daemon and wait, at most `timeout` seconds,
        until `ready()`; or return the pid of the recorded one if it lives.

        `idle_probe` is a command whose output is empty once nobody uses the
        daemon any more: `down()` stops it only then (under `lock`, the file
        everyone starting or stopping it holds), and keeps the record
        otherwise, so a later `down()` of this home can try again.
        """
        found = self._find(key)
        if found and self.alive(found):
            return found["pid"]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        proc = self._popen(argv, None, log)
        start_time = process_start_time(proc.pid)
        self._add(
            {
                "key": key,
                "type": "daemon",
                "pid": proc.pid,
                "start_time": start_time,
                "argv": list(argv),
                "idle_probe": list(idle_probe) if idle_probe else None,
                "lock": lock,
                "grace": grace,
            }
        )
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None and start_time is not None:
                    _terminate(proc.pid, start_time, grace)
                proc.wait()
                self._drop(key)
                said = _last_line(log)
                raise BackendError(
                    f"{argv[0]} did not come up within {timeout:.0f} s"
                    + (f" ({said})" if said else "")
                    + f"; see {log}"
                )
            time.sleep(0.005)
        return proc.pid

    def zpool(self, key: str, pool: str, guid: str, vdev: str) -> None:
        """Record an imported (or just created) pool that `down()` exports."""
        self._add({"key": key, "type": "zpool", "pool": pool, "guid": guid, "vdev": vdev})

    # -- tear down -------------------------------------------------------------

    def down(self) -> list[str]:
        """Undo every recorded resource, newest first; returns what was stopped.
        A shared daemon still in use by others is kept, with its record."""
        stopped = []
        for record in reversed(self.load()):
            if self.alive(record):
                if not self._stop(record):
                    continue
                stopped.append(describe(record))
            self._drop(record["key"])
        return stopped

    def _stop(self, record: dict) -> bool:
        """Tear one thing down; False when it is kept because others use it."""
        kind = record["type"]
        if kind == "mount":
            try:
                linux.umount(record["target"])
            except OSError as exc:
                raise InUse(
                    f"{record['target']} is busy ({exc.strerror}); unmount the clones "
                    "mounted from it ('minifs umount DIR'), then run 'minifs down' again"
                ) from None
        elif kind == "loop":
            _refuse_if_busy(record["device"])
            run(["losetup", "--detach", record["device"]], f"detach {record['device']}")
        elif kind == "zpool":
            _export(record["pool"])
        elif kind == "daemon":
            return _stop_daemon(record)
        else:
            _terminate(record["pid"], record["start_time"])
        return True


def _pool_guid(pool: str) -> str | None:
    """The guid of the imported pool `pool`, or None (not imported, no ZFS)."""
    import subprocess

    try:
        done = subprocess.run(
            ["zpool", "list", "-H", "-o", "name,guid", pool],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = done.stdout.strip().split("\t")
    return fields[1] if done.returncode == 0 and len(fields) == 2 else None


def _export(pool: str, wait: float = EXPORT_WAIT) -> None:
    """`zpool export`, retried with back-off while the pool is busy."""
    import subprocess

    delay, deadline = 0.02, time.monotonic() + wait
    while True:
        done = subprocess.run(
            ["zpool", "export", pool],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode == 0 or _pool_guid(pool) is None:
            return
        said = (done.stderr or done.stdout).strip().splitlines()
        if "busy" not in " ".join(said).lower() or time.monotonic() > deadline:
            raise InUse(
                f"cannot export zpool {pool}: {said[-1] if said else 'failed'}; unmount what "
                "is mounted from its clones (also in containers), then run 'minifs down' again"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _stop_daemon(record: dict) -> bool:
    """Stop a recorded daemon unless its idle probe says it still serves
    someone; under its lock, so nobody starts using it as it goes."""
    import subprocess

    lock = record.get("lock")
    with flocked(lock) if lock else contextlib.nullcontext():
        probe = record.get("idle_probe")
        if probe:
            try:
                done = subprocess.run(
                    probe, capture_output=True, text=True, check=False, timeout=60
                )
            except (OSError, subprocess.TimeoutExpired):
                done = None
            if done is not None and done.returncode == 0 and done.stdout.strip():
                return False
        _terminate(record["pid"], record["start_time"], float(record.get("grace", 5.0)))
    return True


@contextlib.contextmanager
def flocked(path: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (made if missing) for one block."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


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
    if not _lingers(pid, start_time):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _lingers(pid, start_time):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + grace
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)


def _lingers(pid: int, start_time: int) -> bool:
    """Whether any thread of the process we started still runs. A daemon's
    main thread may exit first and show as a zombie while its other threads
    still serve (zfs-fuse does on SIGTERM, keeping its socket open for a
    moment): waiting only for the leader would let a new daemon start too soon."""
    if process_start_time(pid) == start_time:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    if int(fields[19]) != start_time:
        return False
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def describe(record: dict) -> str:
    kind = record["type"]
    if kind == "loop":
        return f"loop device {record['device']} ({record['image']})"
    if kind == "mount":
        return f"mount {record['target']}"
    if kind == "zpool":
        return f"zpool {record['pool']} ({record['vdev']})"
    if kind == "daemon":
        return f"daemon {record['pid']} ({' '.join(record['argv'])})"
    return f"process {record['pid']} ({' '.join(record['argv'])})"
