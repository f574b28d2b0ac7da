"""Seccomp profiles in Docker's JSON format, turned into a filter by libseccomp.

The profile is data (`seccomp.json` beside this module is the default, a user
passes another with `--security-opt seccomp=FILE`), checked in the monitor
before anything is made, so a malformed one is a one-line 125. PID 1 builds the
filter while the monitor is still cloning (`prepare`, from a cache in the
state dir after the first time) and loads it as its very last step before
exec (`Filter.load`), so none of minifs's own set-up runs under it.

Docker's semantics: rules apply only when their `includes` hold (every
capability named is the container's, the machine's architecture is
listed, the kernel is at least `minKernel`) and no `excludes` does; a syscall
this libseccomp does not know is skipped; several conditions on one argument
become one rule each (libseccomp would refuse them in one rule).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import namedtuple
from pathlib import Path

from minifs import linux
from minifs.container import ContainerError

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import Any

DEFAULT_PROFILE = Path(__file__).with_name("seccomp.json")
UNCONFINED = "unconfined"
CACHE_DIR = "seccomp"
"""Compiled filters, by profile, capabilities and kernel, in the state dir."""

_EPERM = 1
_ACTIONS = (
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_LOG",
)
_OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}
_GO_ARCHES = {
    "x86_64": "amd64",
    "i686": "386",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}
"""`uname -m` -> the architecture names Docker's `includes.arches` use."""
_SCMP_ARCHES = {"amd64": "SCMP_ARCH_X86_64", "arm64": "SCMP_ARCH_AARCH64"}


class Rule(namedtuple("Rule", "action errno name args")):
    """One libseccomp rule: action for a syscall when all `args` hold."""

    __slots__ = ()

    action: str
    errno: int
    name: str
    args: tuple[tuple[int, int, int, int], ...]
    """(index, op, value, valueTwo)"""


class Profile(namedtuple("Profile", "source data raw")):
    """A checked profile: where it came from, its JSON and its bytes (what a
    compiled filter is cached by)."""

    __slots__ = ()

    source: str
    data: dict[str, Any]
    raw: bytes


def _bad(source: str, what: str) -> ContainerError:
    return ContainerError(
        f"--security-opt seccomp={source}: {what}; give a profile in Docker's seccomp JSON "
        f"format (defaultAction, syscalls) or seccomp={UNCONFINED}"
    )


def load(source: str | None) -> Profile | None:
    """The profile `--security-opt seccomp=` names (None: the default; None
    back for `unconfined`), checked entry by entry."""
    if source == UNCONFINED:
        return None
    path = DEFAULT_PROFILE if source is None else Path(source)
    shown = str(path) if source is None else source
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except OSError as exc:
        raise _bad(shown, f"cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise _bad(shown, f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _bad(shown, "not a JSON object")
    if data.get("defaultAction") not in _ACTIONS:
        raise _bad(shown, f"defaultAction {data.get('defaultAction')!r} is not a seccomp action")
    syscalls = data.get("syscalls") or []
    if not isinstance(syscalls, list):
        raise _bad(shown, "syscalls is not a list")
    for i, entry in enumerate(syscalls):
        _check_entry(shown, i, entry)
    return Profile(shown, data, raw)


def _check_entry(source: str, i: int, entry: object) -> None:
    if not isinstance(entry, dict):
        raise _bad(source, f"syscalls[{i}] is not an object")
    names = entry.get("names", [entry["name"]] if "name" in entry else None)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _bad(source, f"syscalls[{i}] has no list of names")
    if entry.get("action") not in _ACTIONS:
        raise _bad(source, f"syscalls[{i}].action {entry.get('action')!r} is not a seccomp action")
    for arg in entry.get("args") or []:
        if not (
            isinstance(arg, dict)
            and arg.get("index") in range(6)
            and isinstance(arg.get("value"), int)
            and isinstance(arg.get("valueTwo", 0), int)
            and arg.get("op") in _OPS
        ):
            raise _bad(source, f"syscalls[{i}] has a bad argument condition {arg!r}")


def _kernel() -> tuple[int, ...]:
    return _version(os.uname().release)


def _version(text: str) -> tuple[int, ...]:
    """'6.18.44-fc' -> (6, 18, 44)."""
    parts = []
    for part in text.split("-")[0].split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def _applies(entry: dict[str, Any], caps: set[str], arch: str, kernel: tuple[int, ...]) -> bool:
    """Docker's includes/excludes: every included capability held, the arch
    listed, the kernel new enough; no excluded capability or arch."""
    includes, excludes = entry.get("includes") or {}, entry.get("excludes") or {}
    arches = {arch, _SCMP_ARCHES.get(arch, "")}
    if any(c.upper().removeprefix("CAP_") not in caps for c in includes.get("caps") or []):
        return False
    if includes.get("arches") and not arches & set(includes["arches"]):
        return False
    if includes.get("minKernel") and kernel < _version(includes["minKernel"]):
        return False
    if any(c.upper().removeprefix("CAP_") in caps for c in excludes.get("caps") or []):
        return False
    return not (excludes.get("arches") and arches & set(excludes["arches"]))


def rules(profile: Profile, caps: list[str]) -> list[Rule]:
    """The profile's rules that apply to a container with `caps` here."""
    data = profile.data
    arch = _GO_ARCHES.get(os.uname().machine, os.uname().machine)
    kernel, held = _kernel(), set(caps)
    default_errno = data.get("defaultErrnoRet", _EPERM)
    found = []
    for entry in data.get("syscalls") or []:
        if not _applies(entry, held, arch, kernel):
            continue
        errno = entry.get("errnoRet", default_errno)
        conditions = [
            (a["index"], _OPS[a["op"]], a["value"], a.get("valueTwo", 0))
            for a in entry.get("args") or []
        ]
        indexes = [c[0] for c in conditions]
        # Two conditions on one argument cannot share a libseccomp rule: OR them.
        groups = [(c,) for c in conditions] if len(set(indexes)) < len(indexes) else [conditions]
        for name in entry.get("names", [entry.get("name")]):
            found.extend(Rule(entry["action"], errno, name, tuple(g)) for g in groups)
    return found


class Filter(namedtuple("Filter", "source program made")):
    """A profile compiled to BPF ahead of time (while the monitor clones), so
    that loading it just before exec is one prctl(2)."""

    __slots__ = ()

    source: str
    program: bytes
    """An array of struct sock_filter, as libseccomp exports it."""
    made: str
    """How it was made, for --trace."""

    def load(self) -> str:
        """prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER): needs CAP_SYS_ADMIN or
        no_new_privs, which is why capabilities shrink only at exec."""
        linux.seccomp_set_filter(self.program)
        return f"seccomp {self.source}: {len(self.program) // 8} BPF instructions"


def prepare(profile: Profile, caps: list[str], cache: Path | None) -> Filter:
    """The filter for a container with `caps`, from `cache` (a directory in
    the state dir) when this profile was compiled for these capabilities on
    this kernel before: compiling costs libseccomp's import and some 30 ms of
    CPU, on every start, while the answer only changes with those inputs."""
    from minifs.smallhash import sha256

    key = sha256(profile.raw)
    key.update(" ".join([*caps, *os.uname()]).encode())
    path = None if cache is None else cache / f"{key.hexdigest()[:32]}.bpf"
    if path is not None:
        with contextlib.suppress(OSError):
            program = path.read_bytes()
            if program and len(program) % 8 == 0:  # whole sock_filter entries
                return Filter(profile.source, program, f"cached in {path}")
    compiler = _Compiler(profile, caps)
    program = compiler.program
    if path is not None:
        with contextlib.suppress(OSError):  # a read-only state dir only costs the cache
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}")
            tmp.write_bytes(program)
            os.replace(tmp, path)
    return Filter(profile.source, program, f"{compiler.count} rules compiled by libseccomp")


