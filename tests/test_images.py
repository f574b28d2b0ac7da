"""Images end to end: real podman archives, the busybox image, sharing, removal.

Real archives come from podman (Debian's), built once per session from a
Containerfile that deletes files and recreates a directory, so its layers hold
real whiteouts and an opaque directory. Its `podman export` of the same image
is the reference the unpacked trees must equal. podman runs with private
--root/--runroot under the session's temp dir and is torn down before the
first test using it continues.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from minifs import linux
from minifs.images import ensure_busybox, resolve_image, resolve_layer
from minifs.images.catalog import LAYER_LABEL
from minifs.resources import owner_alive
from minifs.storage import TRANSIENT_LABEL
from tests import treeinfo
from tests.conftest import driver_params
from tests.corpus import gzip_bytes, member, tar_bytes, zstd_bytes

DRIVERS = driver_params()
AVAILABLE = [p.values[0] for p in DRIVERS if not p.marks]

CONTAINERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox --install -s /bin && \
mkdir -p /data/keep /data/drop /opq /etc && echo a > /data/drop/f && echo old > /opq/old && \
echo k > /data/keep/k && echo root:x:0:0::/:/bin/sh > /etc/passwd && mkfifo /data/fifo && \
ln /data/keep/k /data/keep/k2"]
RUN ["/bin/sh", "-c", "rm -rf /data/drop /opq && mkdir /opq && echo new > /opq/new && \
chmod 4711 /data/keep/k && chown 1000:1000 /data/keep && echo more >> /etc/passwd && rm /bin/vi"]
ENV FOO=bar
WORKDIR /data
CMD ["/bin/sh", "-c", "echo hi"]
"""
CHILDFILE = """\
FROM localhost/layered:1
RUN ["/bin/sh", "-c", "echo child > /child && rm /etc/passwd"]
"""
# podman create adds these to the container it exports; images do not carry them.
PODMAN_ADDS = ("dev", "proc", "sys", "etc/hostname")


def _podman(where: Path) -> list[str]:
    return [
        "podman",
        "--root",
        str(where / "root"),
        "--runroot",
        str(where / "runroot"),
        "--runtime",
        "runc",
        "--cgroup-manager",
        "cgroupfs",
        "--events-backend",
        "file",
        "--storage-driver",
        "overlay",
    ]


@pytest.fixture(scope="session")
def podman_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """docker-archive, oci-archive and oci-dir saves of a 3-layer image, a
    docker-archive of a child image sharing them, and podman's own export."""
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.skip("podman/runc are not installed; run 'make setup'")
    where = tmp_path_factory.mktemp("podman")
    context = where / "context"
    context.mkdir()
    shutil.copy("/bin/busybox", context / "busybox")
    (context / "Containerfile").write_text(CONTAINERFILE)
    (context / "Childfile").write_text(CHILDFILE)
    podman = _podman(where)
    out = {
        "docker": where / "docker.tar",
        "oci": where / "oci.tar",
        "ocidir": where / "ocidir",
        "child": where / "child.tar",
        "export": where / "export.tar",
    }

    def run(*args: str) -> None:
        subprocess.run([*podman, *args], check=True, capture_output=True, timeout=300)

    try:
        for tag, file in (("layered:1", "Containerfile"), ("child:1", "Childfile")):
            run("build", "--network=none", "-t", f"localhost/{tag}", "-f", file, str(context))
        run("save", "--format", "docker-archive", "-o", str(out["docker"]), "localhost/layered:1")
        run("save", "--format", "oci-archive", "-o", str(out["oci"]), "localhost/layered:1")
        run("save", "--format", "oci-dir", "-o", str(out["ocidir"]), "localhost/layered:1")
        run("save", "--format", "docker-archive", "-o", str(out["child"]), "localhost/child:1")
        run("create", "--name", "ref", "localhost/layered:1")
        run("export", "-o", str(out["export"]), "ref")
        run("rm", "ref")
    finally:
        # Only this private store's containers and images; `system reset` would
        # also drop the host's podman networks.
        for args in (("rm", "--all", "--force"), ("rmi", "--all", "--force")):
            subprocess.run([*podman, *args], capture_output=True, check=False, timeout=120)
        for target in sorted(linux.mount_targets(), key=len, reverse=True):
            if target.startswith(str(where) + "/"):
                linux.umount(target, linux.MNT_DETACH)
        shutil.rmtree(where / "root", ignore_errors=True)
        shutil.rmtree(where / "runroot", ignore_errors=True)
    reference = where / "reference"
    reference.mkdir()
    subprocess.run(["tar", "-xpf", str(out["export"]), "-C", str(reference)], check=True)
    out["reference"] = reference
    return out


