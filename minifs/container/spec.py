"""What the user asked `minifs run` for, checked before anything is created.

Every check that can fail on the user's input happens here, so a bad limit or
name fails in a millisecond with exit 125 and nothing to clean up.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field

from minifs.container import ContainerError

MIN_MEMORY = 6 * 1024 * 1024
"""docker's floor: below about 6 MiB not even a shell starts, so the container
would be OOM-killed before the command runs; refuse it up front instead."""

CPU_PERIOD_US = 100_000
"""The CFS period minifs uses; a quota of `cpus * period` is the seed's 20%."""

MIN_QUOTA_US = 1000
"""The kernel refuses CFS quotas below 1 ms."""

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9-]{1,63})*")

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_memory(text: str) -> int:
    """`200M`, `1g`, `512k`, `1048576` -> bytes (binary units, as docker)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([bkmgt]?)i?b?", text.strip().lower())
    if not match:
        raise ContainerError(f"--memory {text!r} is not a size; write it like 200M or 1G")
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size < MIN_MEMORY:
        raise ContainerError(
            f"--memory {text} is below the 6M minimum a container needs to start; give more"
        )
    return size


@dataclass(frozen=True)
class Limits:
    """cgroup limits; None means unlimited."""

    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None

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


@dataclass
class Spec:
    """One `minifs run`, parsed and checked."""

    image: str
    command: list[str] = field(default_factory=list)
    name: str | None = None
    driver: str = "overlay2"
    hostname: str | None = None
    limits: Limits = field(default_factory=Limits)
    net: str = "none"
    ip: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    remove: bool = False
    detach: bool = False
    trace: bool = False

    def check(self) -> None:
        if self.name is not None and not NAME_RE.fullmatch(self.name):
            raise ContainerError(
                f"invalid container name {self.name!r}; use letters, digits and _.- "
                "(not first), at most 63 characters"
            )
        if self.hostname is not None and (
            len(self.hostname) > 64 or not HOSTNAME_RE.fullmatch(self.hostname)
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
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise ContainerError(f"-w {self.workdir} must be an absolute path")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


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
