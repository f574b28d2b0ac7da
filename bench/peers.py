"""The peer tools `minifs bench --cli` times minifs against, each made private.

Every peer works on the same busybox rootfs that minifs's own busybox image
unpacks to, and keeps all of its state under the bench's run dir: a runc
bundle and `runc --root`; a containerd with its own root, state, socket and
config; a dockerd with its own data root, exec root, socket and pid file, on
that containerd. Both daemons run in a private mount namespace with a tmpfs
on /run (dockerd also with a scratch dir bound over /etc/docker, where it
would write its key.json), so nothing of the host's is touched. They are
recorded in a `Resources` file under the run dir and stopped by pid (checked
against its start time) when the run dir is released, by the sweep after a
crash too. A peer that is missing or does not come up is left out with its
reason; the bench still times the rest.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
from pathlib import Path
from typing import NamedTuple

from minifs import linux
from minifs.errors import MinifsError, MissingPrerequisite
from minifs.resources import Resources, run

DAEMON_WAIT = 60.0
"""Seconds a daemon may take to answer on its socket (dockerd takes ~2 s here)."""
CTR_PARENT = "busybox"
"""The committed containerd snapshot holding the rootfs, parent of every prepare."""
DOCKER_IMAGE = "minifs-bench-busybox:latest"
RUNC_ID = f"minifs-bench-{os.getpid()}"
"""runc names the container's cgroups after its id: one per bench run."""

CONTAINERD_CONFIG = """\
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"""


class Peers(NamedTuple):
    """What the timed commands need: each peer's argv prefix, or None with
    the reason in `skipped`; the tools' versions for the results."""

    runc: list[str] | None
    ctr: list[str] | None
    docker: list[str] | None
    versions: dict[str, str]
    skipped: dict[str, str]


def set_up(workdir: Path, minifs: list[str]) -> Peers:
    """Make the rootfs and every peer that can run here, under `workdir/peers`.
    `minifs` is the minifs command with the bench's own `--root`."""
    where = workdir / "peers"
    resources = Resources(where / "daemons.run")
    rootfs = busybox_rootfs(minifs, where / "rootfs")
    versions: dict[str, str] = {}
    skipped: dict[str, str] = {}
    runc = ctr = docker = None
    containerd_socket = None
    try:
        runc_path = which("runc", "runc")
        versions["runc"] = version([runc_path, "--version"])
        bundle = runc_bundle(runc_path, rootfs, where / "runc-bundle")
        state = str(where / "runc-state")
        runc = [runc_path, "--root", state, "run", "--bundle", str(bundle), RUNC_ID]
    except MinifsError as exc:
        skipped["runc"] = str(exc)
    try:
        containerd = which("containerd", "containerd")
        ctr_path = which("ctr", "containerd")
        versions["containerd"] = version([containerd, "--version"])
        containerd_socket = start_containerd(resources, containerd, where / "containerd")
        ctr = [ctr_path, "--address", str(containerd_socket)]
        commit_parent(ctr, rootfs, where / "containerd")
    except MinifsError as exc:
        skipped["containerd"] = str(exc)
        ctr = None
    try:
        if containerd_socket is None:
            raise MissingPrerequisite("it runs on the private containerd, which did not start")
        dockerd = which("dockerd", "docker.io")
        versions["dockerd"] = version([dockerd, "--version"])
        client = docker_client(dockerd)
        versions["docker"] = version([client, "--version"])
        address = start_dockerd(resources, dockerd, containerd_socket, where / "docker")
        docker = [client, "--config", str(where / "docker" / "client"), "-H", f"unix://{address}"]
        run([*docker, "import", str(rootfs), DOCKER_IMAGE], "docker import")
    except MinifsError as exc:
        skipped["docker"] = str(exc)
        docker = None
    return Peers(runc, ctr, docker, versions, skipped)


