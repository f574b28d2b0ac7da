"""Every archive format real tools write imports to the same tree.

One three-layer image (whiteouts, an opaque directory, a hard link, and an
empty layer that appears twice) is written as a pre-25 `docker save` (with the
second copy of the empty layer as the `layer.tar` symlink moby writes) and a
Docker 25+ save, then converted by skopeo (a real reader and writer of these
formats) into OCI layouts, directory and tar, gzip and zstd. umoci writes an
OCI layout of its own with real whiteouts. Each import, cloned, must give the
same tree. Root filesystem tars come from GNU tar, with and without `./`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from minifs.images import oci
from tests import treeinfo
from tests.conftest import driver_params
from tests.corpus import (
    docker25_archive,
    docker_legacy_archive,
    image_index,
    layout_members,
    member,
    oci_image,
    tar_bytes,
)

DRIVER = next((p.values[0] for p in driver_params() if not p.marks), None)
EMPTY = tar_bytes([])
LAYERS = [
    tar_bytes(
        [
            member("etc", "dir"),
            member("etc/motd", data=b"hi\n"),
            member("data", "dir"),
            member("data/drop", "dir"),
            member("data/drop/f", data=b"x"),
            member("opq", "dir"),
            member("opq/old", data=b"old"),
            member("bin", "dir"),
            member("bin/tool", data=b"tool", mode=0o755),
            member("bin/tool2", "hardlink", linkname="bin/tool"),
        ]
    ),
    EMPTY,
    tar_bytes(
        [
            member("data", "dir"),
            member("data/.wh.drop"),
            member("opq", "dir"),
            member("opq/.wh..wh..opq"),
            member("opq/new", data=b"new"),
            member("new", data=b"top"),
        ]
    ),
    EMPTY,
]
EXPECTED = {".", "etc", "etc/motd", "data", "opq", "opq/new", "new", "bin", "bin/tool", "bin/tool2"}


def _skopeo(*args: str) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed; run 'make setup'")
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "-q", *args], check=True, capture_output=True
    )


def _write_layout(where: Path, members: list) -> Path:
    for info, data in members:
        path = where / info.name
        if info.isdir():
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return where


@pytest.fixture
def imported(cli, open_storage, mount):
    """import(path) -> (names, tree of a clone of the first image)."""
    if DRIVER is None:
        pytest.skip("no driver runs here")
    counter = iter(range(100))

    def run(path: Path, *flags: str) -> tuple[list[str], treeinfo.Tree]:
        done = cli("image", "import", str(path), "--json", *flags, check=True)
        names = [image["name"] for image in json.loads(done.stdout)]
        clone = f"c{next(counter)}"
        cli("clone", clone, "--from", names[0], "-d", DRIVER, check=True)
        with mount(open_storage(DRIVER), clone) as root:
            return names, treeinfo.record(root)

    return run


def test_legacy_docker_save_with_shared_layer_symlink(imported, tmp_path):
    archive = tmp_path / "legacy.tar"
    archive.write_bytes(docker_legacy_archive(LAYERS))
    listed = subprocess.run(["tar", "-tvf", str(archive)], capture_output=True, text=True)
    assert listed.stdout.count("layer.tar -> ../") == 1  # the second empty layer
    names, tree = imported(archive)
    assert names == ["test/legacy:1"]
    assert set(tree) == EXPECTED
    assert tree["bin/tool"]["hardlinks"] == ("bin/tool", "bin/tool2")
    assert tree["opq/new"]["sha256"] == hashlib.sha256(b"new").hexdigest()


@pytest.mark.parametrize("target", ["../../../etc/hostname", "/etc/hostname", "loop/layer.tar"])
def test_legacy_layer_symlink_leaving_the_archive_is_refused(cli, root, tmp_path, target):
    archive = tmp_path / "escape.tar"
    archive.write_bytes(docker_legacy_archive(LAYERS[:2], layer_links={1: target}))
    if target.startswith("loop"):  # a symlink to itself: a loop, not an escape
        data = docker_legacy_archive(LAYERS[:2], layer_links={1: "layer.tar"})
        archive.write_bytes(data)
    done = cli("image", "import", str(archive))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert ("outside the archive" in done.stderr) or ("levels of links" in done.stderr)
    assert not (root / "content" / "blobs" / "sha256").exists() or not list(
        (root / "content" / "blobs" / "sha256").iterdir()
    )


@pytest.mark.parametrize("compress", ["none", "gzip"])
def test_docker25_save(imported, tmp_path, compress):
    archive = tmp_path / "d25.tar"
    archive.write_bytes(docker25_archive(LAYERS, compress=compress))
    names, tree = imported(archive)
    assert names == ["docker.io/test/d25:1"]
    assert set(tree) == EXPECTED


@pytest.mark.parametrize(
    ("dest", "flags"),
    [
        ("oci:{dir}/layout:v1", ()),
        ("oci:{dir}/layout:v1", ("--dest-compress-format", "zstd")),
        ("oci-archive:{dir}/image.tar:v1", ()),
        ("oci-archive:{dir}/image.tar:v1", ("--dest-compress-format", "zstd")),
        ("docker-archive:{dir}/podman.tar:test/skopeo:v1", ()),
    ],
    ids=["oci-dir-gzip", "oci-dir-zstd", "oci-tar-gzip", "oci-tar-zstd", "docker"],
)
def test_skopeo_conversions_import_to_the_same_tree(imported, tmp_path, dest, flags):
    source = tmp_path / "legacy.tar"
    source.write_bytes(docker_legacy_archive(LAYERS))
    target = dest.format(dir=tmp_path)
    _skopeo(*flags, f"docker-archive:{source}", target)
    path = Path(target.split(":")[1])
    if path.name == "layout":
        index = json.loads((path / "index.json").read_text())
        manifest = json.loads(
            (path / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text()
        )
        kinds = {layer["mediaType"].rsplit(".", 1)[-1] for layer in manifest["layers"]}
        wanted = f"tar+{flags[-1] if flags else 'gzip'}"
        assert kinds == {wanted}, kinds
    names, tree = imported(path)
    assert names[0] in ("layout:v1", "image:v1", "docker.io/test/skopeo:v1")
    assert set(tree) == EXPECTED
    assert tree["bin/tool"]["hardlinks"] == ("bin/tool", "bin/tool2")


def test_umoci_layout_with_real_whiteouts(cli, open_storage, mount, tmp_path):
    """umoci's own layers (its repack writes the whiteouts); the layout holds
    three images, the first without any layer."""
    if shutil.which("umoci") is None or DRIVER is None:
        pytest.skip("umoci or a driver is missing here")
    layout, bundle = tmp_path / "um", tmp_path / "bundle"

    def umoci(*args: str) -> None:
        subprocess.run(["umoci", *args], check=True, capture_output=True)

    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:empty")
    umoci("unpack", "--image", f"{layout}:empty", str(bundle))
    rootfs = bundle / "rootfs"
    for path in ("etc/motd", "data/drop/f", "opq/old"):
        (rootfs / path).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / path).write_text(path)
    umoci("repack", "--refresh-bundle", "--image", f"{layout}:one", str(bundle))
    shutil.rmtree(rootfs / "data" / "drop")
    (rootfs / "opq" / "old").unlink()
    (rootfs / "new").write_text("new")
    umoci("repack", "--image", f"{layout}:two", str(bundle))
    umoci("config", "--image", f"{layout}:two", "--config.env", "FOO=bar")
    done = json.loads(cli("image", "import", str(layout), "--json", check=True).stdout)
    assert {d["name"]: d["layers"] for d in done} == {"um:empty": 0, "um:one": 1, "um:two": 2}
    empty = cli("clone", "e", "--from", "um:empty", "-d", DRIVER)
    assert empty.returncode == 2 and "no layers" in empty.stderr
    cli("clone", "t", "--from", "um:two", "-d", DRIVER, check=True)
    with mount(open_storage(DRIVER), "t") as path:
        tree = treeinfo.record(path)
    assert set(tree) == {".", "etc", "etc/motd", "data", "opq", "new"}
    config = json.loads(cli("image", "inspect", "um:two", "--json", check=True).stdout)
    assert "FOO=bar" in config["config"]["Env"]


def test_multi_platform_index_picks_this_host(imported, tmp_path):
    descriptor, blobs = oci_image(LAYERS, "gzip")
    arch = oci.host_arch()
    others = {"linux/arm64/v8": None, "linux/s390x": None, "windows/amd64": None}
    others.pop(f"linux/{arch}", None)
    index = image_index({**others, f"linux/{arch}": descriptor}, blobs)
    index["annotations"] = {"org.opencontainers.image.ref.name": "example.org/multi:2"}
    layout = _write_layout(tmp_path / "multi", layout_members([index], blobs))
    names, tree = imported(layout)
    assert names == ["example.org/multi:2"]
    assert set(tree) == EXPECTED


def test_multi_platform_index_without_this_host_is_refused(cli, root, tmp_path):
    _, blobs = oci_image(LAYERS, "gzip")
    index = image_index({"linux/riscv64": None, "linux/s390x": None}, blobs)
    layout = _write_layout(tmp_path / "foreign", layout_members([index], blobs))
    done = cli("image", "import", str(layout))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"linux/{oci.host_arch()}" in done.stderr and "linux/riscv64" in done.stderr


def _rootfs_source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    (source / "etc").mkdir(parents=True)
    (source / "etc" / "motd").write_text("hello\n")
    (source / "manifest.json").write_text('{"a web root": "not an image"}')
    (source / "bin").mkdir()
    (source / "bin" / "sh").write_text("#!")
    os.symlink("sh", source / "bin" / "ash")
    os.chmod(source, 0o755)
    return source


@pytest.mark.parametrize(
    "how", [["-cf", "{out}", "."], ["-cf", "{out}", "etc", "bin", "manifest.json"], ["-czf"]]
)
def test_gnu_tar_rootfs(imported, tmp_path, how):
    source = _rootfs_source(tmp_path)
    out = tmp_path / ("rootfs.tar.gz" if how == ["-czf"] else "rootfs.tar")
    args = ["-czf", "{out}", "."] if how == ["-czf"] else how
    subprocess.run(["tar", *[a.format(out=out) for a in args]], cwd=source, check=True)
    names, tree = imported(out)
    assert names == ["rootfs:latest"]
    expected = treeinfo.record(source)
    if "." not in how and how != ["-czf"]:
        expected.pop(".")
        tree.pop(".")
    assert treeinfo.differences(expected, tree) == []
