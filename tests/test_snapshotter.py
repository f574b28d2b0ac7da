"""The containerd proxy snapshotter, against a real containerd.

Each end-to-end test starts `minifs snapshotter` and Debian's containerd on
private sockets, root and state dirs under the test's temp dir: containerd in
its own mount namespace with a tmpfs on /run (the shims' sockets and runc's
state go there, not into the host's /run/containerd), seeing the test dir as
a slave of the host's, so what minifs mounts there later (a loop image,
zfs-fuse datasets) reaches containerd too. Both are stopped by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from minifs import linux
from minifs.errors import BackendError, InvalidArgument, TooManyLayers
from minifs.model import Mount
from minifs.snapshotter import filters
from minifs.snapshotter.records import to_containerd
from tests import leaks
from tests.conftest import MINIFS, bring_down_all, driver_params, refused
from tests.corpus import member, oci_layout, tar_bytes

MS_SHARED = 1 << 20
CONTAINERD = shutil.which("containerd")
needs_containerd = pytest.mark.skipif(
    CONTAINERD is None or shutil.which("ctr") is None,
    reason="containerd is not installed; run 'make setup'",
)
IMAGE = "minifs.test/busybox:1"


# -- the processes -------------------------------------------------------------


def _wait_for_socket(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}: {log.read_text()}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear in {timeout}s: {log.read_text()}")


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    """Stop one process we started, by its pid."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Snapshotter:
    """`minifs snapshotter` on a socket under `where`, serving `driver` in `root`."""

    def __init__(self, where: Path, root: Path, driver: str, options: dict[str, str]) -> None:
        self.socket = where / "snap.sock"
        self.log = where / "snapshotter.log"
        self.root = root
        opts = [f"--storage-opt={driver}.{k}={v}" for k, v in options.items()]
        self.proc = subprocess.Popen(
            [MINIFS, "--root", str(root), *opts, "snapshotter", "--driver", driver,
             "--address", str(self.socket)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "w"),  # noqa: SIM115 - the child holds it
            env={**os.environ, "MINIFS_OWNER": str(where / "snapshotter")},
        )  # fmt: skip
        _wait_for_socket(self.socket, self.proc, self.log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        status = _stop(self.proc, sig)
        log = self.log.read_text()
        assert status == 0, log
        assert "Traceback" not in log, log
        assert not self.socket.exists(), "the socket outlived its server"

    def names(self) -> list[str]:
        """The minifs names of what containerd made, read by the CLI beside the server."""
        done = subprocess.run(
            [MINIFS, "--root", str(self.root), "ls", "--json"],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        return [row["name"] for row in json.loads(done.stdout) if row["name"].startswith("ctrd-")]


CONFIG = """\
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{d}/c.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 1
  schedule_delay = "0ms"
  startup_delay = "0ms"
[proxy_plugins.minifs]
  type = "snapshot"
  address = "{socket}"
"""


class Containerd:
    """A private containerd whose `minifs` proxy plugin is `snapshotter`."""

    def __init__(self, where: Path, snapshotter: Snapshotter, cgroup_parent: str) -> None:
        self.dir = where
        self.cgroup_parent = cgroup_parent
        where.mkdir()
        (where / "fifo").mkdir()
        config = where / "config.toml"
        config.write_text(CONFIG.format(d=where, socket=snapshotter.socket))
        self.address = where / "c.sock"
        self.log = where / "containerd.log"
        script = f'mount -t tmpfs tmpfs /run && exec {CONTAINERD} --config "$1"'
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script, "sh", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "w"),  # noqa: SIM115 - the child holds it
            env={**os.environ, "MINIFS_OWNER": str(where)},  # its shims inherit it
        )
        _wait_for_socket(self.address, self.proc, self.log)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["ctr", "--address", str(self.address), *args],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)}: {done.stderr}")
        return done

    def run(self, image: str, cid: str, *command: str) -> subprocess.CompletedProcess:
        return self.ctr(
            "run", "--rm", "--snapshotter", "minifs", "--fifo-dir", str(self.dir / "fifo"),
            "--cgroup", f"/{self.cgroup_parent}/{cid}", image, cid, *command,
        )  # fmt: skip

    def stop(self) -> None:
        _stop(self.proc)
        # runc leaves the parent of the containers' cgroups; only empty ones go.
        for parent in Path("/sys/fs/cgroup").glob(f"*/{self.cgroup_parent}"):
            with contextlib.suppress(OSError):
                parent.rmdir()


