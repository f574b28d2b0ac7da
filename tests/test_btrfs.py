"""btrfs specifics, on real loop-backed btrfs filesystems: what a snapshot is
made of (read-only subvolumes, writable snapshots sharing extents), where the
subvolumes live (the driver's own image, the home itself, a user's btrfs),
and bad input refused in one line with nothing left behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from minifs import linux
from minifs.errors import InvalidArgument, MinifsError
from minifs.loopdisk import make_image
from minifs.plugins import get_driver
from minifs.resources import Resources, loop_backing_file
from minifs.storage import Storage
from tests.conftest import refused

MiB = 1 << 20

try:
    get_driver("btrfs").probe()
except MinifsError as exc:
    pytest.skip(f"btrfs: {exc}", allow_module_level=True)

import btrfsutil  # noqa: E402 - only importable where the probe passed


@pytest.fixture
def user_btrfs(tmp_path: Path) -> Iterator[Path]:
    """A btrfs mounted by someone other than minifs, as a user's btrfs.path
    points into; unmounted and detached at teardown, after the stores on it."""
    image = tmp_path / "user.img"
    make_image(image, 256 * MiB, "btrfs")
    resources = Resources(tmp_path / "user-run")
    where = tmp_path / "userfs"
    resources.mount("mount", resources.loop("loop", image), where, "btrfs")
    yield where
    resources.down()


def used_bytes(path: Path) -> int:
    """Bytes the filesystem under `path` has allocated, after a commit."""
    btrfsutil.sync(str(path))
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def subvolume(storage: Storage, name: str) -> Path:
    return storage.driver.path(storage.stat(name).id)


def test_snapshot_is_the_clone_made_read_only(open_storage):
    storage = open_storage("btrfs")
    storage.clone("c")
    path = subvolume(storage, "c")
    before = btrfsutil.subvolume_id(str(path))
    assert btrfsutil.is_subvolume(str(path)) and not btrfsutil.get_subvolume_read_only(str(path))
    storage.snapshot("c", "L")
    assert subvolume(storage, "L") == path  # same id, same subvolume
    assert btrfsutil.subvolume_id(str(path)) == before
    assert btrfsutil.get_subvolume_read_only(str(path))
    storage.driver.commit(storage.stat("L").id, [])  # as recovery repeats it
    assert btrfsutil.get_subvolume_read_only(str(path))

    storage.clone("w", "L")
    storage.view("v", "L")
    layer = btrfsutil.subvolume_info(str(path))
    for name, read_only in (("w", False), ("v", True)):
        info = btrfsutil.subvolume_info(str(subvolume(storage, name)))
        assert info.parent_uuid == layer.uuid, name  # a snapshot of the layer
        assert btrfsutil.get_subvolume_read_only(str(subvolume(storage, name))) is read_only
    storage.view("empty", None)
    assert btrfsutil.get_subvolume_read_only(str(subvolume(storage, "empty")))


def test_clone_shares_extents_and_costs_little(open_storage, mount):
    storage = open_storage("btrfs")
    storage.clone("c")
    with mount(storage, "c") as path:
        (path / "big").write_bytes(os.urandom(64 * MiB))
    storage.snapshot("c", "L")
    data = storage.driver.data
    before = used_bytes(data)
    storage.clone("w", "L")
    assert used_bytes(data) - before < MiB  # a new tree root, not a copy
    assert storage.usage("w").size == 0

    with mount(storage, "w") as path:
        fd = os.open(path / "big", os.O_WRONLY)
        try:
            os.pwrite(fd, b"4mid", 32 * MiB + 3)
        finally:
            os.close(fd)
    grown = storage.usage("w")
    assert 0 < grown.size <= 128 * 1024, grown  # the block written, not the file
    assert grown.inodes == 1  # only big changed; the root directory did not
    assert storage.usage("L").size >= 64 * MiB  # a layer keeps what it holds over its parent


def test_usage_counts_files_made_and_their_data(open_storage, mount):
    storage = open_storage("btrfs")
    storage.clone("c")
    with mount(storage, "c") as path:
        (path / "small").write_bytes(b"inline")
        for i in range(10):
            (path / f"f{i}").write_bytes(os.urandom(MiB))
    used = storage.usage("c")
    assert 10 * MiB <= used.size < 11 * MiB
    assert used.inodes == 12  # the root directory and its 11 files


def test_embedded_image_comes_up_goes_down_and_keeps_data(open_storage, mount):
    storage = open_storage("btrfs")
    storage.clone("c")
    with mount(storage, "c") as path:
        (path / "kept").write_text("across down")
    home = storage.driver.home
    assert json.loads(storage.driver.config_path.read_text()) == {"path": "image", "size": "1G"}
    records = {r["type"]: r for r in storage.driver.resources.load()}
    assert loop_backing_file(records["loop"]["device"]) == str(home / "backing.img")
    assert linux.is_mountpoint(home / "data")
    assert os.stat(home / "backing.img").st_blocks * 512 < 64 * MiB  # sparse
    storage.down()
    assert not linux.is_mountpoint(home / "data")
    assert loop_backing_file(records["loop"]["device"]) != str(home / "backing.img")
    again = open_storage("btrfs")  # no options: the recorded ones
    with mount(again, "c") as path:
        assert (path / "kept").read_text() == "across down"


def test_user_path_is_used_as_it_is(user_btrfs, open_storage, mount, root):
    storage = open_storage("btrfs", path=str(user_btrfs))
    storage.clone("c")
    with mount(storage, "c") as path:
        (path / "f").write_text("on the user's btrfs")
    storage.snapshot("c", "L")
    sid = storage.stat("L").id
    assert btrfsutil.is_subvolume(str(user_btrfs / sid))
    assert storage.driver.resources.load() == []  # nothing of its own to bring up
    assert storage.down() == []
    assert linux.is_mountpoint(user_btrfs)  # never unmounted by minifs
    again = open_storage("btrfs")
    assert again.list()[0].name == "L"
    with pytest.raises(InvalidArgument, match="was made with size=auto"):
        open_storage("btrfs", size="2G").clone("x")
    # Another store in the same directory would take these subvolumes for orphans.
    other = Storage("btrfs", root.parent / "other", {"path": str(user_btrfs)})
    try:
        with pytest.raises(InvalidArgument, match="already holds the snapshots"):
            other.clone("x")
    finally:
        other.close()
    again.remove("L")
    assert not (user_btrfs / sid).exists()


def test_auto_uses_a_home_on_btrfs_directly(user_btrfs):
    storage = Storage("btrfs", user_btrfs / "state")
    try:
        storage.clone("c")
        assert storage.driver.options["path"] == str(storage.driver.home)
        assert storage.driver.resources.load() == []
        assert btrfsutil.is_subvolume(str(storage.driver.path(storage.stat("c").id)))
        storage.remove("c")
    finally:
        storage.down()
        storage.close()


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("btrfs.path=/nonexistent/dir", ("btrfs.path=/nonexistent/dir", "not an existing")),
        ("btrfs.path=relative/dir", ("btrfs.path=relative/dir", "absolute")),
        ("btrfs.size=50M", ("btrfs.size=50M", "109M")),
        ("btrfs.colour=blue", ("colour", "known: path, size")),
    ],
)
def test_bad_options_refused_before_anything_is_made(cli, root, option, words):
    refused(cli("--storage-opt", option, "clone", "x", "-d", "btrfs"), *words)
    assert not root.exists()


def test_path_not_on_btrfs_is_refused(cli, root, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    refused(
        cli("--storage-opt", f"btrfs.path={plain}", "clone", "x", "-d", "btrfs"),
        f"btrfs.path={plain}",
        "not on a btrfs",
    )
    assert not root.exists()


def test_an_image_that_is_not_btrfs_is_refused(cli, root):
    cli("clone", "x", "-d", "btrfs", check=True)
    cli("down", "-d", "btrfs", check=True)
    image = root / "drivers" / "btrfs" / "backing.img"
    with open(image, "r+b") as f:
        f.write(b"\0" * (1 << 17))  # the superblock gone
    refused(cli("clone", "y", "-d", "btrfs"), "backing.img is not a btrfs image", "move")
    assert json.loads((root / "drivers" / "btrfs" / "run" / "resources.json").read_text()) == []


def test_an_image_that_cannot_be_made_leaves_no_choice_behind(cli, tmpfs):
    small = tmpfs("small", "size=512k") / "state"
    sized = ("--root", str(small), "--storage-opt", "btrfs.size=200G")
    refused(cli(*sized, "clone", "x", "-d", "btrfs"), "btrfs image", "btrfs.size")
    assert list((small / "drivers" / "btrfs").iterdir()) == []
