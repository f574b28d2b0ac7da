"""What every process minifs starts inside a container needs around fork and
exec: `run`'s PID 1 and `exec`'s command alike.

Those processes report a failure to the monitor as one line "CODE TEXT" on a
pipe (`report`, `reported`), so it reaches the user as `minifs run` would have
said it, with docker's exit codes: 125 for minifs's own errors, 126 for a
command that is in the image but cannot be run, 127 for one that is not there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time

from minifs.container import ContainerError, capabilities
from minifs.errors import MinifsError

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import NoReturn

    from minifs.container.seccomp import Filter
    from minifs.container.security import Security
    from minifs.container.trace import Trace

FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
"""What the monitor (and `exec`) pass on to the container's process."""
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CANNOT_INVOKE = 126
"""docker's exit code for a command that is in the image but cannot be run
(not executable, a directory, a binary for another machine)."""
NOT_FOUND = 127
"""docker's (and a shell's) exit code for a command that is not in the image:
nowhere in PATH, no such file, or a script whose interpreter is missing."""
_EXEC_ERRNO_CODES = {
    errno.EACCES: CANNOT_INVOKE,
    errno.EISDIR: CANNOT_INVOKE,
    errno.ENOEXEC: CANNOT_INVOKE,
    errno.ENOENT: NOT_FOUND,
    errno.ENOTDIR: NOT_FOUND,
}


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def _error(code: int, text: str) -> ContainerError:
    """A ContainerError that exits `code` rather than minifs's own 125."""
    error = ContainerError(text)
    error.exit_code = code
    return error


def which(command: str, path: str) -> str:
    """The program to exec, looked up in the container's PATH after pivot_root:
    127 (as docker) when it is nowhere, 126 when it is there but not runnable."""
    candidates = [command] if "/" in command else [f"{d or '.'}/{command}" for d in path.split(":")]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    for candidate in candidates:
        if os.path.isdir(candidate):
            raise _error(CANNOT_INVOKE, f"{candidate}: is a directory, not an executable file")
        if os.path.exists(candidate):
            raise _error(CANNOT_INVOKE, f"{candidate}: permission denied: not an executable file")
    if "/" in command:
        raise _error(NOT_FOUND, f"{command}: no such file in the image")
    raise _error(NOT_FOUND, f"{command}: command not found in the image (PATH={path})")


def execute(path: str, argv: list[str], env: dict[str, str]) -> NoReturn:
    """execve, its refusal told apart as docker does: 127 when what the file
    needs is missing (`which` found the file itself), 126 when it cannot be
    run (a noexec mount, a binary for another machine). Only here does an
    errno mean that: the same errno from an earlier step is minifs's own 125."""
    try:
        os.execve(path, argv, env)
    except OSError as exc:
        code = _EXEC_ERRNO_CODES.get(exc.errno or 0, ContainerError.exit_code)
        text = (exc.strerror or str(exc)).lower()
        if code == NOT_FOUND:
            text = "its #! interpreter or loader is not in the image"
        raise _error(code, f"{path}: {text}") from None


def confine_and_exec(
    sec: Security,
    user: tuple[int, int] | None,
    confine: Filter | None,
    t: Trace,
    path: str,
    command: list[str],
    env: dict[str, str],
) -> NoReturn:
    """The last steps before exec, in runc's order: capabilities, the user,
    no_new_privs, and the seccomp filter at the very end, so that nothing of
    minifs's own runs under it. Shared by `run`'s PID 1 and `exec`."""
    with t.step("capabilities") as said:
        said.append(capabilities.limit(sec.capabilities))
        if user is not None:
            said.append(capabilities.become(*user))
    if sec.no_new_privileges:
        with t.step("no_new_privs") as said:
            said.append(capabilities.no_new_privileges())
    if confine is not None:
        with t.step("seccomp") as said:
            said.append(confine.load())
    t.say("exec", time.perf_counter(), f"exec {' '.join(command)}")
    execute(path, command, env)


def close_fds_but(*keep: int) -> None:
    """Close everything but stdio and `keep` (which are close-on-exec) before
    exec, so no descriptor of minifs (the store, a lock) leaks into the command."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def reset_signals() -> None:
    """Default dispositions and no blocked signals for the command: ignored
    signals (Python ignores SIGPIPE) would otherwise survive exec."""
    for sig in range(1, signal.NSIG):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def report(err_w: int, exc: BaseException) -> None:
    """One line "CODE TEXT" for the monitor to raise as ContainerError: the
    error's own exit code (126 or 127 from `which` and `execute`), else 125."""
    code = ContainerError.exit_code
    if isinstance(exc, MinifsError):
        code, text = exc.exit_code, str(exc)
    elif isinstance(exc, OSError):
        text = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    else:
        text = f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(OSError):
        os.write(err_w, f"{code} {text}".encode())


def reported(said: bytes, otherwise: str) -> ContainerError:
    """The error a child process sent with `report` ("CODE TEXT"), or
    `otherwise` when it died without a word."""
    code, _, text = said.decode(errors="replace").strip().partition(" ")
    return _error(int(code) if code.isdigit() else ContainerError.exit_code, text or otherwise)