@pytest.fixture
def private_tree(tmp_path: Path) -> Iterator[Path]:
    """A shared bind mount of a scratch dir: what is mounted below it later
    shows in containerd's slave mount namespace too."""
    tree = tmp_path / "t"
    tree.mkdir()
    linux.mount(str(tree), tree, None, linux.MS_BIND)
    linux.mount("none", tree, None, MS_SHARED)
    yield tree
    linux.umount(tree, linux.MNT_DETACH)


@pytest.fixture
def stack(
    private_tree: Path, scope: Path, backend_options: Callable[[str], dict[str, str]]
) -> Iterator[Callable[[str], tuple[Snapshotter, Containerd]]]:
    """`stack(driver)`: a snapshotter on `driver` and a containerd using it;
    both stopped by pid at teardown, the snapshotter's backend taken down."""
    made: list[tuple[Snapshotter, Containerd]] = []

    def start(driver: str) -> tuple[Snapshotter, Containerd]:
        root = private_tree / "state"
        snap = Snapshotter(private_tree, root, driver, backend_options(driver))
        try:
            ctrd = Containerd(private_tree / "c", snap, leaks.cgroup_parent(scope))
        except BaseException:
            snap.stop()
            raise
        made.append((snap, ctrd))
        return snap, ctrd

    yield start
    for snap, ctrd in made:
        ctrd.stop()
        snap.stop()
        bring_down_all(snap.root)


def _busybox_archive(where: Path) -> Path:
    """An OCI archive of two layers: the host's static busybox, then a file."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        pytest.skip("busybox-static is not installed; run 'make setup'")
    base = tar_bytes(
        [
            member("bin", "dir"),
            member("bin/busybox", data=busybox.read_bytes(), mode=0o755),
            *(member(f"bin/{a}", "symlink", linkname="busybox") for a in ("sh", "echo", "cat")),
            *(member(d, "dir") for d in ("dev", "etc", "proc", "sys", "tmp")),
        ]
    )
    top = tar_bytes([member("hello", data=b"from layer two\n")])
    archive = where / "busybox.tar"
    archive.write_bytes(tar_bytes(oci_layout([base, top], ref=IMAGE)))
    return archive


def _gone(snap: Snapshotter, timeout: float = 30) -> list[str]:
    """What containerd's garbage collector left of its snapshots after `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := snap.names()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


E2E_DRIVERS = driver_params()


# -- end to end --------------------------------------------------------------------


def _session(ctrd: Containerd, snapshotter: str) -> list[tuple[int, str]]:
    """One `ctr snapshots` session; (exit status, output or the class of the
    error) per step, to compare across snapshotters."""
    s = ("snapshots", "--snapshotter", snapshotter)
    steps = [
        (*s, "prepare", "base", ""),
        (*s, "commit", "layer one", "base"),  # a space in a name, as containerd allows
        (*s, "prepare", "work:1", "layer one"),
        (*s, "view", "look", "layer one"),
        # ctr gives views no gc.root label: without one containerd's collector
        # drops the view's record but not its parent's link to it (1.6, the
        # same with overlayfs), and the parent can then never be removed.
        (*s, "label", "look", "containerd.io/gc.root=test"),
        (*s, "prepare", "work:1", "layer one"),  # AlreadyExists
        (*s, "prepare", "orphan", "no such layer"),  # NotFound
        (*s, "commit", "again", "look"),  # FailedPrecondition: a view
        (*s, "rm", "layer one"),  # FailedPrecondition: children
        (*s, "rm", "nothing"),  # NotFound
        (*s, "label", "work:1", "team=storage"),
        (*s, "ls"),
        (*s, "tree"),
    ]
    out = []
    for step in steps:
        done = ctrd.ctr(*[a for a in step if a], check=False)
        if done.returncode:  # containerd's error class: "not found", "failed precondition"
            out.append((done.returncode, done.stderr.rstrip().rsplit(": ", 1)[-1]))
        elif "label" in step:  # in Go's random map order, gc.root holding the time
            labels = re.sub(r"gc\.root=[^,]*", "gc.root=T", done.stdout.strip())
            out.append((0, ",".join(sorted(labels.split(",")))))
        else:
            out.append((0, done.stdout))
    info = json.loads(ctrd.ctr(*s, "info", "work:1").stdout)
    out.append((0, f"{info['Kind']} {info['Name']} {info['Parent']} {info['Labels']['team']}"))
    usage = ctrd.ctr(*s, "usage").stdout.split("\n", 1)[1]
    out.append((0, " ".join(sorted(line.split()[0] for line in usage.splitlines()))))
    mounts = ctrd.ctr(*s, "mounts", "/mnt", "work:1").stdout
    out.append((0, mounts.split()[0] if mounts.startswith("mount -t ") else mounts))
    return out


