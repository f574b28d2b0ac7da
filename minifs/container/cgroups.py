"""cgroup limits for one container: cgroup v2 when it has the controllers, else v1.

The seed's `cgcreate -g cpu,memory:myContainer` and `cgclassify`, as mkdir and
writes: cpu as quota/period (20% of a core = 20000/100000), memory as a hard
limit, pids as a maximum. On v1 each controller is its own hierarchy (this
machine mounts cpu, cpuacct, memory and pids apart), so one container is one
directory in each; on v2 it is one directory.

Where: under `MINIFS_CGROUP_PARENT` (default `minifs`). A relative parent nests
below the cgroup minifs itself runs in, so a container never escapes the limits
and accounting of whoever started minifs; an absolute one starts at the
hierarchy's root, as docker's cgroupfs driver does with `/docker`. Parent
directories minifs made are removed again when they empty.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from minifs.container import ContainerError
from minifs.container.spec import CPU_PERIOD_US, Limits

PARENT_ENV = "MINIFS_CGROUP_PARENT"
DEFAULT_PARENT = "minifs"
CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")
"""v1 controllers a container gets a directory in: the three limits, plus
cpuacct for the usage counter where it is a hierarchy of its own."""
V2_CONTROLLERS = ("cpu", "memory", "pids")
UNIFIED = "unified"
"""The key of the one v2 directory in `Cgroup.paths`."""


@dataclass(frozen=True)
class Hierarchy:
    mountpoint: Path
    root: str
    """The mount's root inside the hierarchy (not "/" inside a cgroup namespace)."""
    controllers: frozenset[str]
    version: int


def hierarchies() -> list[Hierarchy]:
    """cgroup mounts of this mount namespace, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            fstype, superopts = tail[0], tail[2] if len(tail) > 2 else ""
            if fstype == "cgroup":
                controllers = frozenset(o for o in superopts.split(",") if o in CONTROLLERS)
                if controllers:
                    found.append(Hierarchy(Path(fields[4]), fields[3], controllers, 1))
            elif fstype == "cgroup2":
                found.append(Hierarchy(Path(fields[4]), fields[3], frozenset(), 2))
    return found


def own_cgroups() -> dict[str, str]:
    """This process's cgroup per v1 controller, and under "" its v2 cgroup."""
    own = {}
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path
    return own


def _inside(h: Hierarchy, path: str) -> Path:
    """Where cgroup `path` of hierarchy `h` is in the filesystem."""
    rel = os.path.relpath(path, h.root) if h.root != "/" else path.lstrip("/")
    return h.mountpoint if rel == "." else h.mountpoint / rel


def _base(h: Hierarchy, own: str, parent: str) -> tuple[Path, Path]:
    """(the directory minifs must not remove, the parent its containers go in)."""
    if parent.startswith("/"):
        return h.mountpoint, h.mountpoint / parent.strip("/")
    base = _inside(h, own)
    return base, base / parent


def _v2_usable(h: Hierarchy, own: str) -> bool:
    try:
        available = set((_inside(h, own) / "cgroup.controllers").read_text().split())
    except OSError:
        return False
    return set(V2_CONTROLLERS) <= available


def parent_dirs(parent: str | None = None) -> tuple[int, dict[str, tuple[Path, Path, Path]]]:
    """(cgroup version, {controller or "unified": (base, parent dir, own dir)})
    for the containers' parent `parent` (default: $MINIFS_CGROUP_PARENT or
    "minifs"); "own dir" is the cgroup this process is in."""
    parent = parent or os.environ.get(PARENT_ENV) or DEFAULT_PARENT
    own = own_cgroups()
    found = hierarchies()
    for h in found:
        if h.version == 2 and _v2_usable(h, own.get("", "/")):
            here = own.get("", "/")
            return 2, {UNIFIED: (*_base(h, here, parent), _inside(h, here))}
    dirs = {}
    for h in found:
        for controller in h.controllers:
            here = own.get(controller, "/")
            dirs[controller] = (*_base(h, here, parent), _inside(h, here))
    return 1, dirs


