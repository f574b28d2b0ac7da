"""What acts on containers after `minifs run`: ps, inspect, stop, exec, logs, rm,
and the reclaiming of containers whose monitor died.

A container is running while its monitor (the `minifs run` process, or the
detached copy `-d` forks) lives; the monitor alone cleans up after a normal
end. When it was killed instead, its record still says running or created:
`lifecycle.reclaim` (run by `ps`, `run`, `rm` and `gc`) kills what is left of the
container and removes its cgroup, lease and, if it never ran or had --rm,
its clone and record.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import NoReturn

from minifs import linux
from minifs.container import ContainerError, records
from minifs.container.cgroups import Cgroup
from minifs.container.lifecycle import finish, reclaim, wait_gone
from minifs.container.process import (
    DEFAULT_PATH,
    FORWARDED,
    close_fds_but,
    confine_and_exec,
    execute,
    exit_code,
    report,
    reported,
    reset_signals,
    which,
)
from minifs.container.records import Container
from minifs.container.security import Security, resolve_user
from minifs.container.trace import Trace
from minifs.errors import InUse, NotFound
from minifs.output import span

JOIN_ORDER = ("cgroup", "ipc", "uts", "net", "pid", "mnt")
"""setns order for exec: the mount namespace last, since entering it changes
our root and /proc/PID paths would no longer resolve."""


def get(root: str | os.PathLike[str] | None, ref: str) -> Container:
    found = records.find(root, ref)
    if found is None:
        raise NotFound(f"no container named {ref!r}; see 'minifs ps -a'")
    return found


def status_text(c: Container) -> str:
    now = time.time()
    if c.running:
        return f"running {span(now - (c.started or c.created))}"
    if c.status == records.EXITED:
        code = "?" if c.exit_code is None else c.exit_code
        oom = ", OOMKilled" if c.oom_killed else ""
        return f"exited ({code}{oom}) {span(now - (c.finished or now))} ago"
    return c.status


def listing(root: str | os.PathLike[str] | None, everything: bool) -> list[dict[str, object]]:
    reclaim(root)
    rows = []
    for c in records.all_containers(root):
        if everything or c.running:
            rows.append({**c.to_dict(), "state": status_text(c)})
    return rows


def inspect(root: str | os.PathLike[str] | None, ref: str) -> dict[str, object]:
    """The record, with the cgroup's live counters while it runs."""
    c = get(root, ref)
    data = c.to_dict()
    data["state"] = status_text(c)
    cgroup = Cgroup.from_record(c.cgroup)
    if c.running and cgroup is not None:
        data["stats"] = cgroup.stats()
    return data


def stop(root: str | os.PathLike[str] | None, ref: str, timeout: float = 10.0) -> Container:
    """docker stop: SIGTERM to PID 1, SIGKILL after `timeout` seconds.

    Returns once the monitor has exited, not only once the record says so: it
    records the end, cleans up, records it again and closes the store, and a
    caller that goes on to `rm` or to look for what the container held must
    find it all done."""
    c = get(root, ref)
    if c.running and c.pid1_alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(c.pid, signal.SIGTERM)  # type: ignore[arg-type]
        if not wait_gone(c.pid, c.pid_start, timeout):  # type: ignore[arg-type]
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGKILL)  # type: ignore[arg-type]
        wait_gone(c.monitor_pid, c.monitor_start, 10.0)  # type: ignore[arg-type]
    reclaim(root)
    return records.load(c.dir) or c


def remove(root: str | os.PathLike[str] | None, ref: str, force: bool = False) -> None:
    """docker rm: the record, log and clone of a container that has ended."""
    reclaim(root)
    c = get(root, ref)
    if c.running:
        if not force:
            raise InUse(f"container {c.name} is running; stop it first with 'minifs stop {c.name}'")
        c = stop(root, ref, timeout=0)
        if records.load(c.dir) is None:
            return
    finish(c, None, keep_clone=False)


def logs(root: str | os.PathLike[str] | None, ref: str) -> bytes:
    c = get(root, ref)
    try:
        return c.log_path.read_bytes()
    except FileNotFoundError:
        raise NotFound(
            f"container {c.name} has no log: only detached runs (-d) write one"
        ) from None


# -- exec -------------------------------------------------------------------------


def exec_in(
    root: str | os.PathLike[str] | None,
    ref: str,
    argv: list[str],
    env: dict[str, str],
    workdir: str | None,
) -> int:
    """nsenter, then exec: join the container's cgroup and namespaces, fork
    (a process entering a pid namespace only puts its children there) and run
    `argv` beside PID 1. Returns its exit code."""
    c = get(root, ref)
    if not (c.running and c.pid1_alive()):
        raise ContainerError(f"container {c.name} is not running; see 'minifs ps -a'")
    fds = {
        name: os.open(f"/proc/{c.pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC) for name in JOIN_ORDER
    }
    pid_r, pid_w = os.pipe()
    err_r, err_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(pid_r)
        os.close(err_r)
        _joiner(c, fds, argv, {**c.env, **env}, workdir or c.workdir, pid_w, err_w)
    for fd in (*fds.values(), pid_w, err_w):
        os.close(fd)
    with os.fdopen(pid_r, "rb") as f:
        line = f.readline()
    said = os.read(err_r, 4096)
    os.close(err_r)
    if said or not line:
        os.waitpid(child, 0)
        raise reported(said, "exec failed")
    inner = int(line)

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(inner, sig)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        _, status = os.waitpid(child, 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_code(status)


def _joiner(
    c: Container,
    fds: dict[str, int],
    argv: list[str],
    env: dict[str, str],
    workdir: str,
    pid_w: int,
    err_w: int,
) -> NoReturn:
    try:
        linux.set_parent_death_signal(signal.SIGKILL)
        sec = Security.from_record(c.security)
        confine = None
        if sec is not None and sec.seccomp is not None:
            from minifs.container import seccomp  # before setns: it finds libseccomp on the host

            source = None if sec.seccomp == "default" else sec.seccomp
            profile = seccomp.load(source)
            cache = Path(c.root) / seccomp.CACHE_DIR
            confine = seccomp.prepare(profile, sec.capabilities, cache)  # type: ignore[arg-type]
        cgroup = Cgroup.from_record(c.cgroup)
        if cgroup is not None:
            cgroup.join()
        for name in JOIN_ORDER:
            linux.setns(fds[name])
            os.close(fds[name])
        inner = os.fork()
        if inner == 0:
            os.close(pid_w)
            os.chdir(workdir)
            path = which(argv[0], env.get("PATH", DEFAULT_PATH))
            close_fds_but(err_w)
            reset_signals()
            if sec is None:  # a container started before minifs confined them
                execute(path, argv, env)
            user = resolve_user(sec.user) if sec.user is not None else None
            confine_and_exec(sec, user, confine, Trace(False, -1), path, argv, env)
        os.write(pid_w, f"{inner}\n".encode())
        # Not close_fds_but(): /proc here is the container's, where we have no pid.
        os.close(pid_w)
        os.close(err_w)
    except BaseException as exc:
        report(err_w, exc)
        os._exit(125)
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_IGN)
    _, status = os.waitpid(inner, 0)
    os._exit(exit_code(status) & 0xFF)
