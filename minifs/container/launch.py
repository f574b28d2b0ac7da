"""`minifs run`: the seed's walkthrough as a sequence of small, named steps.

Three processes, as in the seed's `ps` output (bash, unshare, bash):

- the *monitor* (minifs run itself, or its detached copy with `-d`) clones the
  image's layer, makes the cgroup, plugs the veth, forwards signals, waits,
  and removes everything when the container ends;
- the *unshare process* joins the cgroup, calls unshare(2) for mount, uts,
  ipc, net, pid and cgroup namespaces, forks once and relays the exit status;
- *PID 1*: the unshare process is not itself in the pid namespace it made
  (the seed's `--fork` lesson: without the fork there is no PID 1 and the next
  fork fails with ENOMEM), its child is. PID 1 configures eth0, mounts the
  clone, pivot_roots into it, mounts /proc, /dev and /sys, sets the hostname
  and execs the command.

Each process dies with its parent (PR_SET_PDEATHSIG), so a killed monitor takes
the namespaces (mounts, veth) down with it; what outlives it (cgroup, clone,
lease) is named in the container's record and reclaimed by the next minifs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from minifs import linux
from minifs.container import ContainerError, records, rootfs
from minifs.container.cgroups import Cgroup
from minifs.container.records import Container
from minifs.container.spec import Spec
from minifs.errors import MinifsError, NotFound
from minifs.model import Mount
from minifs.resources import process_start_time
from minifs.storage import Storage

NAMESPACES = (
    ("mount", linux.CLONE_NEWNS),
    ("uts", linux.CLONE_NEWUTS),
    ("ipc", linux.CLONE_NEWIPC),
    ("net", linux.CLONE_NEWNET),
    ("pid", linux.CLONE_NEWPID),
    ("cgroup", linux.CLONE_NEWCGROUP),
)
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
CONTAINER_LABEL = "minifs.container"
"""Set on a container's clone; its value is the container id."""
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUSYBOX_REFS = ("busybox", "busybox:latest")


class Trace:
    """`--trace`: one line per step with its duration, written straight to a
    file descriptor so the three processes never interleave half lines."""

    def __init__(self, enabled: bool, fd: int) -> None:
        self.enabled = enabled
        self.fd = fd
        self.start = time.perf_counter()

    def say(self, step: str, since: float, detail: str) -> None:
        if self.enabled and self.fd >= 0:
            ms = (time.perf_counter() - since) * 1000
            line = f"minifs trace  {step:<12} {ms:8.2f} ms  {detail}\n"
            with contextlib.suppress(OSError):
                os.write(self.fd, line.encode())

    def close(self) -> None:
        """Stop tracing: a detached caller waits for its stderr to close."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @contextlib.contextmanager
    def step(self, step: str) -> Iterator[list[str]]:
        """`with trace.step("clone") as said: said.append(what was done)`."""
        since = time.perf_counter()
        said: list[str] = []
        yield said
        self.say(step, since, "; ".join(said))


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


# -- the monitor: before the fork ---------------------------------------------------


def _resolve_image(storage: Storage, ref: str) -> tuple[str, dict]:
    """(layer name on this driver, image config) for an image or layer ref;
    the built-in busybox image is built on first use, as docker pulls."""
    from minifs.images import ensure_busybox, image_config, resolve_layer

    root = storage.state.root
    try:
        layer = resolve_layer(storage, ref)
    except NotFound:
        if ref not in BUSYBOX_REFS:
            raise
        ensure_busybox(root)
        layer = resolve_layer(storage, ref)
    return layer, image_config(root, ref)


def _command(spec: Spec, config: dict) -> list[str]:
    """docker's rule: CMD given on the command line replaces the image's Cmd,
    and both follow the image's Entrypoint."""
    entrypoint = list(config.get("Entrypoint") or [])
    command = entrypoint + (spec.command or list(config.get("Cmd") or []))
    if not command:
        raise ContainerError(f"{spec.image} has no default command; give one after the image")
    return command