def _write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _mkdir_chain(target: Path, base: Path) -> None:
    """mkdir -p, retried when a concurrent container removes an emptied parent
    between our two mkdirs (every remover rmdirs parents it finds empty)."""
    for _ in range(10):
        try:
            target.mkdir(parents=True)
            return
        except FileNotFoundError:
            continue
        except FileExistsError:
            raise ContainerError(f"cgroup {target} already exists; run 'minifs gc'") from None
    raise ContainerError(f"cannot create cgroup {target} below {base}: it keeps vanishing")


@dataclass
class Cgroup:
    """A container's cgroup directories: controller -> path (v1) or {"unified": path}."""

    version: int
    paths: dict[str, str]
    bases: dict[str, str]
    homes: dict[str, str]
    """Where minifs itself runs, per controller: see `leave_pids`."""

    @property
    def dirs(self) -> list[Path]:
        return sorted({Path(p) for p in self.paths.values()})

    def dir(self, controller: str) -> Path | None:
        path = self.paths.get(UNIFIED if self.version == 2 else controller)
        return None if path is None else Path(path)

    # -- make --------------------------------------------------------------------

    @classmethod
    def plan(cls, name: str) -> Cgroup:
        """Where the cgroup of container `name` goes; nothing is created yet."""
        version, parents = parent_dirs()
        return cls(
            version,
            {key: str(under / name) for key, (_, under, _) in parents.items()},
            {key: str(base) for key, (base, _, _) in parents.items()},
            {key: str(home) for key, (_, _, home) in parents.items()},
        )

    def create(self, limits: Limits) -> list[str]:
        """Make the directories and write the limits; returns what was written,
        in the seed's words, for --trace. Undoes everything on failure."""
        wanted = {"cpu": limits.cpus, "memory": limits.memory, "pids": limits.pids}
        missing = [c for c, v in wanted.items() if v is not None and self.dir(c) is None]
        if missing:
            raise ContainerError(
                f"no cgroup {' or '.join(missing)} controller is mounted here; "
                "drop that limit or mount the controller under /sys/fs/cgroup"
            )
        done: list[str] = []
        try:
            for controller, path in sorted(self.paths.items()):
                if path not in done:
                    if self.version == 2:
                        self._enable_controllers(Path(path).parent)
                    _mkdir_chain(Path(path), Path(self.bases[controller]))
                    done.append(path)
            return [f"mkdir {' '.join(done)}", *self._write_limits(limits)]
        except BaseException:
            self.remove()
            raise

    def _enable_controllers(self, parent: Path) -> None:
        """v2 hands a controller to children only when every ancestor enables it."""
        base = Path(self.bases[UNIFIED])
        chain = [parent, *parent.parents]
        for ancestor in reversed(chain[: chain.index(base) + 1] if base in chain else []):
            ancestor.mkdir(exist_ok=True)
            enabled = (ancestor / "cgroup.subtree_control").read_text().split()
            for controller in V2_CONTROLLERS:
                if controller not in enabled:
                    try:
                        _write(ancestor / "cgroup.subtree_control", f"+{controller}")
                    except OSError as exc:
                        raise ContainerError(
                            f"cannot enable the {controller} controller in {ancestor} "
                            f"({exc.strerror}); set {PARENT_ENV} to a cgroup minifs may manage"
                        ) from None

    def _write_limits(self, limits: Limits) -> list[str]:
        writes: list[tuple[str, str, str]] = []
        if limits.cpus is not None:
            if self.version == 2:
                writes.append(("cpu", "cpu.max", f"{limits.cpu_quota_us} {CPU_PERIOD_US}"))
            else:
                writes.append(("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)))
                writes.append(("cpu", "cpu.cfs_quota_us", str(limits.cpu_quota_us)))
        if limits.memory is not None:
            name = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
            writes.append(("memory", name, str(limits.memory)))
        if limits.pids is not None:
            # One more for the unshare process, until it has forked PID 1 and
            # left (see leave_pids), so even --pids 1 can start.
            writes.append(("pids", "pids.max", str(limits.pids + 1)))
        said = []
        for controller, name, value in writes:
            path = self.dir(controller) / name  # type: ignore[operator]
            try:
                _write(path, value)
            except OSError as exc:
                raise ContainerError(
                    f"the kernel refused {name}={value} ({exc.strerror}); give another limit"
                ) from None
            said.append(f"echo {value} > {name}")
        return said

    # -- use ---------------------------------------------------------------------

    def join(self, pid: int) -> None:
        """cgclassify: move `pid` (with its future children) into every directory."""
        for path in self.dirs:
            _write(path / "cgroup.procs", str(pid))

    def leave_pids(self, pid: int, limit: int | None) -> str:
        """Move `pid` back out of the container's pids cgroup and set the real
        limit. The unshare process must be inside while it unshares (that fixes
        the cgroup namespace's root) and forks PID 1, but then only waits: it
        must not take one of the container's --pids."""
        key = UNIFIED if self.version == 2 else "pids"
        if key not in self.homes:
            return "no pids cgroup"
        _write(Path(self.homes[key]) / "cgroup.procs", str(pid))
        said = f"echo {pid} > {self.homes[key]}/cgroup.procs"
        if limit is not None:
            _write(Path(self.paths[key]) / "pids.max", str(limit))
            said += f"; echo {limit} > pids.max"
        return said

    def _read(self, controller: str, name: str) -> str | None:
        where = self.dir(controller)
        try:
            return None if where is None else (where / name).read_text()
        except OSError:
            return None

    @staticmethod
    def _field(text: str | None, key: str) -> int | None:
        for line in (text or "").splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
        return None

    def cpu_usage_ns(self) -> int | None:
        """CPU time the container used, from the cgroup's own counter."""
        if self.version == 2:
            usec = self._field(self._read("cpu", "cpu.stat"), "usage_usec")
            return None if usec is None else usec * 1000
        text = self._read("cpuacct", "cpuacct.usage")
        return None if text is None else int(text)

    def oom_kills(self) -> int:
        """How many processes the OOM killer took in this cgroup."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        return self._field(self._read("memory", name), "oom_kill") or 0

    def memory_bytes(self) -> int | None:
        text = self._read(
            "memory", "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        )
        return None if text is None else int(text)

    def pids_current(self) -> int | None:
        text = self._read("pids", "pids.current")
        return None if text is None else int(text)

    def stats(self) -> dict[str, int | None]:
        return {
            "cpu_usage_ns": self.cpu_usage_ns(),
            "memory_bytes": self.memory_bytes(),
            "pids": self.pids_current(),
            "oom_kills": self.oom_kills(),
        }

    # -- remove ------------------------------------------------------------------

    def remove(self, grace: float = 3.0) -> None:
        """rmdir every directory, then the parents minifs made if they are empty.

        Processes leave a cgroup a moment after they die, so EBUSY is retried;
        anything still inside after `grace` is a container process that escaped
        its pid namespace's end and is killed.
        """
        deadline = time.monotonic() + grace
        for path in self.dirs:
            while path.exists():
                try:
                    path.rmdir()
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    if time.monotonic() > deadline:
                        self._kill_all(path)
                    time.sleep(0.01)
        for controller, path in self.paths.items():
            base = Path(self.bases[controller])
            for parent in Path(path).parents:
                if parent == base or base not in parent.parents:
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break

    def _kill_all(self, path: Path) -> None:
        if self.version == 2:
            with contextlib.suppress(OSError):
                _write(path / "cgroup.kill", "1")
            return
        with contextlib.suppress(OSError):
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

    def to_record(self) -> dict[str, object]:
        return {
            "version": self.version,
            "paths": self.paths,
            "bases": self.bases,
            "homes": self.homes,
        }

    @classmethod
    def from_record(cls, data: dict[str, object] | None) -> Cgroup | None:
        if not data:
            return None
        return cls(
            int(data["version"]),  # type: ignore[arg-type]
            dict(data["paths"]),  # type: ignore[arg-type]
            dict(data["bases"]),  # type: ignore[arg-type]
            dict(data["homes"]),  # type: ignore[arg-type]
        )
