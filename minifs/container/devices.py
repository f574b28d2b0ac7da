"""Which device nodes a container may open: the ones its /dev holds, no others.

CAP_MKNOD is in Docker's default set (images unpack device nodes, programs
make fifos), so a container can make a node for any major:minor; what stops it
from opening the host's disk through one is the devices cgroup, which checks
every open(2) and mknod(2) of a device against an allow list. minifs writes
runc's default list on cgroup v1 (`devices.deny a`, then `devices.allow` per
entry). On a machine with no v1 devices controller (pure cgroup v2, where runc
attaches a BPF device program instead) minifs refuses to start the container
rather than run it unprotected: that program is not written yet.
"""

from __future__ import annotations

from pathlib import Path

from minifs.container import ContainerError

ALLOWED = (
    "c *:* m",  # mknod of any node (opening it is another matter)
    "b *:* m",
    "c 1:3 rwm",  # null
    "c 1:5 rwm",  # zero
    "c 1:7 rwm",  # full
    "c 1:8 rwm",  # random
    "c 1:9 rwm",  # urandom
    "c 5:0 rwm",  # tty
    "c 5:2 rwm",  # ptmx
    "c 136:* rwm",  # the pts a devpts instance hands out
)


def restrict(directory: Path | None) -> list[str]:
    """Deny every device in the container's devices cgroup, then allow
    ALLOWED; returns what was written, for --trace."""
    if directory is None:
        raise ContainerError(
            "no cgroup v1 devices controller here, and minifs cannot yet filter devices "
            "on cgroup v2; mount it (mount -t cgroup -o devices devices "
            "/sys/fs/cgroup/devices) or run with --privileged to go without"
        )
    (directory / "devices.deny").write_text("a")
    for rule in ALLOWED:
        (directory / "devices.allow").write_text(rule)
    return [f"echo a > devices.deny; echo '{'; '.join(ALLOWED)}' > devices.allow"]
