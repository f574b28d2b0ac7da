"""What a container holds outside its processes: its record, its clone, its
cgroup and its address. Made before the start, in an order that lets a crash
at any point be undone (each is named in the record before it exists), and
removed after the end by the monitor or, if the monitor died, by `reclaim`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from minifs.container import ContainerError, records
from minifs.container.cgroups import Cgroup
from minifs.container.process import DEFAULT_PATH
from minifs.container.records import Container
from minifs.container.spec import Spec, check_size
from minifs.container.trace import Trace
from minifs.errors import NotFound
from minifs.resources import process_start_time

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from minifs.storage import Storage

CONTAINER_LABEL = "minifs.container"
"""Set on a container's clone; its value is the container id."""
BUSYBOX_REFS = ("busybox", "busybox:latest")
KILLED = 128 + signal.SIGKILL
"""The exit code of a container whose PID 1 was SIGKILLed, as docker reports it."""


def _resolve_image(storage: Storage, ref: str) -> tuple[str, dict]:
    """(layer name on this driver, image config) for an image or layer ref;
    the built-in busybox image is built on first use, as docker pulls."""
    from minifs.images import ensure_busybox, resolve_image

    try:
        return resolve_image(storage, ref)
    except NotFound:
        if ref not in BUSYBOX_REFS:
            raise
        ensure_busybox(storage.state.root)
        return resolve_image(storage, ref)


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


def open_storage(spec: Spec, root: str | os.PathLike[str] | None, trace: Trace) -> Storage:
    """The store and driver, with the backend up and dead containers reclaimed
    (one may hold the name or an address). Opened while the unshare process
    joins the cgroup, and up before it unshares: the container's mount
    namespace is a copy of the host's taken at unshare, so a mount the backend
    made later (a loop-backed store, a daemon's) would be missing in it."""
    from minifs import failpoints
    from minifs.storage import Storage

    failpoints.hit("run:storage")  # the unshare process is forked, PID 1 not yet
    with trace.step("storage") as said:
        storage = Storage(spec.driver, root)
        try:
            with storage.changing():
                said.extend(reclaim(storage.state.root))
        except BaseException:
            storage.close()
            raise
        said.append(f"{storage.name} up in {storage.state.root}")
    return storage


def create(spec: Spec, root: str | os.PathLike[str] | None) -> Container:
    """The container's record, naming the cgroup and bridge it will get
    before either is made. Made before the storage is opened (the state
    dir's usability is checked by every command, the driver's name by
    `Spec.check`), so that the cgroup join overlaps the storage's start."""
    container = Container.new(
        root,
        image=spec.image,
        driver=spec.driver,
        limits={"memory": spec.limits.memory, "cpus": spec.limits.cpus, "pids": spec.limits.pids},
        net=spec.net,
        remove=spec.remove,
        detach=spec.detach,
        monitor_pid=os.getpid(),
        monitor_start=process_start_time(os.getpid()),
    )
    container.hostname = spec.hostname or container.id[:12]
    container.security = spec.security.to_record() if spec.security else None
    if spec.net == "bridge":
        from minifs.container import network

        container.bridge = network.Settings.from_env().bridge
        container.netns = network.netns_key()
    container.cgroup = Cgroup.plan(container.id).to_record()
    container.save()
    return container


def clone(storage: Storage, spec: Spec, container: Container, trace: Trace) -> None:
    """Resolve the image, take the name, and clone (the seed's `zfs clone`).

    The record names the clone before it is made: whatever a crash leaves is
    found by it, and only a clone labelled with this container's id is ever
    removed for it (see `_remove_clone`).
    """
    root = storage.state.root
    with trace.step("image") as said:
        layer, config = _resolve_image(storage, spec.image)
        said.append(f"{spec.image}: layer {layer[:19]} on {storage.name}")
    with storage.changing():
        name = spec.name
        if name is not None:
            taken = records.find(root, name)
            if taken is not None and taken.id != container.id and name in (taken.name, taken.id):
                raise ContainerError(
                    f"container name {name!r} is in use by {taken.id[:12]}; pick another name "
                    f"or remove it with 'minifs rm {name}'"
                )
            if storage.name_taken(name):
                raise ContainerError(
                    f"name {name!r} is taken by a snapshot on {storage.name}; pick another name"
                )
            container.name = name
        container.layer = layer
        container.command = _command(spec, config)
        container.workdir = spec.workdir or config.get("WorkingDir") or "/"
        container.env = _environment(spec, config, container.hostname)
        container.clone = container.name
        container.save()  # the name is this container's from here: others see the record
    with trace.step("clone") as said:  # the state dir's lock only for the store's own steps
        size = check_size(spec.size, storage.name) if spec.size is not None else None
        storage.clone(container.name, layer, {CONTAINER_LABEL: container.id}, size)
        said.append(f"{storage.name}: clone {layer[:19]} {container.name}")


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
        _remove_clone(container, storage)
    container.delete()


def _remove_clone(container: Container, storage: Storage | None) -> None:
    """Remove the container's clone, if it was made and is still its own: the
    record names the clone before it exists, and the name may have been taken
    by a snapshot of someone else's since."""
    from minifs.storage import Storage

    own = storage is None
    storage = storage or Storage(container.driver, container.root)
    try:
        with storage.changing():
            try:
                info = storage.stat(container.clone)  # type: ignore[arg-type]
            except NotFound:
                return
            if info.labels.get(CONTAINER_LABEL) == container.id:
                storage.remove(info.name)
    finally:
        if own:
            storage.close()


def wait_gone(pid: int, start: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while records.alive(pid, start):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def reclaim(root: str | os.PathLike[str] | None) -> list[str]:
    """Finish containers whose monitor died; returns what was done."""
    done = []
    for listed in records.all_containers(root):
        c = _orphan(listed)
        if c is None:
            continue
        if c.pid1_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGKILL)  # type: ignore[arg-type]
            wait_gone(c.pid, c.pid_start, 5.0)  # type: ignore[arg-type]
        started = c.status == records.RUNNING
        if started and c.exit_code is None:
            # The monitor died before its command did: its death SIGKILLed the
            # unshare process and so PID 1 (parent-death signals), or we just did.
            c.exit_code = KILLED
        c.status, c.error = records.EXITED, "its monitor died"
        c.finished = c.finished or time.time()
        finish(c, None, keep_clone=started and not c.remove)
        done.append(f"reclaimed container {c.name} ({c.id[:12]})")
    return done


def _orphan(listed: Container) -> Container | None:
    """The record its monitor left, if that monitor died before recording the
    end; else None.

    `listed` is no proof: it was read before the monitor was looked at, and a
    monitor that ends normally saves the exit code, cleans up and saves the
    end just before it exits. Only a record read once the monitor is seen
    dead is its last word; finishing from `listed` would overwrite a code
    saved meanwhile with none (concurrent stops did just that).
    """
    if listed.status == records.EXITED or listed.monitor_alive():
        return None
    c = records.load(listed.dir)
    if c is None or c.status == records.EXITED:
        return None
    return c
