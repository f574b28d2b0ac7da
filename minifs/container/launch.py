"""`minifs run`: the seed's walkthrough as a sequence of small, named steps.

Three processes, as in the seed's `ps` output (bash, unshare, bash):

- the *monitor* (minifs run itself, or its detached copy with `-d`) makes the
  cgroup, clones the image's layer, plugs the veth, forwards signals, waits,
  and removes everything when the container ends;
- the *unshare process* joins the cgroup, calls unshare(2) for mount, uts,
  ipc, net, pid and cgroup namespaces once the storage is up, forks once,
  leaves the pids cgroup (v1) and relays the exit status;
- *PID 1*: the unshare process is not itself in the pid namespace it made
  (the seed's `--fork` lesson: without the fork there is no PID 1 and the next
  fork fails with ENOMEM), its child is. PID 1 waits for the monitor's go
  (mount records, command, address), configures eth0, mounts the clone,
  pivot_roots into it, mounts /proc, /dev and /sys, sets the hostname and
  execs the command.

The seed clones first; here the unshare process is forked right after the
container's record and cgroup are made, and the monitor opens the storage,
resolves the image and clones while it joins the cgroup (see `Cgroup.join`),
unshares and forks PID 1, so that the two processes' work overlaps. The
unshare process waits for the storage backend to be up before it unshares
(see `open_storage`).

Each process dies with its parent (PR_SET_PDEATHSIG), and PID 1 leaves when
the monitor's go pipe closes unsaid, so a killed monitor takes the namespaces
(mounts, veth) down with it; what outlives it (cgroup, clone, lease) is named
in the container's record and reclaimed by the next minifs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from minifs import linux
from minifs.container import ContainerError, devices, records
from minifs.container.cgroups import Cgroup
from minifs.container.lifecycle import clone, create, finish, open_storage
from minifs.container.process import (
    DEFAULT_PATH,
    FORWARDED,
    close_fds_but,
    confine_and_exec,
    exit_code,
    report,
    reported,
    reset_signals,
    which,
)
from minifs.container.records import Container
from minifs.container.security import Security, resolve_user
from minifs.container.spec import Spec
from minifs.container.trace import Trace
from minifs.errors import MinifsError
from minifs.model import Mount
from minifs.resources import process_start_time

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import NoReturn

    from minifs.storage import Storage

NAMESPACES = (
    ("mount", linux.CLONE_NEWNS),
    ("uts", linux.CLONE_NEWUTS),
    ("ipc", linux.CLONE_NEWIPC),
    ("net", linux.CLONE_NEWNET),
    ("pid", linux.CLONE_NEWPID),
    ("cgroup", linux.CLONE_NEWCGROUP),
)


# -- the three processes ------------------------------------------------------------


class Launch:
    """One start of one container: `fork()`, then `go()` once it is cloned."""

    def __init__(self, container: Container, spec: Spec, trace: Trace) -> None:
        self.container = container
        self.spec = spec
        self.trace = trace
        self.cgroup = Cgroup.from_record(container.cgroup)
        assert spec.security is not None  # Spec.check filled it in
        self.security: Security = spec.security
        self.unshare_pid: int | None = None
        self.pid1: int | None = None
        self._pipes: dict[str, int] = {}
        self._interrupts = 0
        self._pending: list[int] = []

    def fork(self) -> None:
        """Make the cgroup and fork the unshare process, which joins it, waits
        for `unshare`, unshares and forks PID 1; PID 1 then waits for `go`."""
        c = self.container
        assert self.cgroup is not None
        with self.trace.step("cgroup") as said:
            said.extend(self.cgroup.create(self.spec.limits))
        if not self.security.privileged:
            with self.trace.step("devices") as said:
                said.extend(devices.restrict(self.cgroup.dir("devices")))
        if c.net == "bridge":
            from minifs.container import network  # with its pyroute2, only for a bridge

            with self.trace.step("netlink") as said:
                said.append(network.load())
        c.rootfs.mkdir(parents=True, exist_ok=True)
        pid_r, pid_w = os.pipe()
        up_r, up_w = os.pipe()
        go_r, go_w = os.pipe()
        err_r, err_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        since = time.perf_counter()
        # Ctrl-C here is a KeyboardInterrupt (signals are forwarded only once
        # the storage is up): held until the child is known to `abort`.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            child = os.fork()
            if child == 0:
                self.trace.say("fork", since, f"pid {os.getpid()}: the unshare process")
                for fd in (pid_r, up_w, go_w, err_r):
                    os.close(fd)
                self._unshare_process(pid_w, up_r, go_r, err_w, held)
            self.unshare_pid = child
            for fd in (pid_w, up_r, go_r, err_w):
                os.close(fd)
            self._pipes = {"pid": pid_r, "up": up_w, "go": go_w, "err": err_r}
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def unshare(self) -> None:
        """The storage backend is up: let the unshare process make the
        namespaces (a copy of the host's mounts as they are now)."""
        os.write(self._pipes["up"], b"u")
        self._close_pipe("up")

    def go(self, mounts: list[Mount]) -> None:
        """Learn PID 1's host pid, take the unshare process out of the pids
        cgroup where it cannot leave by itself and set --pids, plug in the
        veth, hand PID 1 what it needs, and wait until it has exec'd (its error
        pipe closes) or says why it could not."""
        c = self.container
        pid_r, go_w, err_r = self._pipes["pid"], self._pipes["go"], self._pipes["err"]
        with os.fdopen(pid_r, "rb", closefd=False) as f:
            line = f.readline()
        if not line:
            self._fail(err_r)
        self.pid1 = int(line)
        c.pid, c.pid_start = self.pid1, process_start_time(self.pid1)
        for sig in self._pending:  # sent to us before PID 1 existed
            self._forward(sig, None)
        cgroup, pids = self.cgroup, self.spec.limits.pids
        assert cgroup is not None
        moves = "pids" in cgroup.paths and not cgroup.pids_left_by_itself
        if moves or pids is not None:
            with self.trace.step("cgroup") as said:
                if moves:
                    said.append(cgroup.leave_pids(self.unshare_pid))
                if pids is not None:
                    said.append(cgroup.limit_pids(pids))
        lease = None
        if c.net == "bridge":
            from minifs.container import network

            with self.trace.step("veth") as said:
                lease = network.attach(
                    c.root, c.id, c.name, self.pid1, self.spec.ip, self.spec.masquerade
                )
                c.ip, c.prefix, c.gateway = lease.ip, lease.prefix, lease.gateway
                c.bridge, c.netns, c.veth = lease.bridge, lease.netns, lease.veth
                said.append(
                    f"ip link add {lease.veth} type veth peer name {lease.peer}; "
                    f"ip link set {lease.peer} netns {self.pid1}; "
                    f"ip link set {lease.veth} master {lease.bridge} up"
                )
                if lease.masquerade:
                    said.append(lease.masquerade)
        order = {
            "mounts": [m.to_dict() for m in mounts],
            "command": c.command,
            "env": c.env,
            "workdir": c.workdir,
            "lease": lease._asdict() if lease else None,
        }
        data = memoryview(json.dumps(order).encode())
        while data:  # a signal may cut a write short
            data = data[os.write(go_w, data) :]
        self._close_pipe("go")
        failure = os.read(err_r, 4096)
        if failure:
            self._fail(err_r, failure)
        self._close_pipe("pid")
        self._close_pipe("err")
        c.status, c.started = records.RUNNING, time.time()
        c.save()
        self.trace.say("started", self.trace.start, f"{c.name} ({c.id[:12]}) runs {c.command[0]}")

    def _close_pipe(self, name: str) -> None:
        fd = self._pipes.pop(name, -1)
        if fd >= 0:
            os.close(fd)

    def _fail(self, err_r: int, said: bytes = b"") -> NoReturn:
        """The start failed: raise what the unshare process or PID 1 said,
        "CODE TEXT" (see `report`)."""
        chunks = [said]
        while chunk := os.read(err_r, 4096):
            chunks.append(chunk)
        raise reported(b"".join(chunks), "the container died before its command started")

    def abort(self) -> None:
        """Undo a start that failed: PID 1 leaves on the closed go pipe (or by
        its parent-death signal), the unshare process is killed and reaped."""
        for name in list(self._pipes):
            self._close_pipe(name)
        if self.unshare_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.unshare_pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> int | None:
        """Kill PID 1 if it is still ours, and collect the unshare process."""
        if self.container.pid1_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGKILL)  # type: ignore[arg-type]
        if self.unshare_pid is None:
            return None
        _, status = os.waitpid(self.unshare_pid, 0)
        self.unshare_pid = None
        return exit_code(status)

    # -- the unshare process ---------------------------------------------------------

    def _unshare_process(
        self, pid_w: int, up_r: int, go_r: int, err_w: int, mask: set[signal.Signals]
    ) -> NoReturn:
        try:
            for sig in FORWARDED:  # not the monitor's handler; PID 1 inherits these
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            linux.set_parent_death_signal(signal.SIGKILL)
            with self.trace.step("cgroup") as said:
                said.append(self.cgroup.join())  # type: ignore[union-attr]
            if not os.read(up_r, 1):
                os._exit(1)  # the monitor gave up before the storage was up
            os.close(up_r)
            with self.trace.step("unshare") as said:
                flags = 0
                for _, flag in NAMESPACES:
                    flags |= flag
                linux.unshare(flags)
                said.append("unshare " + " ".join(f"--{n}" for n, _ in NAMESPACES))
            since = time.perf_counter()
            pid1 = os.fork()
            if pid1 == 0:
                os.close(pid_w)
                self._pid1(go_r, err_w)
            self.trace.say("fork", since, f"--fork: host pid {pid1} is PID 1 inside")
            if self.cgroup.pids_left_by_itself:  # type: ignore[union-attr]
                with self.trace.step("cgroup") as said:
                    said.append(self.cgroup.leave_pids())  # type: ignore[union-attr]
            # Hold nothing of the monitor's: a detached run's caller waits for
            # its notify pipe and stderr to close. Before PID 1 may go on:
            # its pivot_root moves our root too (we share its mount namespace),
            # and /proc/self would then be a /proc we have no pid in.
            close_fds_but(pid_w)
            os.write(pid_w, f"{pid1}\n".encode())
            os.close(pid_w)
        except BaseException as exc:
            report(err_w, exc)
            os._exit(125)
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_IGN)  # the monitor forwards them to PID 1
        _, status = os.waitpid(pid1, 0)
        os._exit(exit_code(status) & 0xFF)

    # -- PID 1 --------------------------------------------------------------------

    def _pid1(self, go_r: int, err_w: int) -> NoReturn:
        c = self.container
        t = self.trace
        try:
            from minifs.container import rootfs  # here, not in the monitor, which waits on it

            linux.set_parent_death_signal(signal.SIGKILL)
            os.setsid()
            with t.step("mount") as said:  # while the monitor still clones
                said.append(rootfs.make_private())
            confine = None
            if self.spec.seccomp_profile is not None:
                from minifs.container import seccomp

                with t.step("seccomp") as said:  # made now, loaded just before exec
                    cache = Path(c.root) / seccomp.CACHE_DIR
                    confine = seccomp.prepare(
                        self.spec.seccomp_profile, self.security.capabilities, cache
                    )
                    said.append(confine.made)
            resolv_conf = rootfs.host_resolv_conf()
            chunks = []
            while chunk := os.read(go_r, 4096):
                chunks.append(chunk)
            os.close(go_r)
            if not chunks:
                os._exit(1)  # the monitor gave up on us
            order = json.loads(b"".join(chunks))
            lease = order["lease"]
            if lease:
                from minifs.container import network

                with t.step("eth0") as said:
                    network.configure_inside(network.Lease(**lease))
                    said.append(
                        f"ip link set dev lo up; ip link set {lease['peer']} name eth0 up; "
                        f"ip addr add {lease['ip']}/{lease['prefix']} dev eth0; "
                        f"ip route add default via {lease['gateway']}"
                    )
            with t.step("mount") as said:
                mounts = [Mount(m["type"], m["source"], tuple(m["options"]), m["target"])
                          for m in order["mounts"]]  # fmt: skip
                said.append(rootfs.mount_clone(mounts, c.rootfs))
            with t.step("pivot_root") as said:
                said.append(rootfs.pivot_root(c.rootfs))
            with t.step("mount proc") as said:
                said.append(rootfs.mount_proc())
            with t.step("umount old") as said:
                said.append(rootfs.drop_old_root())
            sec = self.security
            with t.step("mount dev") as said:
                said.append(rootfs.mount_dev())
                said.append(rootfs.mount_sys_writable() if sec.privileged else rootfs.mount_sys())
            if not sec.privileged:
                with t.step("mask /proc") as said:
                    said.append(rootfs.read_only_paths(sec.read_only_paths))
                    said.append(rootfs.mask_paths(sec.masked_paths))
            with t.step("hostname") as said:
                said.append(rootfs.set_hostname(c.hostname))
                said.append(rootfs.write_etc(c.hostname, lease and lease["ip"], resolv_conf))
            command, env = order["command"], order["env"]
            os.makedirs(order["workdir"], exist_ok=True)
            if sec.tmpfs:
                with t.step("tmpfs") as said:
                    said.append(rootfs.mount_tmpfs(sec.tmpfs))
            if sec.read_only:
                with t.step("read-only") as said:
                    said.append(rootfs.read_only_root())
            os.chdir(order["workdir"])
            path = which(command[0], env.get("PATH", DEFAULT_PATH))
            user = resolve_user(sec.user) if sec.user is not None else None
            close_fds_but(err_w, t.fd)
            reset_signals()
            confine_and_exec(sec, user, confine, t, path, command, env)
        except BaseException as exc:
            report(err_w, exc)
        os._exit(127)

    # -- waiting ---------------------------------------------------------------------

    def forward_signals(self) -> dict[int, object]:
        """From now on signals to the monitor go to PID 1 (kept for it until it
        exists); returns the handlers to restore."""
        return {sig: signal.signal(sig, self._forward) for sig in FORWARDED}

    def _forward(self, sig: int, _frame: object) -> None:
        """Pass a signal on to PID 1. Like docker, a PID 1 without a handler
        ignores SIGINT and SIGTERM; the third Ctrl-C kills it for good."""
        if self.pid1 is None:
            self._pending.append(sig)
            return
        if sig == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts >= 3:
                sig = signal.SIGKILL
        if self.container.pid1_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, sig)

    def wait(self) -> int:
        _, status = os.waitpid(self.unshare_pid, 0)  # type: ignore[arg-type]
        self.unshare_pid = None
        return exit_code(status)


