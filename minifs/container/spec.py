"""What the user asked `minifs run` for, checked before anything is created.

Every check that can fail on the user's input happens here, so a bad limit or
name fails in a millisecond with exit 125 and nothing to clean up.
"""

from __future__ import annotations

import os
import re
from collections import namedtuple

from minifs.container import ContainerError
from minifs.errors import InvalidArgument
from minifs.loopdisk import parse_size
from minifs.mutable import Record

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from minifs.container.seccomp import Profile
    from minifs.container.security import Security

MIN_MEMORY = 6 * 1024 * 1024
"""docker's floor: below about 6 MiB not even a shell starts, so the container
would be OOM-killed before the command runs; refuse it up front instead."""

CPU_PERIOD_US = 100_000
"""The CFS period minifs uses; a quota of `cpus * period` is the seed's 20%."""

MIN_QUOTA_US = 1000
"""The kernel refuses CFS quotas below 1 ms."""

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
HOSTNAME_PATTERN = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9-]{1,63})*"
"""Patterns rather than compiled: `re` compiles one on first use, so a run
without --name or --hostname never pays for it."""


def parse_memory(text: str) -> int:
    """`200M`, `1g`, `512k`, `1048576` -> bytes (binary units, as docker)."""
    try:
        size = parse_size(text)
    except InvalidArgument:
        raise ContainerError(f"--memory {text!r} is not a size; write it like 200M or 1G") from None
    if size < MIN_MEMORY:
        raise ContainerError(
            f"--memory {text} is below the 6M minimum a container needs to start; give more"
        )
    return size


def check_size(text: str, driver: str) -> int:
    """`--size`: docker caps a container's writable layer only where its storage
    driver can enforce a quota on one clone (overlay2 on xfs mounted with
    pquota, btrfs, zfs). A driver without a `size_limit` (overlay2's upper dirs
    and vfs's copies are plain directories on the state dir's filesystem) gets a
    valid size refused with what it would take, rather than silently ignored."""
    try:
        size = parse_size(text)
    except InvalidArgument:
        raise ContainerError(f"--size {text!r} is not a size; write it like 10G") from None
    if size <= 0:
        raise ContainerError(f"--size {text!r} is not a size; write it like 10G")
    from minifs.plugins import get_driver

    cls = get_driver(driver)
    if cls.size_limit is None:
        raise ContainerError(
            f"--size: the {driver} driver cannot cap one clone's size ({cls.size_refusal}); "
            "drop --size or pick a driver that can ('minifs drivers --json': size_limit)"
        )
    return size


class Limits(namedtuple("Limits", "memory cpus pids", defaults=(None, None, None))):
    """cgroup limits; None means unlimited. A named tuple, like the other value
    types of the launcher: a frozen dataclass costs each `minifs run` over a
    millisecond to build at import, a named tuple a fifth of that (and
    typing.NamedTuple would import typing)."""

    __slots__ = ()
    memory: int | None
    cpus: float | None
    pids: int | None

    @property
    def cpu_quota_us(self) -> int | None:
        return None if self.cpus is None else round(self.cpus * CPU_PERIOD_US)

    @classmethod
    def parse(cls, memory: str | None, cpus: float | None, pids: int | None) -> Limits:
        if cpus is not None:
            available = os.cpu_count() or 1
            if not 0 < cpus <= available or cpus * CPU_PERIOD_US < MIN_QUOTA_US:
                raise ContainerError(
                    f"--cpus {cpus:g} is impossible here; give a value from 0.01 to {available}"
                )
        if pids is not None and pids < 1:
            raise ContainerError(f"--pids {pids} is impossible; give 1 or more")
        return cls(None if memory is None else parse_memory(memory), cpus, pids)


class Spec(Record):
    """One `minifs run`, parsed and checked."""

    image: str
    command: list[str] = []
    name: str | None = None
    driver: str = "overlay2"
    hostname: str | None = None
    limits: Limits = Limits()
    net: str = "none"
    ip: str | None = None
    masquerade: bool = False
    size: str | None = None
    env: dict[str, str] = {}
    workdir: str | None = None
    remove: bool = False
    detach: bool = False
    trace: bool = False
    security: Security | None = None
    """None: Docker's defaults, filled in by `check`."""
    seccomp_profile: Profile | None = None
    """The checked profile `security.seccomp` names; None when unconfined."""

    def check(self) -> None:
        if self.security is None:
            from minifs.container.security import Security

            self.security, self.seccomp_profile = Security.parse()
        if self.name is not None and not re.fullmatch(NAME_PATTERN, self.name):
            raise ContainerError(
                f"invalid container name {self.name!r}; use letters, digits and _.- "
                "(not first), at most 63 characters"
            )
        if self.hostname is not None and (
            len(self.hostname) > 64 or not re.fullmatch(HOSTNAME_PATTERN, self.hostname)
        ):
            raise ContainerError(
                f"invalid hostname {self.hostname!r}; use letters, digits, '-' and '.', "
                "at most 64 characters"
            )
        if self.net not in ("none", "bridge"):
            raise ContainerError(f"--net {self.net} is unknown; use none or bridge")
        if self.ip is not None:
            if self.net != "bridge":
                raise ContainerError("--ip needs --net bridge")
            import ipaddress  # only here: every `minifs run` imports this module

            try:
                ipaddress.IPv4Address(self.ip)
            except ValueError:
                raise ContainerError(f"--ip {self.ip} is not an IPv4 address") from None
        if self.masquerade and self.net != "bridge":
            raise ContainerError("--masquerade needs --net bridge")
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise ContainerError(f"-w {self.workdir} must be an absolute path")
        from minifs.plugins import get_driver

        get_driver(self.driver)  # an unknown driver before anything is made for the container
        if self.size is not None:
            check_size(self.size, self.driver)


def parse_env(items: list[str] | None) -> dict[str, str]:
    """`-e K=V` pairs; `-e K` takes K from minifs's own environment, as docker."""
    env = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not key or "\0" in item:
            raise ContainerError(f"bad -e {item!r}; write it as KEY=VALUE")
        if not sep:
            if key not in os.environ:
                continue
            value = os.environ[key]
        env[key] = value
    return env
