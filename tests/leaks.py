"""What tests leave behind, found by where it lives rather than by guessing.

Everything a test makes lives under the pytest session's base temp dir, so a
leak is a mount whose target is under it, a loop device whose backing file is
under it, or a process whose MINIFS_OWNER points under it. Scoping by that dir
keeps the check exact even while other minifs sessions run on the machine.
What containers make outside any directory (cgroups, network namespaces)
carries a tag derived from that dir instead (`session_tag`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
from pathlib import Path

from minifs import linux
from minifs.resources import OWNER_ENV


def mounts_under(scope: Path) -> set[str]:
    prefix = str(scope) + "/"
    return {t for t in linux.mount_targets() if t.startswith(prefix)}


def loops_under(scope: Path) -> set[str]:
    prefix = str(scope) + "/"
    found = set()
    for dev in Path("/sys/block").glob("loop*"):
        try:
            backing = (dev / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(prefix):
            found.add(f"/dev/{dev.name}")
    return found


def processes_under(scope: Path) -> set[int]:
    marker = f"{OWNER_ENV}={scope}/".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if marker in env:
            found.add(int(entry))
    return found


def snapshot(scope: Path) -> dict[str, set]:
    return {
        "mounts": mounts_under(scope),
        "loop devices": loops_under(scope),
        "processes": processes_under(scope),
        "cgroups": cgroups_under(scope),
        "network namespaces": netns_under(scope),
    }


def clean(leaked: dict[str, set]) -> None:
    """Remove leaks so that one failing test does not fail every later one."""
    for pid in leaked.get("processes", ()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for target in sorted(leaked.get("mounts", ()), key=len, reverse=True):
        with contextlib.suppress(OSError):
            linux.umount(target, linux.MNT_DETACH)
    for device in leaked.get("loop devices", ()):
        subprocess.run(["losetup", "--detach", device], check=False, capture_output=True)
    for path in sorted(leaked.get("cgroups", ()), key=len, reverse=True):
        with contextlib.suppress(OSError):
            for pid in Path(path, "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            os.rmdir(path)
    for name in leaked.get("network namespaces", ()):
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


# -- what containers leave outside the basetemp ------------------------------------


def session_tag(scope: Path) -> str:
    """A short tag unique to one pytest session (its basetemp), for the names
    tests give things that cannot live under it: cgroups, network namespaces."""
    return hashlib.sha1(str(scope).encode()).hexdigest()[:8]


def cgroup_parent(scope: Path) -> str:
    """What tests set MINIFS_CGROUP_PARENT to, so their containers' cgroups
    are told apart from every other session's."""
    return f"minifs-test-{session_tag(scope)}"


def netns_prefix(scope: Path) -> str:
    """The prefix of every network namespace a test makes with `ip netns add`."""
    return f"mfs{session_tag(scope)}-"


def cgroups_under(scope: Path) -> set[str]:
    from minifs.container.cgroups import places

    found = set()
    for parent in {place.parent for place in places(cgroup_parent(scope)).values()}:
        for top, dirs, _ in os.walk(parent):
            found.add(top)
            found.update(os.path.join(top, d) for d in dirs)
    return found


def netns_under(scope: Path) -> set[str]:
    prefix = netns_prefix(scope)
    try:
        return {n for n in os.listdir("/run/netns") if n.startswith(prefix)}
    except FileNotFoundError:
        return set()
