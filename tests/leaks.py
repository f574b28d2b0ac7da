"""What tests leave behind, found by where it lives rather than by guessing.

Everything a test makes lives under the pytest session's base temp dir, so a
leak is a mount whose target is under it, a loop device whose backing file is
under it, or a process whose MINIFS_OWNER points under it. Scoping by that dir
keeps the check exact even while other minifs sessions run on the machine.
"""

from __future__ import annotations

import contextlib
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
