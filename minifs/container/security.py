"""A container's security settings: what `--cap-add`, `--cap-drop`,
`--privileged`, `--security-opt`, `--read-only`, `--tmpfs` and `--user` ask
for, checked before anything is made, and kept in the container's record so
that `minifs inspect` shows them and `minifs exec` applies the same ones.

The defaults are Docker's (and runc's default spec): 14 capabilities,
/proc's dangerous corners read-only or masked, only the default device nodes,
Docker's seccomp profile. `--privileged` gives every capability and lifts
the masks, the device list and seccomp; what `--read-only`, `--user` and
`no-new-privileges` ask for still holds under it, as in Docker.
"""

from __future__ import annotations

import re
from collections import namedtuple

from minifs.container import ContainerError, capabilities, seccomp

READ_ONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
"""runc's default spec, as Docker sets it: files and directories through which a
container could read host secrets (keys, kernel memory, timers of other
processes) or change the host (sysctls, sysrq, interrupts, power limits)."""

USER_PATTERN = r"([A-Za-z0-9_][A-Za-z0-9_.-]*)(:([A-Za-z0-9_][A-Za-z0-9_.-]*))?"


_SECURITY_FIELDS = (
    "capabilities privileged seccomp no_new_privileges read_only tmpfs user masked_paths "
    "read_only_paths devices"
)
_SECURITY_DEFAULTS = (
    False,
    "default",
    False,
    False,
    [],
    None,
    list(MASKED_PATHS),
    list(READ_ONLY_PATHS),
    "default",
)


class Security(namedtuple("Security", _SECURITY_FIELDS, defaults=_SECURITY_DEFAULTS)):
    """The effective settings, as the record and `minifs inspect` keep them."""

    __slots__ = ()

    capabilities: list[str]
    privileged: bool
    seccomp: str | None
    """"default", a profile's path, or None for unconfined."""
    no_new_privileges: bool
    read_only: bool
    tmpfs: list[str]
    user: str | None
    masked_paths: list[str]
    read_only_paths: list[str]
    devices: str
    """"default" (null zero full random urandom tty ptmx pts) or "all"."""

    @classmethod
    def parse(
        cls,
        cap_add: list[str] | None = None,
        cap_drop: list[str] | None = None,
        privileged: bool = False,
        security_opt: list[str] | None = None,
        read_only: bool = False,
        tmpfs: list[str] | None = None,
        user: str | None = None,
    ) -> tuple[Security, seccomp.Profile | None]:
        """The settings and the checked seccomp profile (None: unconfined);
        a bad name, option or profile is a ContainerError (exit 125)."""
        caps = capabilities.resolve(cap_add or [], cap_drop or [], privileged)
        profile_source: str | None = None
        no_new_privileges = False
        for opt in security_opt or []:
            key, sep, value = opt.replace("=", ":", 1).partition(":")
            if key == "no-new-privileges" and value in ("", "true", "false"):
                no_new_privileges = value != "false"
            elif key == "seccomp" and sep and value:
                profile_source = value
            else:
                raise ContainerError(
                    f"--security-opt {opt}: unknown security option; use no-new-privileges, "
                    f"seccomp=PROFILE.json or seccomp={seccomp.UNCONFINED}"
                )
        if privileged and profile_source is None:
            profile_source = seccomp.UNCONFINED
        profile = seccomp.load(profile_source)
        for path in tmpfs or []:
            if not path.startswith("/") or ":" in path or path == "/":
                raise ContainerError(
                    f"--tmpfs {path}: give an absolute directory other than /, without options"
                )
        if user is not None and not re.fullmatch(USER_PATTERN, user):
            raise ContainerError(f"--user {user!r}: write it as UID[:GID] or NAME[:GROUP]")
        named = "default" if profile_source is None else profile_source
        return cls(
            capabilities=caps,
            privileged=privileged,
            seccomp=None if profile is None else named,
            no_new_privileges=no_new_privileges,
            read_only=read_only,
            tmpfs=list(tmpfs or []),
            user=user,
            masked_paths=[] if privileged else list(MASKED_PATHS),
            read_only_paths=[] if privileged else list(READ_ONLY_PATHS),
            devices="all" if privileged else "default",
        ), profile

    def to_record(self) -> dict[str, object]:
        return self._asdict()

    @classmethod
    def from_record(cls, data: dict[str, object] | None) -> Security | None:
        return cls(**data) if data else None  # type: ignore[arg-type]


def _lookup(path: str, name: str, what: str) -> tuple[int, int | None]:
    """(id, primary gid or None) of `name` in the image's /etc/passwd or
    /etc/group; a number stands for itself."""
    if name.isdigit():
        return int(name), None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 4 and fields[0] == name:
                    return int(fields[2]), int(fields[3]) if what == "user" else None
    except OSError:
        pass
    raise ContainerError(f"--user: no {what} {name!r} in the image's {path}; give a number")


def resolve_user(user: str) -> tuple[int, int]:
    """`--user UID[:GID]` or names, read after pivot_root from the image's own
    files, as Docker does: a user's group is its primary one unless given,
    else 0."""
    name, _, group = user.partition(":")
    uid, primary = _lookup("/etc/passwd", name, "user")
    gid = _lookup("/etc/group", group, "group")[0] if group else (primary or 0)
    return uid, gid
