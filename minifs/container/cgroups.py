"""cgroup limits for one container, each controller on cgroup v2 where it is
available there, else on its cgroup v1 hierarchy.

The seed's `cgcreate -g cpu,memory:myContainer` and `cgclassify`, as mkdir and
writes: cpu as quota/period (20% of a core = 20000/100000), memory as a hard
limit, pids as a maximum. The choice is made per controller because a
controller lives in one hierarchy at a time: bound to a v1 hierarchy (this
machine mounts cpu, cpuacct, memory and pids apart, with cgroup2 beside them
and empty), it is missing from v2's `cgroup.controllers`. So a container is
one directory per v1 hierarchy it uses plus, if any controller is on v2, one
v2 directory holding all of those.

Where: under `MINIFS_CGROUP_PARENT` (default `minifs`). A relative parent nests
below the cgroup minifs itself runs in, so a container never escapes the limits
and accounting of whoever started minifs; an absolute one starts at the
hierarchy's root, as docker's cgroupfs driver does with `/docker`. Parent
directories minifs made are removed again when they empty. On v2 a relative
parent works only while minifs runs in the root cgroup: v2 hands no controller
down from a cgroup holding processes (minifs itself), so elsewhere (a systemd
session) it must be absolute, and minifs says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections import namedtuple
from pathlib import Path

from minifs.container import ContainerError
from minifs.container.spec import CPU_PERIOD_US, Limits

PARENT_ENV = "MINIFS_CGROUP_PARENT"
DEFAULT_PARENT = "minifs"
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "devices")
"""v1 controllers a container gets a directory in: the three limits, plus
cpuacct for the usage counter where it is a hierarchy of its own, and devices
for the nodes it may open (see devices.py)."""
V2_CONTROLLERS = ("cpu", "memory", "pids")
"""On v2 the usage counter (cpu.stat) is in every cgroup: no cpuacct."""


class Hierarchy(namedtuple("Hierarchy", "mountpoint root controllers version")):
    __slots__ = ()

    mountpoint: Path
    root: str
    """The mount's root inside the hierarchy (not "/" inside a cgroup namespace)."""
    controllers: frozenset[str]
    version: int


class Place(namedtuple("Place", "version base parent home")):
    """Where one controller's container cgroups go."""

    __slots__ = ()

    version: int
    base: Path
    """The directory minifs never removes: its own cgroup, or the hierarchy's root."""
    parent: Path
    """The containers' parent directory: `base / MINIFS_CGROUP_PARENT`."""
    home: Path
    """The cgroup minifs itself runs in."""