class _Compiler:
    """libseccomp (through pyseccomp) turning a profile's rules into BPF."""

    def __init__(self, profile: Profile, caps: list[str]) -> None:
        import pyseccomp  # ctypes and libseccomp: only when the cache has no answer

        self._seccomp = pyseccomp
        data = profile.data
        default = self._action(data["defaultAction"], data.get("defaultErrnoRet", _EPERM))
        self.filter = pyseccomp.SyscallFilter(default)
        # libseccomp would set no_new_privs on load; that is --security-opt's call.
        self.filter.set_attr(pyseccomp.Attr.CTL_NNP, 0)
        self._add_arches(data)
        self.count = 0
        for rule in rules(profile, caps):
            action = self._action(rule.action, rule.errno)
            if action == default:
                continue  # libseccomp refuses a rule that changes nothing
            number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, rule.name)
            if number == -1:
                continue  # a syscall this libseccomp does not know, as Docker
            args = [pyseccomp.Arg(*a) for a in rule.args]
            self.filter.add_rule(action, number, *args)
            self.count += 1
        self.program = self._export()

    def _export(self) -> bytes:
        fd = os.memfd_create("seccomp", os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(fd), "wb") as f:
                self.filter.export_bpf(f)
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _action(self, name: str, errno: int) -> int:
        s = self._seccomp
        return {
            "SCMP_ACT_ALLOW": s.ALLOW,
            "SCMP_ACT_ERRNO": s.ERRNO(errno),
            "SCMP_ACT_KILL": s.KILL,
            "SCMP_ACT_KILL_THREAD": s.KILL_THREAD,
            "SCMP_ACT_KILL_PROCESS": s.KILL_PROCESS,
            "SCMP_ACT_TRAP": s.TRAP,
            "SCMP_ACT_TRACE": s.TRACE(errno),
            "SCMP_ACT_LOG": s.LOG,
        }[name]

    def _add_arches(self, data: dict[str, Any]) -> None:
        """The native architecture's sub-architectures from the archMap (x86
        and x32 beside x86_64), so a 32-bit program gets the same rules rather
        than being killed for its architecture."""
        s = self._seccomp
        native = s.system_arch()
        for entry in data.get("archMap") or []:
            main = getattr(s.Arch, entry.get("architecture", "").removeprefix("SCMP_ARCH_"), None)
            if main != native:
                continue
            for sub in entry.get("subArchitectures") or []:
                arch = getattr(s.Arch, sub.removeprefix("SCMP_ARCH_"), None)
                if arch is not None and not self.filter.exist_arch(arch):
                    self.filter.add_arch(arch)
