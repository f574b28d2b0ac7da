"""Container records: one JSON file per container under `<root>/containers/<id>/`.

A record is written before each resource is made and names it (clone, cgroup
paths, veth, address), so whatever a crash leaves can be found and undone by
`reclaim` in `lifecycle.py`. JSON files rather than a table in the metadata store:
the monitor rewrites its record while the container runs, without ever taking
the state dir's lock that every storage change needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from minifs.mutable import Record
from minifs.resources import process_start_time
from minifs.state import resolve_root

CREATED = "created"
RUNNING = "running"
EXITED = "exited"


def alive(pid: int | None, start: int | None) -> bool:
    """Is `pid` still the process that started at `start`, and not a zombie?"""
    return pid is not None and process_start_time(pid) == start


def containers_dir(root: str | os.PathLike[str] | None) -> Path:
    return resolve_root(root) / "containers"


class Container(Record):
    """Everything minifs knows about one container; `dir` is where it lives."""

    id: str
    name: str
    image: str
    driver: str
    root: str
    command: list[str] = []
    layer: str = ""
    clone: str | None = None
    env: dict[str, str] = {}
    workdir: str = "/"
    hostname: str = ""
    limits: dict[str, object] = {}
    net: str = "none"
    ip: str | None = None
    prefix: int | None = None
    gateway: str | None = None
    bridge: str | None = None
    netns: str | None = None
    veth: str | None = None
    cgroup: dict[str, object] | None = None
    security: dict[str, object] | None = None
    """Security.to_record(): capabilities, seccomp, masks, devices, user..."""
    status: str = CREATED
    monitor_pid: int | None = None
    monitor_start: int | None = None
    pid: int | None = None
    pid_start: int | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    error: str | None = None
    remove: bool = False
    detach: bool = False
    created: float = 0.0
    started: float | None = None
    finished: float | None = None

    @classmethod
    def new(cls, root: str | os.PathLike[str] | None, **values: object) -> Container:
        cid = os.urandom(16).hex()  # uuid4's randomness without importing uuid
        values.setdefault("name", cid[:12])
        return cls(id=cid, root=str(resolve_root(root)), created=time.time(), **values)

    @property
    def dir(self) -> Path:
        return containers_dir(self.root) / self.id

    @property
    def log_path(self) -> Path:
        return self.dir / "log"

    @property
    def rootfs(self) -> Path:
        """The empty directory the clone is mounted on, inside the container's
        own mount namespace only (the host never sees that mount)."""
        return self.dir / "rootfs"

    def save(self) -> None:
        """Replace the record in one rename, so a reader sees the old or the new
        one whole. The temporary file is this process's own: a monitor and
        the reclaims of concurrent commands may save the same record at once."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "container.json"
        tmp = path.with_name(f"container.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(vars(self), indent=1))
        os.replace(tmp, path)

    def delete(self) -> None:
        from minifs.layers.safefs import remove_tree  # not shutil: ~2 ms to import

        with contextlib.suppress(OSError):  # a reclaim elsewhere may be removing it too
            remove_tree(self.dir)

    def monitor_alive(self) -> bool:
        """Is the process that started this container (and cleans up after it) alive?"""
        return alive(self.monitor_pid, self.monitor_start)

    def pid1_alive(self) -> bool:
        return alive(self.pid, self.pid_start)

    @property
    def running(self) -> bool:
        return self.status == RUNNING and self.monitor_alive()

    def to_dict(self) -> dict[str, object]:
        data = dict(vars(self))
        data["OOMKilled"] = data.pop("oom_killed")
        data["log"] = str(self.log_path)
        return data


def load(path: Path) -> Container | None:
    """The record in directory `path`, or None if it vanished meanwhile."""
    try:
        data = json.loads((path / "container.json").read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:
        print(f"minifs: warning: skipped {path}: its container.json is damaged", file=sys.stderr)
        return None
    return Container(**{k: v for k, v in data.items() if k in Container.FIELDS})


def all_containers(root: str | os.PathLike[str] | None) -> list[Container]:
    where = containers_dir(root)
    try:
        entries = sorted(os.listdir(where))
    except FileNotFoundError:
        return []
    found = [c for e in entries if (c := load(where / e)) is not None]
    return sorted(found, key=lambda c: c.created)


def find(root: str | os.PathLike[str] | None, ref: str) -> Container | None:
    """A container by name, full id, or unique id prefix (at least 4 characters)."""
    everything = all_containers(root)
    for container in everything:
        if ref in (container.name, container.id):
            return container
    if len(ref) >= 4:
        matches = [c for c in everything if c.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
    return None