def hierarchies() -> list[Hierarchy]:
    """cgroup mounts of this mount namespace, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            fstype, superopts = tail[0], tail[2] if len(tail) > 2 else ""
            if fstype == "cgroup":
                controllers = frozenset(o for o in superopts.split(",") if o in V1_CONTROLLERS)
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


def _place(h: Hierarchy, own: str, parent: str) -> Place:
    home = _inside(h, own)
    base = h.mountpoint if parent.startswith("/") else home
    return Place(h.version, base, base / parent.strip("/"), home)


def choose(found: list[Hierarchy], own: dict[str, str], parent: str) -> dict[str, Place]:
    """controller -> Place: v2 for each controller v2 offers at the base, the
    v1 hierarchy holding it for the others, nothing for a controller in neither."""
    places: dict[str, Place] = {}
    for h in found:
        if h.version == 2:
            place = _place(h, own.get("", "/"), parent)
            try:
                offered = (place.base / "cgroup.controllers").read_text().split()
            except OSError:
                continue
            places.update((c, place) for c in V2_CONTROLLERS if c in offered)
    for h in found:
        for controller in h.controllers:
            places.setdefault(controller, _place(h, own.get(controller, "/"), parent))
    return places


def places(parent: str | None = None) -> dict[str, Place]:
    """Where each controller's container cgroups go for `parent` (default:
    $MINIFS_CGROUP_PARENT or "minifs")."""
    parent = parent or os.environ.get(PARENT_ENV) or DEFAULT_PARENT
    return choose(hierarchies(), own_cgroups(), parent)


def _write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _make(target: Path, base: Path, v2: list[str]) -> None:
    """mkdir -p from `base` down to `target`, on v2 handing the controllers
    `v2` down at every level: v2 gives a controller to a child only when each
    ancestor below the base, base included, enables it in its
    cgroup.subtree_control. Retried when a concurrent container's end removes
    an emptied parent between our steps (every remover rmdirs parents it
    finds empty)."""
    chain = [target.parent, *target.parent.parents]
    ancestors = chain[chain.index(base) :: -1]  # base first
    for _ in range(10):
        try:
            for ancestor in ancestors:
                ancestor.mkdir(exist_ok=True)
                _enable(ancestor, v2)
            target.mkdir()
            return
        except FileNotFoundError:
            continue
        except FileExistsError:
            raise ContainerError(f"cgroup {target} already exists; run 'minifs gc'") from None
    raise ContainerError(f"cannot create cgroup {target} below {base}: it keeps vanishing")


def _enable(cgroup: Path, controllers: list[str]) -> None:
    """Enable `controllers` for the children of a v2 cgroup. The kernel refuses
    (EBUSY) in a cgroup holding processes, such as the one minifs runs in
    unless that is the root: then only an absolute parent works."""
    if not controllers:
        return
    enabled = (cgroup / "cgroup.subtree_control").read_text().split()
    for controller in controllers:
        if controller not in enabled:
            try:
                _write(cgroup / "cgroup.subtree_control", f"+{controller}")
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise ContainerError(
                    f"cannot enable the {controller} controller in {cgroup} ({exc.strerror}); "
                    f"set {PARENT_ENV} to an absolute cgroup such as /minifs"
                ) from None


class Cgroup(namedtuple("Cgroup", "paths v2 bases homes")):
    """A container's cgroup directories, by controller (see Limits for why a
    NamedTuple)."""

    __slots__ = ()

    paths: dict[str, str]
    """controller -> its directory; the v2 controllers share one."""
    v2: list[str]
    """The controllers on cgroup v2."""
    bases: dict[str, str]
    homes: dict[str, str]
    """Where minifs itself runs, per controller: see `leave_pids`."""

    @property
    def dirs(self) -> list[Path]:
        return sorted({Path(p) for p in self.paths.values()})

    def dir(self, controller: str) -> Path | None:
        path = self.paths.get(controller)
        return None if path is None else Path(path)

    def version(self, controller: str) -> int:
        return 2 if controller in self.v2 else 1

    # -- make --------------------------------------------------------------------

    @classmethod
    def plan(cls, name: str) -> Cgroup:
        """Where the cgroup of container `name` goes; nothing is created yet."""
        where = places()
        return cls(
            {c: str(p.parent / name) for c, p in where.items()},
            sorted(c for c, p in where.items() if p.version == 2),
            {c: str(p.base) for c, p in where.items()},
            {c: str(p.home) for c, p in where.items()},
        )

    def create(self, limits: Limits) -> list[str]:
        """Make the directories and write the limits; returns what was written,
        in the seed's words, for --trace. Undoes everything on failure."""
        wanted = {"cpu": limits.cpus, "memory": limits.memory, "pids": limits.pids}
        missing = [c for c, v in wanted.items() if v is not None and c not in self.paths]
        if missing:
            raise ContainerError(
                f"no cgroup {' or '.join(missing)} controller is available here; "
                "drop that limit or mount the controller under /sys/fs/cgroup"
            )
        made: list[str] = []
        try:
            for controller, path in sorted(self.paths.items()):
                if path not in made:
                    v2 = self.v2 if controller in self.v2 else []
                    _make(Path(path), Path(self.bases[controller]), v2)
                    made.append(path)
            return [f"mkdir {' '.join(made)}", *self._write_limits(limits)]
        except BaseException:
            self.remove()
            raise

    def _write_limits(self, limits: Limits) -> list[str]:
        writes: list[tuple[str, str, str]] = []
        if limits.cpus is not None:
            if self.version("cpu") == 2:
                writes.append(("cpu", "cpu.max", f"{limits.cpu_quota_us} {CPU_PERIOD_US}"))
            else:
                writes.append(("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)))
                writes.append(("cpu", "cpu.cfs_quota_us", str(limits.cpu_quota_us)))
        if limits.memory is not None:
            name = "memory.max" if self.version("memory") == 2 else "memory.limit_in_bytes"
            writes.append(("memory", name, str(limits.memory)))
        if limits.pids is not None:
            # One more for the unshare process, until it has forked PID 1 and
            # left (see leave_pids), so even --pids 1 can start.
            writes.append(("pids", "pids.max", str(limits.pids + 1)))
        said = []
        for controller, name, value in writes:
            path = Path(self.paths[controller]) / name
            try:
                _write(path, value)
            except OSError as exc:
                raise ContainerError(
                    f"the kernel refused {name}={value} ({exc.strerror}); give another limit"
                ) from None
            said.append(f"echo {value} > {name}")
        return said

    # -- use ---------------------------------------------------------------------

    def join(self) -> str:
        """cgclassify: move the calling process (with its future children) into
        every directory.

        Only a freshly forked process joins, and it has one thread. On a v1
        hierarchy it writes "0", the calling thread, to `tasks`: the kernel
        moves one thread of its own without the threadgroup lock that a
        `cgroup.procs` write takes, and so without that lock's RCU grace period
        (8-11 ms on this machine, the dearest step of a container start, for a
        move that is the same: a process of one thread moves whole). cgroup2
        has no `tasks`; there the process moves through `cgroup.procs`.
        Returns what it wrote, for --trace.
        """
        v2 = {Path(self.paths[c]) for c in self.v2}
        said = []
        for path in self.dirs:
            if path in v2:
                _write(path / "cgroup.procs", str(os.getpid()))
                said.append(f"echo {os.getpid()} > {path}/cgroup.procs")
            else:
                _write(path / "tasks", "0")
                said.append(f"echo 0 > {path}/tasks")
        return "; ".join(said)

    @property
    def pids_left_by_itself(self) -> bool:
        """Whether the unshare process leaves the pids cgroup itself (v1), not
        moved out by the monitor (cgroup2); see `leave_pids`."""
        return self.paths.get("pids") is not None and self.version("pids") == 1

    def leave_pids(self, pid: int | None = None) -> str:
        """Move the unshare process back out of the container's pids cgroup.
        It must be inside while it unshares (that fixes the cgroup namespace's
        root) and forks PID 1, but then only waits: it must not take one of
        the container's --pids.

        On v1 it moves itself (`pid` None) right after forking PID 1, while it
        still sees the host's cgroup mount: "0" to `tasks` of the cgroup
        minifs runs in, without the threadgroup lock's RCU grace period (see
        `join`), which a move of another process pays. On cgroup2 the monitor
        moves it (`pid`), from the host's cgroup namespace: with nsdelegate a
        process may not move itself out of its own cgroup namespace.
        """
        home = self.homes["pids"]
        if pid is None:
            _write(Path(home) / "tasks", "0")
            return f"echo 0 > {home}/tasks"
        _write(Path(home) / "cgroup.procs", str(pid))
        return f"echo {pid} > {home}/cgroup.procs"

    def limit_pids(self, limit: int) -> str:
        """The real --pids, once the unshare process has left (see `leave_pids`)."""
        _write(Path(self.paths["pids"]) / "pids.max", str(limit))
        return f"echo {limit} > pids.max"

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
        if "cpuacct" in self.paths:
            text = self._read("cpuacct", "cpuacct.usage")
            return None if text is None else int(text)
        if self.version("cpu") == 2:
            usec = self._field(self._read("cpu", "cpu.stat"), "usage_usec")
            return None if usec is None else usec * 1000
        return None

    def oom_kills(self) -> int:
        """How many processes the OOM killer took in this cgroup."""
        name = "memory.events" if self.version("memory") == 2 else "memory.oom_control"
        return self._field(self._read("memory", name), "oom_kill") or 0

    def memory_bytes(self) -> int | None:
        v2 = self.version("memory") == 2
        text = self._read("memory", "memory.current" if v2 else "memory.usage_in_bytes")
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
        v2_dirs = {Path(self.paths[c]) for c in self.v2}
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
                        _kill_all(path, path in v2_dirs)
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

    def to_record(self) -> dict[str, object]:
        return self._asdict()

    @classmethod
    def from_record(cls, data: dict[str, object] | None) -> Cgroup | None:
        return cls(**data) if data else None  # type: ignore[arg-type]


def _kill_all(path: Path, v2: bool) -> None:
    """SIGKILL whatever is left in one cgroup directory."""
    if v2:
        with contextlib.suppress(OSError):
            _write(path / "cgroup.kill", "1")
        return
    with contextlib.suppress(OSError):
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