# -- the whole run ----------------------------------------------------------------


@contextlib.contextmanager
def _as_container_errors() -> Iterator[None]:
    """Whatever minifs refuses while creating a container is a 125."""
    try:
        yield
    except ContainerError:
        raise
    except MinifsError as exc:
        raise ContainerError(str(exc)) from None


class Notify:
    """The pipe to the `minifs run -d` that forked this monitor: one line,
    "started ID" or "error CODE TEXT", then closed (its fd number may be
    reused afterwards, so it is never written twice)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, line: str) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.fd, f"{line}\n".encode())
            os.close(self.fd)
            self.fd = -1


def run(spec: Spec, root: str | os.PathLike[str] | None, notify: Notify | None = None) -> int:
    """Run one container to its end; returns its exit code.

    With `notify` (a detached run), "started ID" is sent once the command
    runs, and stdout/stderr go to the container's log.
    """
    trace = Trace(spec.trace, os.dup(2))
    try:
        with _as_container_errors():
            spec.check()
            container = create(spec, root)
        return _start_and_wait(Launch(container, spec, trace), root, notify)
    finally:
        trace.close()


def _start_and_wait(
    launch: Launch, root: str | os.PathLike[str] | None, notify: Notify | None
) -> int:
    container = launch.container
    storage = None
    previous: dict[int, object] = {}
    try:
        try:
            with _as_container_errors():
                if notify is not None:
                    _to_log(container.log_path)
                launch.fork()
                storage = open_storage(launch.spec, root, launch.trace)
                # From here a signal is the container's: PID 1 is made next.
                previous = launch.forward_signals()
                launch.unshare()
                clone(storage, launch.spec, container, launch.trace)
                launch.go(storage.mounts(container.clone))  # type: ignore[arg-type]
        except BaseException:
            launch.abort()
            finish(container, storage, keep_clone=False)
            raise
        return _wait(launch, storage, notify)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        if storage is not None:
            storage.close()


def _wait(launch: Launch, storage: Storage, notify: Notify | None) -> int:
    """From the command's start to its end, and the cleanup after it."""
    container = launch.container
    launch.trace.close()
    if notify is not None:
        notify.send(f"started {container.id}")
    code = 137
    try:
        code = launch.wait()
    finally:
        if launch.unshare_pid is not None:  # interrupted while waiting
            reaped = launch._reap()
            code = code if reaped is None else reaped
        _record_exit(container, launch.cgroup, code)
        container.status = records.EXITED
        finish(container, storage, keep_clone=not container.remove)
    if container.oom_killed and notify is None:
        limit = launch.spec.limits.memory or 0
        print(
            f"minifs: container {container.name} was OOM-killed (memory limit {limit / 2**20:g}M)",
            file=sys.stderr,
        )
    return code


