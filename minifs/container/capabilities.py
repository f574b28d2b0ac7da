"""Linux capabilities of a container's process: Docker's default 14, changed by
`--cap-add`, `--cap-drop` and `--privileged`, and set by PID 1 just before exec.

Why only the bounding and inheritable sets are written: for a root process,
execve(2) makes the new permitted and effective sets `inheritable | bounding`
(a root exec counts every file capability as set). Dropping the bounding set
to the container's list and setting the inheritable set to the same list
therefore gives the command exactly that list in all four sets, while PID 1
itself keeps every capability until the exec, so it can still load the
seccomp filter (which needs CAP_SYS_ADMIN or no_new_privs) as its last step.
For a non-root `--user` the exec empties permitted and effective, as Docker's.
"""

from __future__ import annotations

import os

from minifs import linux
from minifs.container import ContainerError

NAMES = (
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
)
"""Capability names without `CAP_`, at their number (linux/capability.h)."""

DEFAULT = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "NET_RAW",
    "SYS_CHROOT",
    "MKNOD",
    "AUDIT_WRITE",
    "SETFCAP",
)
"""Docker's default set: what ordinary root work in an image needs (chown,
binding port 80, ping, su), and none of what reaches the host (SYS_ADMIN,
SYS_MODULE, SYS_RAWIO, SYS_PTRACE, NET_ADMIN, ...)."""

_PR_CAPBSET_DROP = 24
_PR_SET_KEEPCAPS = 8
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_PR_SET_NO_NEW_PRIVS = 38


def last_cap() -> int:
    """The highest capability this kernel knows; `--privileged` gets 0..it."""
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
        return min(int(f.read()), len(NAMES) - 1)


def _name(text: str, flag: str) -> str:
    """`net_admin`, `CAP_NET_ADMIN` -> `NET_ADMIN`, as docker accepts both."""
    name = text.upper().removeprefix("CAP_")
    if name != "ALL" and name not in NAMES:
        raise ContainerError(
            f"{flag} {text}: unknown capability; use a name such as NET_ADMIN or SYS_PTRACE "
            "(see capabilities(7)) or ALL"
        )
    return name


def held() -> int:
    """The permitted set of this process, from /proc/self/status rather than
    capget(2): the monitor checks `--cap-add` against it before anything is
    made, and reading it there keeps ctypes out of the monitor (see
    `linux._c`)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapPrm:"):
                return int(line.split()[1], 16)
    raise OSError("no CapPrm line in /proc/self/status")


def resolve(add: list[str], drop: list[str], privileged: bool) -> list[str]:
    """The container's capability names: docker's rule, drops before adds, so
    `--cap-drop ALL --cap-add CHOWN` is CHOWN alone."""
    adds = [_name(a, "--cap-add") for a in add]
    drops = [_name(d, "--cap-drop") for d in drop]
    held_now = held()  # minifs cannot hand on what it lacks (a host's own bounding set)
    everything = [n for i, n in enumerate(NAMES[: last_cap() + 1]) if held_now & (1 << i)]
    if privileged:
        return everything
    caps = set() if "ALL" in drops else set(DEFAULT) - set(drops)
    caps |= set(everything) if "ALL" in adds else set(adds)
    return [n for n in everything if n in caps]


def _mask(names: list[str]) -> int:
    bits = 0
    for name in names:
        bits |= 1 << NAMES.index(name)
    return bits


def limit(names: list[str]) -> str:
    """Bounding set down to `names`, ambient set empty, inheritable = `names`;
    effective and permitted stay full until exec (see the module's docstring)."""
    keep = _mask(names)
    for cap in range(last_cap() + 1):
        if not keep & (1 << cap):
            linux.prctl(_PR_CAPBSET_DROP, cap, f"PR_CAPBSET_DROP {NAMES[cap]}")
    linux.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "PR_CAP_AMBIENT_CLEAR_ALL")
    permitted, _ = linux.capget()
    linux.capset(permitted, permitted, keep & permitted)
    dropped = last_cap() + 1 - len(names)
    kept = ",".join(names) if len(names) <= len(DEFAULT) else f"{len(names)} capabilities"
    return f"prctl PR_CAPBSET_DROP x{dropped}; capset inheritable {kept or 'none'}"


def become(uid: int, gid: int) -> str:
    """setgroups, setgid, setuid, keeping the permitted set across the change
    (PR_SET_KEEPCAPS) and raising it again, so the seccomp filter can still be
    loaded; the exec that follows empties it for the non-root user."""
    linux.prctl(_PR_SET_KEEPCAPS, 1, "PR_SET_KEEPCAPS")
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)
    permitted, inheritable = linux.capget()
    linux.capset(permitted, permitted, inheritable)
    linux.prctl(_PR_SET_KEEPCAPS, 0, "PR_SET_KEEPCAPS")
    return f"setgroups {gid}; setgid {gid}; setuid {uid}"


def no_new_privileges() -> str:
    """PR_SET_NO_NEW_PRIVS: setuid binaries and file capabilities grant nothing."""
    linux.prctl(_PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    return "prctl PR_SET_NO_NEW_PRIVS 1"