def _without_podman_additions(tree: treeinfo.Tree) -> treeinfo.Tree:
    return {
        p: e
        for p, e in tree.items()
        if not any(p == a or p.startswith(a + "/") for a in PODMAN_ADDS) and p != "."
    }


def _tree(storage, mount, name: str) -> treeinfo.Tree:
    with mount(storage, name) as path:
        return treeinfo.record(path)


@pytest.mark.parametrize("driver", DRIVERS)
def test_busybox_image_runs_on_every_driver(driver, root, open_storage, mount):
    ref = ensure_busybox(root)
    assert ensure_busybox(root) == ref  # built once
    storage = open_storage(driver)
    layer, config = resolve_image(storage, ref)
    assert config["Cmd"] == ["sh"]
    assert resolve_layer(storage, "busybox") == layer
    assert resolve_image(storage, layer) == (layer, {})  # a layer name has no config
    storage.clone("box", layer)
    with mount(storage, "box") as path:
        done = subprocess.run(
            ["chroot", str(path), "sh", "-c", "echo $((6 * 7)); ls /bin | wc -l; id -un"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert (path / "bin" / "sh").stat().st_ino == (path / "bin" / "busybox").stat().st_ino
    answer, applets, user = done.stdout.split()
    assert (answer, user) == ("42", "root") and int(applets) > 50


@pytest.mark.parametrize("fmt", ["docker", "oci", "ocidir"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_podman_archive_unpacks_to_podmans_own_tree(
    driver, fmt, podman_archives, cli, open_storage, mount
):
    imported = cli("image", "import", str(podman_archives[fmt]), "--json", check=True)
    (image,) = json.loads(imported.stdout)
    assert image["name"] == "localhost/layered:1" and image["layers"] == 3
    cli("clone", "c", "--from", "localhost/layered:1", "--driver", driver, check=True)
    storage = open_storage(driver)
    tree = _tree(storage, mount, "c")
    assert "data/drop" not in tree and "bin/vi" not in tree  # whiteouts
    assert sorted(p for p in tree if p.startswith("opq/")) == ["opq/new"]  # opaque dir
    assert tree["data/keep/k"]["mode"] == 0o4711 and tree["data/keep"]["uid"] == 1000
    assert tree["data/fifo"]["type"] == "fifo"
    reference = treeinfo.record(podman_archives["reference"])
    expected = _without_podman_additions(reference)
    assert treeinfo.differences(expected, _without_podman_additions(tree)) == []
    config = resolve_image(storage, "localhost/layered:1")[1]
    assert "FOO=bar" in config["Env"] and config["WorkingDir"] == "/data"


def test_same_image_same_tree_on_every_driver(podman_archives, root, cli, open_storage, mount):
    """Cross-driver agreement: paths, types, contents, modes, owners, links, xattrs."""
    if len(AVAILABLE) < 2:
        pytest.skip(f"needs two drivers, only {AVAILABLE} run here")
    cli("image", "import", str(podman_archives["oci"]), check=True)
    ensure_busybox(root)
    for number, image in enumerate(("localhost/layered:1", "busybox")):
        trees = {}
        for driver in AVAILABLE:
            storage = open_storage(driver)
            storage.clone(f"c{number}", resolve_layer(storage, image))
            trees[driver] = _tree(storage, mount, f"c{number}")
        first = AVAILABLE[0]
        for driver in AVAILABLE[1:]:
            assert treeinfo.differences(trees[first], trees[driver]) == [], (image, driver)


def _blobs(root: Path) -> set[str]:
    return set(os.listdir(root / "content" / "blobs" / "sha256"))


def _image_layers(storage) -> list[str]:
    return [i.name for i in storage.list() if LAYER_LABEL in i.labels]


@pytest.mark.parametrize("driver", DRIVERS)
def test_shared_layers_are_stored_and_unpacked_once(
    driver, podman_archives, root, cli, open_storage
):
    cli("image", "import", str(podman_archives["docker"]), check=True)
    after_one = _blobs(root)
    cli("image", "import", str(podman_archives["child"]), check=True)
    added = _blobs(root) - after_one
    assert len(after_one) == 5  # manifest, config, 3 layers
    assert len(added) == 3  # manifest, config and only the child's own layer
    cli("clone", "a", "--from", "localhost/layered:1", "-d", driver, check=True)
    cli("clone", "b", "--from", "localhost/child:1", "-d", driver, check=True)
    storage = open_storage(driver)
    assert len(_image_layers(storage)) == 4
    # the child's stack is the parent image's stack plus its own layer
    assert storage.store.chain(storage.stat("b").parent_id)[1] == storage.stat("a").parent_id


@pytest.mark.parametrize("driver", DRIVERS)
def test_image_rm_refuses_while_used_then_cleans_up(
    driver, podman_archives, root, cli, open_storage
):
    cli("image", "import", str(podman_archives["docker"]), check=True)
    cli("image", "import", str(podman_archives["child"]), check=True)
    cli("clone", "a", "--from", "localhost/layered:1", "-d", driver, check=True)
    cli("clone", "b", "--from", "localhost/child:1", "-d", driver, check=True)
    refused = cli("image", "rm", "localhost/child:1")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "in use by clone b" in refused.stderr
    cli("rm", "-d", driver, "b", check=True)
    removed = json.loads(cli("image", "rm", "localhost/child:1", "--json", check=True).stdout)
    assert len(removed[0]["removed_layers"][driver]) == 1  # only the child's own layer
    assert len(removed[0]["removed_blobs"]) == 3
    storage = open_storage(driver)
    assert len(_image_layers(storage)) == 3
    assert cli("image", "rm", "localhost/layered:1").returncode == 2  # clone a uses it
    cli("rm", "-d", driver, "a", check=True)
    cli("image", "rm", "localhost/layered:1", check=True)
    assert _image_layers(storage) == [] and _blobs(root) == set()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_rootfs_tarball_becomes_a_one_layer_image(compression, root, cli, tmp_path):
    rootfs = tar_bytes([member("etc", "dir"), member("etc/motd", data=b"hello\n")])
    path = tmp_path / f"rootfs.tar.{'gz' if compression == 'gzip' else 'zst'}"
    path.write_bytes({"gzip": gzip_bytes, "zstd": zstd_bytes}[compression](rootfs))
    (image,) = json.loads(cli("image", "import", str(path), "--json", check=True).stdout)
    assert image["name"] == "rootfs:latest" and image["layers"] == 1
    inspected = json.loads(cli("image", "inspect", "rootfs", "--json", check=True).stdout)
    assert inspected["layers"][0]["media_type"].endswith("+" + compression)
    assert any(e.startswith("PATH=") for e in inspected["config"]["Env"])
    driver = AVAILABLE[0]
    cli("clone", "r", "--from", "rootfs", "-d", driver, check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli("mount", "-d", driver, "r", str(mnt), check=True)
    try:
        assert (mnt / "etc" / "motd").read_text() == "hello\n"
    finally:
        cli("umount", str(mnt), check=True)


@pytest.mark.parametrize("driver", DRIVERS)
def test_crash_during_unpack_is_rolled_back(driver, root, cli, open_storage):
    ensure_busybox(root)
    crashed = cli(
        "clone", "x", "--from", "busybox", "-d", driver,
        env={"MINIFS_FAILPOINT": "unpack:after-apply"},
    )  # fmt: skip
    assert crashed.returncode == -9
    rows = json.loads(cli("ls", "--json", check=True).stdout)
    (owner,) = [r["labels"][TRANSIENT_LABEL] for r in rows]  # the killed process
    assert not owner_alive(owner)
    cli("clone", "x", "--from", "busybox", "-d", driver, check=True)
    storage = open_storage(driver)
    names = sorted(i.name for i in storage.list())
    assert names == sorted(["x", *_image_layers(storage)]) and len(names) == 2


def test_unknown_refs_are_one_line_errors(cli, root):
    for args in (("clone", "x", "--from", "nosuch"), ("image", "inspect", "nosuch")):
        done = cli(*args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "nosuch" in done.stderr and "image" in done.stderr


def test_layer_name_wins_over_image_name(root, open_storage):
    ensure_busybox(root)
    storage = open_storage(AVAILABLE[0])
    storage.clone("busybox-work")
    storage.snapshot("busybox-work", "busybox")
    assert resolve_layer(storage, "busybox") == "busybox"
    assert resolve_layer(storage, "busybox:latest").startswith("sha256:")