def which(tool: str, package: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise MissingPrerequisite(f"{tool} is not installed (Debian package {package})")
    return found


def version(argv: list[str]) -> str:
    """The first line a tool prints about its version."""
    return run(argv, f"{argv[0]} version").strip().splitlines()[0]


def busybox_rootfs(minifs: list[str], where: Path) -> Path:
    """A tar of the tree `minifs clone --from busybox` gives (the image is
    built and unpacked on the default driver on the way)."""
    mnt = where / "mnt"
    mnt.mkdir(parents=True)
    tar = where / "rootfs.tar"

    def minifs_run(*args: str) -> None:
        run([*minifs, *args], f"minifs {' '.join(args)}")

    minifs_run("image", "busybox")
    minifs_run("clone", "bench-rootfs", "--from", "busybox")
    try:
        minifs_run("mount", "bench-rootfs", str(mnt))
        try:
            run(["tar", "-C", str(mnt), "-cf", str(tar), "."], "tar the busybox rootfs")
        finally:
            minifs_run("umount", str(mnt))
    finally:
        minifs_run("rm", "bench-rootfs")
    return tar


def runc_bundle(runc: str, rootfs: Path, where: Path) -> Path:
    """A bundle from `runc spec` that runs `true` without a terminal, in the
    namespaces `minifs run` makes (runc's default set plus cgroup) and on a
    writable root, as a minifs container's is."""
    (where / "rootfs").mkdir(parents=True)
    run(["tar", "-C", str(where / "rootfs"), "-xf", str(rootfs)], "unpack the runc rootfs")
    run([runc, "spec", "--bundle", str(where)], "runc spec")
    config = where / "config.json"
    spec = json.loads(config.read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["true"]
    spec["root"]["readonly"] = False
    spec["linux"]["namespaces"].append({"type": "cgroup"})
    config.write_text(json.dumps(spec, indent=1))
    return where


def _private(script: str) -> list[str]:
    """argv running `script`, which ends by exec'ing the daemon (so the pid
    stays the daemon's), in a private mount namespace with its own /run."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "slave",
        "sh",
        "-c",
        f"mount -t tmpfs tmpfs /run && {script}",
    ]


def _answers(path: Path) -> bool:
    """Whether a daemon accepts connections on the unix socket `path` yet."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def start_containerd(resources: Resources, containerd: str, where: Path) -> Path:
    """Start the private containerd; returns its socket."""
    where.mkdir(parents=True)
    config = where / "config.toml"
    config.write_text(CONTAINERD_CONFIG.format(d=where))
    address = where / "containerd.sock"
    resources.daemon(
        "containerd",
        _private(f"exec {shlex.quote(containerd)} --config {shlex.quote(str(config))}"),
        lambda: _answers(address),
        DAEMON_WAIT,
        where / "containerd.log",
    )
    return address


def commit_parent(ctr: list[str], rootfs: Path, where: Path) -> None:
    """Commit the rootfs as snapshot CTR_PARENT: prepare an active snapshot,
    mount it as `ctr snapshots mounts` says, unpack into it, commit it."""
    active = f"{CTR_PARENT}-unpacking"
    mnt = where / "mnt"
    mnt.mkdir()
    run([*ctr, "snapshots", "prepare", active], "ctr snapshots prepare")
    command = run([*ctr, "snapshots", "mounts", str(mnt), active], "ctr snapshots mounts")
    run(shlex.split(command.strip()), "mount the containerd snapshot")
    try:
        run(["tar", "-C", str(mnt), "-xf", str(rootfs)], "unpack into the containerd snapshot")
    finally:
        linux.umount(mnt)
    run([*ctr, "snapshots", "commit", CTR_PARENT, active], "ctr snapshots commit")


def docker_client(dockerd: str) -> str:
    """The docker client of dockerd's own package (/usr/sbin/dockerd ->
    /usr/bin/docker), not another one earlier on PATH."""
    beside = Path(dockerd).resolve().parent.parent / "bin" / "docker"
    return str(beside) if beside.is_file() else which("docker", "docker.io")


def start_dockerd(resources: Resources, dockerd: str, containerd: Path, where: Path) -> Path:
    """Start the private dockerd on the private containerd; returns its socket."""
    if not Path("/etc/docker").is_dir():
        raise MissingPrerequisite(
            "/etc/docker is missing (dockerd would make it and write its key.json there)"
        )
    etc = where / "etc"
    etc.mkdir(parents=True)
    address = where / "docker.sock"
    argv = [
        dockerd,
        "--data-root",
        str(where / "data"),
        "--exec-root",
        str(where / "exec"),
        "--pidfile",
        str(where / "dockerd.pid"),
        "-H",
        f"unix://{address}",
        "--containerd",
        str(containerd),
        "--storage-driver",
        "overlay2",
        "--bridge",
        "none",
        "--iptables=false",
        "--ip6tables=false",
    ]
    script = f"mount --bind {shlex.quote(str(etc))} /etc/docker && exec {shlex.join(argv)}"
    resources.daemon(
        "dockerd", _private(script), lambda: _answers(address), DAEMON_WAIT, where / "dockerd.log"
    )
    return address
