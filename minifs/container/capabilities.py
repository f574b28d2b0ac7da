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

import ctypes
import os

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
_CAP_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _Data(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


_libc = ctypes.CDLL(None, use_errno=True)


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


def resolve(add: list[str], drop: list[str], privileged: bool) -> list[str]:
    """The container's capability names: docker's rule, drops before adds, so
    `--cap-drop ALL --cap-add CHOWN` is CHOWN alone."""
    adds = [_name(a, "--cap-add") for a in add]
    drops = [_name(d, "--cap-drop") for d in drop]
    held, _ = _capget()  # minifs cannot hand on what it lacks (a host's own bounding set)
    everything = [n for i, n in enumerate(NAMES[: last_cap() + 1]) if held & (1 << i)]
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


def _prctl(option: int, arg: int, what: str) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl {what}: {os.strerror(err)}")


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _Header(_CAP_VERSION_3, 0)
    data = (_Data * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _capget() -> tuple[int, int]:
    """This process's (permitted, inheritable) sets."""
    header = _Header(_CAP_VERSION_3, 0)
    data = (_Data * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    permitted = data[0].permitted | (data[1].permitted << 32)
    return permitted, data[0].inheritable | (data[1].inheritable << 32)


def limit(names: list[str]) -> str:
    """Bounding set down to `names`, ambient set empty, inheritable = `names`;
    effective and permitted stay full until exec (see the module's docstring)."""
    keep = _mask(names)
    for cap in range(last_cap() + 1):
        if not keep & (1 << cap):
            _prctl(_PR_CAPBSET_DROP, cap, f"PR_CAPBSET_DROP {NAMES[cap]}")
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "PR_CAP_AMBIENT_CLEAR_ALL")
    permitted, _ = _capget()
    _capset(permitted, permitted, keep & permitted)
    dropped = last_cap() + 1 - len(names)
    kept = ",".join(names) if len(names) <= len(DEFAULT) else f"{len(names)} capabilities"
    return f"prctl PR_CAPBSET_DROP x{dropped}; capset inheritable {kept or 'none'}"


def become(uid: int, gid: int) -> str:
    """setgroups, setgid, setuid, keeping the permitted set across the change
    (PR_SET_KEEPCAPS) and raising it again, so the seccomp filter can still be
    loaded; the exec that follows empties it for the non-root user."""
    _prctl(_PR_SET_KEEPCAPS, 1, "PR_SET_KEEPCAPS")
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)
    permitted, inheritable = _capget()
    _capset(permitted, permitted, inheritable)
    _prctl(_PR_SET_KEEPCAPS, 0, "PR_SET_KEEPCAPS")
    return f"setgroups {gid}; setgid {gid}; setuid {uid}"


def no_new_privileges() -> str:
    """PR_SET_NO_NEW_PRIVS: setuid binaries and file capabilities grant nothing."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    return "prctl PR_SET_NO_NEW_PRIVS 1"
