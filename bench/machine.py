"""What the results were measured on: the machine, and each driver's backend.

Recorded in every results file, because a number without its kernel, CPU,
memory and backing filesystem cannot be compared with another.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import minifs
from minifs import linux
from minifs.errors import BackendError
from minifs.plugins import registered
from minifs.resources import run


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def filesystem_of(path: Path) -> dict[str, str]:
    """The mount holding `path`: its type, source and mount point."""
    wanted = os.path.realpath(path)
    best = {"type": "unknown", "source": "", "mountpoint": ""}
    for entry in linux.mountinfo():
        target = entry.target
        inside = wanted == target or wanted.startswith(target.rstrip("/") + "/")
        if inside and len(target) >= len(best["mountpoint"]):
            best = {"type": entry.fstype, "source": entry.source, "mountpoint": target}
    return best


def machine_info(bench_root: Path) -> dict[str, object]:
    return {
        "kernel": platform.release(),
        "kernel_build": platform.version(),
        "arch": platform.machine(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "load_average": os.getloadavg(),
        "python": sys.version.split()[0],
        "bench_images_on": filesystem_of(bench_root),
    }


def source_info() -> dict[str, object]:
    """Which code produced the results: minifs's version and, when it runs from
    a git checkout, the commit and the files that differ from it (a run made
    before a commit names the commit it started from and says it was dirty)."""
    try:
        minifs_version = version("minifs")
    except PackageNotFoundError:
        minifs_version = "unknown"
    info: dict[str, object] = {"minifs": minifs_version, "git_commit": None}
    checkout = str(Path(minifs.__file__).resolve().parent.parent)
    try:
        commit = run(["git", "-C", checkout, "rev-parse", "HEAD"], "git rev-parse")
        status = run(["git", "-C", checkout, "status", "--porcelain"], "git status")
    except BackendError:
        return info  # not a checkout, or no git: the version is all there is
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    info.update(git_commit=commit.strip(), git_dirty=bool(changed), git_changed=changed)
    return info


def driver_info(name: str) -> dict[str, object]:
    reg = registered()[name]
    cls = reg.driver
    return {
        "name": name,
        "kind": cls.kind.value,
        "backend": cls.backend,
        "version": cls.version(),
        "max_depth": cls.max_depth,
        "disk_filesystem": cls.disk_filesystem,
        "min_disk_size": cls.min_disk_size,
        "plugin": reg.plugin,
        "plugin_version": reg.plugin_version,
    }
