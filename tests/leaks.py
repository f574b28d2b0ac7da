"""What tests leave behind, found by where it lives rather than by guessing.

Everything a test makes lives under the pytest session's base temp dir, so a
leak is a mount whose target is under it, a loop device whose backing file is
under it, a zpool whose vdev is under it, or a process whose MINIFS_OWNER
points under it. Scoping by that dir
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
    """Processes tagged with an owner under `scope`, except a zfs-fuse daemon
    that now also serves pools from elsewhere: there is one per machine, and a
    test's `minifs down` rightly leaves it running for whoever imported those."""
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
    if found and any(_is_zfs_fuse(pid) for pid in found):
        pools = zpool_vdevs()
        if any(not _under(vdevs, scope) for vdevs in pools.values()):
            found = {pid for pid in found if not _is_zfs_fuse(pid)}
    return found


def _is_zfs_fuse(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "zfs-fuse"
    except OSError:
        return False


# -- zpools --------------------------------------------------------------------------


def zpool_vdevs() -> dict[str, list[str]]:
    """Every imported pool with the paths of its vdevs, from `zpool status`;
    empty where there is no ZFS (no commands, or no zfs-fuse daemon answering)."""
    try:
        done = subprocess.run(
            ["zpool", "status"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if done.returncode != 0:
        return {}
    pools: dict[str, list[str]] = {}
    current = None
    for line in done.stdout.splitlines():
        words = line.split()
        if words[:1] == ["pool:"] and len(words) == 2:
            current = words[1]
            pools[current] = []
        elif current is not None and words and words[0].startswith("/"):
            pools[current].append(words[0])
    return pools


def _under(paths: list[str], scope: Path) -> bool:
    prefix = str(scope) + "/"
    return any(p.startswith(prefix) for p in paths)


def zpools_under(scope: Path) -> set[str]:
    """Imported pools with a vdev (file, or symlink to a device) under `scope`."""
    return {name for name, vdevs in zpool_vdevs().items() if _under(vdevs, scope)}


def snapshot(scope: Path) -> dict[str, set]:
    return {
        "mounts": mounts_under(scope),
        "loop devices": loops_under(scope),
        "processes": processes_under(scope),
        "zpools": zpools_under(scope),
        "cgroups": cgroups_under(scope),
        "network namespaces": netns_under(scope),
    }


def clean(leaked: dict[str, set]) -> None:
    """Remove leaks so that one failing test does not fail every later one.

    Pools go first (exported with force, which unmounts their datasets), then
    processes; a zfs-fuse daemon is killed only once no pool is imported in it
    at all, so a leak of one session never takes down another's pools."""
    for pool in leaked.get("zpools", ()):
        subprocess.run(
            ["zpool", "export", "-f", pool], check=False, capture_output=True, timeout=120
        )
    for pid in leaked.get("processes", ()):
        if _is_zfs_fuse(pid) and zpool_vdevs():
            continue
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