def _clean(ctrd: Containerd, snapshotter: str) -> None:
    for key in ("work:1", "look", "layer one"):
        ctrd.ctr("snapshots", "--snapshotter", snapshotter, "rm", key)


@needs_containerd
@pytest.mark.parametrize("driver", E2E_DRIVERS)
def test_ctr_snapshots_behave_as_with_overlayfs(stack, driver):
    snap, ctrd = stack(driver)
    assert "minifs" in ctrd.ctr("plugins", "ls").stdout
    ours, theirs = _session(ctrd, "minifs"), _session(ctrd, "overlayfs")
    _clean(ctrd, "minifs")
    _clean(ctrd, "overlayfs")
    assert ours == theirs
    assert [code for code, _ in ours[5:10]] == [1] * 5  # the refusals were refusals
    assert _gone(snap) == [], "containerd's garbage collector left snapshots in minifs"


@needs_containerd
@pytest.mark.parametrize("driver", E2E_DRIVERS)
def test_image_import_run_and_garbage_collection(stack, driver, tmp_path):
    snap, ctrd = stack(driver)
    archive = _busybox_archive(tmp_path)
    ctrd.ctr("images", "import", "--snapshotter", "minifs", str(archive))
    keys = ctrd.ctr("snapshots", "--snapshotter", "minifs", "ls").stdout
    assert keys.count("Committed") == 2, keys  # one snapshot per layer, chained
    assert len(snap.names()) == 2
    done = ctrd.run(IMAGE, "c1", "sh", "-c", "echo ok; cat /hello")
    assert done.stdout == "ok\nfrom layer two\n", done.stderr
    ctrd.ctr("images", "rm", "--sync", IMAGE)
    assert _gone(snap) == [], "containerd's garbage collector left snapshots in minifs"


# -- the server on its own ------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Snapshotter]:
    snap = Snapshotter(tmp_path, tmp_path / "state", "vfs", {})
    yield snap
    snap.stop()
    bring_down_all(snap.root)


@pytest.fixture
def client(server: Snapshotter) -> Iterator[tuple[object, object]]:
    import grpc

    from minifs.snapshotter.api import snapshots_pb2, snapshots_pb2_grpc

    with grpc.insecure_channel(f"unix:{server.socket}") as channel:
        yield snapshots_pb2_grpc.SnapshotsStub(channel), snapshots_pb2