def _environment(spec: Spec, config: dict, hostname: str) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOSTNAME": hostname, "HOME": "/root"}
    for item in config.get("Env") or []:
        key, _, value = item.partition("=")
        env[key] = value
    env.update(spec.env)
    return env


def create(storage: Storage, spec: Spec, trace: Trace) -> Container:
    """The record and the clone (the seed's `zfs clone`), or nothing at all."""
    from minifs.container.manage import reclaim

    root = storage.state.root
    reclaim(root)  # a dead container may hold the name, an address or a cgroup
    layer, config = _resolve_image(storage, spec.image)
    with storage.changing():
        name = spec.name
        if name is not None:
            taken = records.find(root, name)
            if taken is not None and name in (taken.name, taken.id):
                raise ContainerError(
                    f"container name {name!r} is in use by {taken.id[:12]}; pick another name "
                    f"or remove it with 'minifs rm {name}'"
                )
            if storage.store.name_taken(storage.name, name):
                raise ContainerError(
                    f"name {name!r} is taken by a snapshot on {storage.name}; pick another name"
                )
        container = Container.new(
            root,
            **({"name": name} if name else {}),
            image=spec.image,
            driver=storage.name,
            command=_command(spec, config),
            layer=layer,
            workdir=spec.workdir or config.get("WorkingDir") or "/",
            limits={
                "memory": spec.limits.memory,
                "cpus": spec.limits.cpus,
                "pids": spec.limits.pids,
            },
            net=spec.net,
            remove=spec.remove,
            detach=spec.detach,
            monitor_pid=os.getpid(),
            monitor_start=process_start_time(os.getpid()),
        )
        container.hostname = spec.hostname or container.id[:12]
        container.env = _environment(spec, config, container.hostname)
        container.save()
        try:
            with trace.step("clone") as said:
                storage.clone(container.name, layer, {CONTAINER_LABEL: container.id})
                container.clone = container.name
                container.save()
                said.append(f"{storage.name}: clone {layer[:19]} {container.name}")
        except BaseException:
            container.delete()
            raise
    return container


# -- the three processes ------------------------------------------------------------