def _record_exit(container: Container, cgroup: Cgroup | None, code: int) -> None:
    """Save the exit code the moment the command is reaped, before the cleanup.

    Once this monitor is gone, any concurrent `reclaim` (every stop, ps and
    run calls one) takes a record that does not say exited for a container
    whose monitor died; it keeps the code it finds here instead of guessing.
    The status stays running until `finish` has removed the cgroup and lease,
    so that exited still means nothing is left to clean up.
    """
    container.oom_killed = bool(cgroup and cgroup.oom_kills())
    container.exit_code, container.finished = code, time.time()
    container.save()


def _to_log(path: Path) -> None:
    """Point stdout and stderr (inherited by the container) at its log file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def run_detached(spec: Spec, root: str | os.PathLike[str] | None) -> str:
    """`minifs run -d`: fork a monitor that runs the container in its own
    session and logs to a file; return the container id once it runs."""
    notify_r, notify_w = os.pipe()
    notify = Notify(notify_w)
    sys.stdout.flush()
    sys.stderr.flush()
    monitor = os.fork()
    if monitor == 0:
        os.close(notify_r)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)  # the caller may be reading our stdout to its end
        os.close(null)
        code = 125
        try:
            code = run(spec, root, notify)
        except MinifsError as exc:
            notify.send(f"error {exc.exit_code} {exc}")
        except BaseException as exc:
            notify.send(f"error 125 {type(exc).__name__}: {exc}")
        os._exit(code & 0xFF)
    os.close(notify_w)
    with os.fdopen(notify_r, "rb") as f:
        answer = f.read().decode(errors="replace").strip()
    word, _, rest = answer.partition(" ")
    if word == "started":
        return rest
    raise reported(rest.encode(), "the container monitor died before the container started")