def _code(call: Callable[[], object]) -> str:
    import grpc

    try:
        call()
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def test_calls_map_to_containerd_codes(client, server):
    stub, pb = client

    def prepare(key: str, parent: str = "", **labels: str) -> object:
        return stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels))

    mounts = prepare("ns/1/base", **{"containerd.io/snapshot.ref": "x"}).mounts
    assert [m.type for m in mounts] == ["bind"]
    stub.Commit(pb.CommitSnapshotRequest(name="ns/2/layer", key="ns/1/base", labels={"a": "1"}))
    layer = stub.Stat(pb.StatSnapshotRequest(key="ns/2/layer")).info
    assert (layer.kind, dict(layer.labels)) == (pb.COMMITTED, {"a": "1"})
    prepare("ns/3/child x:y", "ns/2/layer")
    stub.View(pb.ViewSnapshotRequest(key="ns/4/view", parent="ns/2/layer"))
    prepare("../../etc/passwd")  # a key is a name, never a path
    assert not (server.root / "etc").exists()
    cases = {
        "NOT_FOUND": [
            lambda: stub.Stat(pb.StatSnapshotRequest(key="ns/9/none")),
            lambda: prepare("ns/5/x", "ns/9/none"),
            lambda: stub.Remove(pb.RemoveSnapshotRequest(key="../../etc/passwd\n")),
        ],
        "ALREADY_EXISTS": [lambda: prepare("ns/3/child x:y", "ns/2/layer")],
        "INVALID_ARGUMENT": [
            lambda: prepare("ns/6/\0nul"),
            lambda: prepare("k" * 10_000),
            lambda: prepare("ns/7/x", "ns/3/child x:y"),  # parent not committed
            lambda: prepare("ns/7/x", **{"minifs.containerd.key": "forged"}),
            lambda: stub.Update(
                pb.UpdateSnapshotRequest(
                    info=pb.Info(name="ns/2/layer", parent="other"),
                    update_mask={"paths": ["parent"]},
                )
            ),
            lambda: list(stub.List(pb.ListSnapshotsRequest(filters=["kind=="]))),
        ],
        "FAILED_PRECONDITION": [
            lambda: stub.Remove(pb.RemoveSnapshotRequest(key="ns/2/layer")),
            lambda: stub.Commit(pb.CommitSnapshotRequest(name="ns/8/c", key="ns/4/view")),
            lambda: stub.Mounts(pb.MountsRequest(key="ns/2/layer")),
        ],
    }
    for code, calls in cases.items():
        assert [_code(c) for c in calls] == [code] * len(calls)
    # Update with a field mask: one label set, another left, then all replaced.
    stub.Update(
        pb.UpdateSnapshotRequest(
            info=pb.Info(name="ns/2/layer", labels={"b": "2", "a": "ignored"}),
            update_mask={"paths": ["labels.b"]},
        )
    )
    assert dict(stub.Stat(pb.StatSnapshotRequest(key="ns/2/layer")).info.labels) == {
        "a": "1",
        "b": "2",
    }
    info = stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="ns/2/layer", labels={"c": "3"})))
    assert dict(info.info.labels) == {"c": "3"}

    def listed(*wanted: str) -> list[str]:
        replies = stub.List(pb.ListSnapshotsRequest(filters=list(wanted)))
        return sorted(i.name for r in replies for i in r.info)

    assert len(listed()) == 4
    assert listed("kind==committed") == ["ns/2/layer"]
    assert listed('labels."c"==3', "kind==view") == ["ns/2/layer", "ns/4/view"]
    assert listed("kind==active,parent==ns/2/layer") == ["ns/3/child x:y"]
    assert listed("name~=/^ns\\/[34]/,kind!=view") == ["ns/3/child x:y"]
    used = stub.Usage(pb.UsageRequest(key="ns/2/layer"))
    assert used.inodes == 1
    stub.Cleanup(pb.CleanupRequest())
    # The server took all of that and still answers; each refusal is one log line.
    assert stub.Stat(pb.StatSnapshotRequest(key="ns/2/layer")).info.name == "ns/2/layer"
    log = server.log.read_text()
    assert "Traceback" not in log
    assert sum(1 for line in log.splitlines() if ": NOT_FOUND: " in line) == 3


def test_a_client_gone_mid_list_holds_nobody(client, server):
    stub, pb = client
    for n in range(150):  # two List messages
        stub.Prepare(pb.PrepareSnapshotRequest(key=f"ns/{n}/k"))
    stream = stub.List(pb.ListSnapshotsRequest())
    assert len(next(stream).info) == 100
    stream.cancel()
    answered = threading.Event()

    def stat() -> None:
        stub.Stat(pb.StatSnapshotRequest(key="ns/149/k"), timeout=30)
        answered.set()

    worker = threading.Thread(target=stat)
    worker.start()
    worker.join(timeout=35)
    assert answered.is_set()