class Launch:
    """One start of one container; `start()` returns once the command runs."""

    def __init__(self, container: Container, storage: Storage, spec: Spec, trace: Trace) -> None:
        self.container = container
        self.storage = storage
        self.spec = spec
        self.trace = trace
        self.cgroup: Cgroup | None = None
        self.unshare_pid: int | None = None
        self.pid1: int | None = None
        self._interrupts = 0
        self._pending: list[int] = []

    def start(self) -> None:
        c = self.container
        with self.trace.step("cgroup") as said:
            self.cgroup = Cgroup.plan(c.id)
            c.cgroup = self.cgroup.to_record()
            c.save()
            said.extend(self.cgroup.create(self.spec.limits))
        if c.net == "bridge":
            from minifs.container import network  # with its pyroute2, only for a bridge

            with self.trace.step("netlink") as said:
                said.append(network.load())
        mounts = self.storage.mounts(c.clone)  # type: ignore[arg-type]
        resolv_conf = rootfs.host_resolv_conf()
        c.rootfs.mkdir(parents=True, exist_ok=True)
        pid_r, pid_w = os.pipe()
        go_r, go_w = os.pipe()
        err_r, err_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        since = time.perf_counter()
        child = os.fork()
        if child == 0:
            self.trace.say("fork", since, f"pid {os.getpid()}: the unshare process")
            os.close(pid_r)
            os.close(go_w)
            os.close(err_r)
            self._unshare_process(pid_w, go_r, err_w, mounts, resolv_conf)
        self.unshare_pid = child
        os.close(pid_w)
        os.close(go_r)
        os.close(err_w)
        try:
            self._plug_in(pid_r, go_w, err_r)
        finally:
            for fd in (pid_r, go_w, err_r):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _plug_in(self, pid_r: int, go_w: int, err_r: int) -> None:
        """Learn PID 1's host pid, give it its veth, let it go, and wait until
        it has exec'd (its error pipe closes) or says why it could not."""
        c = self.container
        with os.fdopen(pid_r, "rb", closefd=False) as f:
            line = f.readline()
        if not line:
            self._fail(err_r)
        self.pid1 = int(line)
        c.pid, c.pid_start = self.pid1, process_start_time(self.pid1)
        c.save()
        for sig in self._pending:  # sent to us before PID 1 existed
            self._forward(sig, None)
        lease = None
        if c.net == "bridge":
            from minifs.container import network

            with self.trace.step("veth") as said:
                lease = network.attach(c.root, c.id, c.name, self.pid1, self.spec.ip)
                c.ip, c.prefix, c.gateway = lease.ip, lease.prefix, lease.gateway
                c.bridge, c.netns, c.veth = lease.bridge, lease.netns, lease.veth
                c.save()
                said.append(
                    f"ip link add {lease.veth} type veth peer name {lease.peer}; "
                    f"ip link set {lease.peer} netns {self.pid1}; "
                    f"ip link set {lease.veth} master {lease.bridge} up"
                )
        os.write(go_w, json.dumps(dataclasses.asdict(lease) if lease else {}).encode())
        os.close(go_w)
        failure = os.read(err_r, 4096)
        if failure:
            self._fail(err_r, failure)
        c.status, c.started = records.RUNNING, time.time()
        c.save()
        self.trace.say("started", self.trace.start, f"{c.name} ({c.id[:12]}) runs {c.command[0]}")

    def _fail(self, err_r: int, said: bytes = b"") -> NoReturn:
        """The start failed: raise what the unshare process or PID 1 said."""
        chunks = [said]
        while chunk := os.read(err_r, 4096):
            chunks.append(chunk)
        text = b"".join(chunks).decode(errors="replace").strip()
        self._reap()
        raise ContainerError(text or "the container died before its command started")

    def _reap(self) -> int | None:
        """Kill PID 1 if it is still ours, and collect the unshare process."""
        if self.container.pid1_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGKILL)
        if self.unshare_pid is None:
            return None
        _, status = os.waitpid(self.unshare_pid, 0)
        self.unshare_pid = None
        return exit_code(status)

    # -- the unshare process ---------------------------------------------------------

    def _unshare_process(
        self, pid_w: int, go_r: int, err_w: int, mounts: list[Mount], resolv_conf: str
    ) -> NoReturn:
        try:
            for sig in FORWARDED:  # not the monitor's handler; PID 1 inherits these
                signal.signal(sig, signal.SIG_DFL)
            linux.set_parent_death_signal(signal.SIGKILL)
            with self.trace.step("cgroup") as said:
                self.cgroup.join(os.getpid())  # type: ignore[union-attr]
                said.append(f"echo {os.getpid()} > cgroup.procs (cgclassify)")
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
                self._pid1(go_r, err_w, mounts, resolv_conf)
            self.trace.say("fork", since, f"--fork: host pid {pid1} is PID 1 inside")
            with self.trace.step("cgroup") as said:
                said.append(self.cgroup.leave_pids(os.getpid(), self.spec.limits.pids))  # type: ignore[union-attr]
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

    def _pid1(self, go_r: int, err_w: int, mounts: list[Mount], resolv_conf: str) -> NoReturn:
        c = self.container
        t = self.trace
        try:
            linux.set_parent_death_signal(signal.SIGKILL)
            os.setsid()
            chunks = []
            while chunk := os.read(go_r, 4096):
                chunks.append(chunk)
            os.close(go_r)
            if not chunks:
                os._exit(1)  # the monitor gave up on us
            lease = json.loads(b"".join(chunks))
            if lease:
                from minifs.container import network

                with t.step("eth0") as said:
                    network.configure_inside(network.Lease(**lease))  # type: ignore[arg-type]
                    said.append(
                        f"ip link set dev lo up; ip link set {lease['peer']} name eth0 up; "
                        f"ip addr add {lease['ip']}/{lease['prefix']} dev eth0; "
                        f"ip route add default via {lease['gateway']}"
                    )
            with t.step("mount") as said:
                said.append(rootfs.make_private())
                said.append(rootfs.mount_clone(mounts, c.rootfs))
            with t.step("pivot_root") as said:
                said.append(rootfs.pivot_root(c.rootfs))
            with t.step("mount proc") as said:
                said.append(rootfs.mount_proc())
            with t.step("umount old") as said:
                said.append(rootfs.drop_old_root())
            with t.step("mount dev") as said:
                said.append(rootfs.mount_dev())
                said.append(rootfs.mount_sys())
            with t.step("hostname") as said:
                said.append(rootfs.set_hostname(c.hostname))
                said.append(rootfs.write_etc(c.hostname, lease.get("ip"), resolv_conf))
            os.makedirs(c.workdir, exist_ok=True)
            os.chdir(c.workdir)
            path = which(c.command[0], c.env.get("PATH", DEFAULT_PATH))
            close_fds_but(err_w, t.fd)
            reset_signals()
            t.say("exec", time.perf_counter(), f"exec {' '.join(c.command)}")
            os.execve(path, c.command, c.env)
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