def test_socket_in_the_way_is_refused_and_a_stale_one_replaced(server, tmp_path, tmpfs, cli):
    root = tmp_path / "other-state"
    base = ["--root", str(root), "snapshotter", "--driver", "vfs", "--address"]
    refused(cli(*base, str(tmp_path / "missing" / "s.sock")), "does not exist", "mkdir")
    readonly = tmpfs("ro", "ro,size=1M")
    refused(cli(*base, str(readonly / "s.sock")), "not writable")
    refused(cli(*base, str(server.socket)), "live process", f"pid {server.proc.pid}")
    (tmp_path / "file").write_text("mine")
    refused(cli(*base, str(tmp_path / "file")), "not a socket")
    assert (tmp_path / "file").read_text() == "mine"
    assert not root.exists(), "a refused start made its state dir"
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))  # bound, never listening: what a killed server leaves
    second = Snapshotter.__new__(Snapshotter)
    second.socket, second.log, second.root = stale, tmp_path / "second.log", root
    second.proc = subprocess.Popen(
        [MINIFS, *base, str(stale)],
        stderr=open(second.log, "w"),  # noqa: SIM115 - the child holds it
        env={**os.environ, "MINIFS_OWNER": str(tmp_path / "second")},
    )
    try:
        _wait_for_socket(stale, second.proc, second.log)
    finally:
        second.stop(signal.SIGINT)
    assert "removed the stale socket" in second.log.read_text()


# -- the parts ----------------------------------------------------------------------


def test_filters_follow_containerd_grammar():
    info = {"kind": "committed", "name": "default/3/sha256:ab", "parent": ""}
    labels = {"containerd.io/snapshot.ref": "sha256:ab", "a.b": "1"}

    def fields(path: list[str]) -> tuple[str, bool]:
        if path[0] == "labels":
            value = labels.get(".".join(path[1:]))
            return value or "", value is not None
        return info.get(path[0], ""), path[0] in info

    def match(*wanted: str) -> bool:
        return filters.matches(filters.parse(wanted), fields)

    assert match()
    assert match("")
    assert match('labels."containerd.io/snapshot.ref"==sha256:ab')
    assert match("labels.a.b==1,kind==committed")
    assert not match("labels.a.b==1,kind==active")
    assert match("kind==active", "name==default/3/sha256:ab")
    assert match("labels.a.b", "kind==view") and not match("labels.zz")
    assert match("parent!=x") and match('name~="^default/[0-9]+/"') and match("name~=|ab$|")
    assert match('name=="default/3/sha256:\\x61b"')
    for bad in ("kind=", "kind==", "kind=~x", ",kind==x", 'labels."open==1', "name==/x/", "k~=("):
        with pytest.raises(InvalidArgument):
            filters.parse([bad])


def test_records_containerd_cannot_mount_are_refused():
    bind = Mount("bind", "/d", ("rbind", "ro"))
    assert to_containerd([bind]) == [("bind", "/d", ["rbind", "ro"])]
    lowers = [f"/var/lib/minifs/drivers/overlay2/l/{n:026d}" for n in range(100)]
    overlay = Mount("overlay", "overlay", (f"lowerdir={':'.join(lowers)}", "upperdir=/u"))
    assert to_containerd([overlay])  # compacted by containerd to fit a page
    with pytest.raises(TooManyLayers, match="fewer layers"):
        to_containerd([Mount("overlay", "overlay", (f"lowerdir={':'.join(lowers * 2)}",))])
    with pytest.raises(BackendError, match="root"):
        to_containerd([bind, Mount("bind", "/e", ("rbind",), target="sub")])


def test_help_does_not_load_grpc():
    """grpc costs a few hundred milliseconds to import: only the command loads it."""
    code = (
        "import sys; from minifs.cli import build_parser; build_parser(); "
        "build_parser('snapshotter'); print(sorted(m for m in sys.modules if 'grpc' in m))"
    )
    done = subprocess.run(
        [str(Path(MINIFS).with_name("python")), "-c", code],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert done.stdout.strip() == "[]"