def which(command: str, path: str) -> str:
    """The program to exec, looked up in the container's PATH after pivot_root."""
    candidates = [command] if "/" in command else [f"{d or '.'}/{command}" for d in path.split(":")]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise ContainerError(f"{command}: command not found in the image (PATH={path})")


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
    """One line for the monitor to raise as ContainerError."""
    if isinstance(exc, MinifsError):
        text = str(exc)
    elif isinstance(exc, OSError):
        text = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    else:
        text = f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(OSError):
        os.write(err_w, text.encode())


# -- the whole run ----------------------------------------------------------------


def finish(container: Container, storage: Storage | None, keep_clone: bool) -> None:
    """Remove the cgroup, the veth and lease, and (unless kept) the clone and
    record. Safe to repeat: a crash half-way is finished by the next reclaim."""
    cgroup = Cgroup.from_record(container.cgroup)
    if cgroup is not None:
        cgroup.remove()
    if container.bridge and container.netns:
        from minifs.container import network

        network.detach(container.id, container.bridge, container.netns)
    if keep_clone:
        container.save()
        return
    if container.clone is not None:
        own = storage is None
        storage = storage or Storage(container.driver, container.root)
        try:
            with contextlib.suppress(NotFound):
                storage.remove(container.clone)
        finally:
            if own:
                storage.close()
    container.delete()


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
            storage = Storage(spec.driver, root)
        with storage:
            with _as_container_errors():
                container = create(storage, spec, trace)
            launch = Launch(container, storage, spec, trace)
            previous = launch.forward_signals()
            try:
                return _start_and_wait(launch, notify)
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)  # type: ignore[arg-type]
    finally:
        trace.close()


def _start_and_wait(launch: Launch, notify: Notify | None) -> int:
    container, storage = launch.container, launch.storage
    try:
        with _as_container_errors():
            if notify is not None:
                _to_log(container.log_path)
            launch.start()
    except BaseException:
        launch._reap()
        finish(container, storage, keep_clone=False)
        raise
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
        cgroup = Cgroup.from_record(container.cgroup)
        container.oom_killed = bool(cgroup and cgroup.oom_kills())
        container.status, container.exit_code = records.EXITED, code
        container.finished = time.time()
        finish(container, storage, keep_clone=not container.remove)
    if container.oom_killed and notify is None:
        limit = launch.spec.limits.memory or 0
        print(
            f"minifs: container {container.name} was OOM-killed (memory limit {limit / 2**20:g}M)",
            file=sys.stderr,
        )
    return code


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
    code, _, text = rest.partition(" ")
    error = ContainerError(text or "the container monitor died before the container started")
    error.exit_code = int(code) if code.isdigit() else 125
    raise error
