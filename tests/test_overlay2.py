"""overlay2 specifics: the 500-layer limit, how deep stacks are mounted, Docker's
on-disk shape, and how deletes are stored in a diff dir.

One 500-layer chain is built per module through the Storage API; each layer's
file is written straight into its diff dir (what a layer unpack does), which
keeps the build to the cost of the store's transactions.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from minifs import linux, mounter
from minifs.errors import MinifsError, TooManyLayers
from minifs.loopdisk import parse_size
from minifs.model import Kind
from minifs.plugins import get_driver
from minifs.storage import Storage
from tests.conftest import MINIFS

DEPTH = 500


def overlay2_or_skip() -> None:
    try:
        get_driver("overlay2").probe()
    except MinifsError as exc:
        pytest.skip(f"overlay2: {exc}")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    """Layers l1..l500, l1 at the bottom; layer i adds f{i:03d} and rewrites `top`."""
    overlay2_or_skip()
    storage = Storage("overlay2", tmp_path_factory.mktemp("chain") / "state")
    parent = None
    for i in range(1, DEPTH + 1):
        storage.clone(f"c{i}", parent)
        diff = storage.driver.diff_dir(storage.stat(f"c{i}").id)
        assert diff is not None
        (diff / f"f{i:03d}").write_text(f"{i}\n")
        (diff / "top").write_text(f"{i}\n")
        storage.snapshot(f"c{i}", f"l{i}")
        parent = f"l{i}"
    yield storage
    storage.down()
    storage.close()


def mount_options(target: Path) -> str:
    """The superblock options /proc/self/mountinfo shows for the mount at `target`."""
    for entry in linux.mountinfo():
        if entry.target == str(target):
            return ",".join(entry.super_options)
    raise AssertionError(f"{target} is not mounted")


def backend_entries(storage: Storage) -> set[str]:
    data = storage.driver.data
    return {*os.listdir(data), *(f"l/{n}" for n in os.listdir(data / "l"))}


@pytest.mark.parametrize("depth", [3, 100, DEPTH])
def test_clone_mounts_over_deep_stacks(chain: Storage, depth: int, tmp_path: Path):
    """3 layers fit one page of mount(2) options; 100 and 500 do not and must go
    through fsconfig's `lowerdir+`, one lower dir at a time."""
    name = f"deep{depth}"
    chain.clone(name, f"l{depth}")
    target = tmp_path / "mnt"
    target.mkdir()
    try:
        (record,) = chain.mounts(name)
        data = [o for o in record.options if o.startswith("lowerdir=")]
        lowers = data[0].removeprefix("lowerdir=").split(":")
        assert len(lowers) == depth
        fits_page = len(",".join(record.options)) < linux.PAGE_SIZE
        assert fits_page == (depth == 3)

        mounter.mount_all([record], target)
        try:
            options = mount_options(target)
            if fits_page:
                assert options.count("lowerdir=") == 1 and "lowerdir+=" not in options
            else:
                assert options.count("lowerdir+=") == depth
            assert (target / "f001").read_text() == "1\n"
            assert (target / f"f{depth:03d}").read_text() == f"{depth}\n"
            assert (target / "top").read_text() == f"{depth}\n"
            assert len(list(target.glob("f*"))) == depth
            (target / "mine").write_text("clone\n")
        finally:
            mounter.unmount(target)
        diff = chain.driver.diff_dir(chain.stat(name).id)
        assert diff is not None and sorted(os.listdir(diff)) == ["mine"]
    finally:
        chain.remove(name)


def test_501st_layer_is_refused_before_anything_is_made(chain: Storage):
    chain.clone("c501", f"l{DEPTH}")
    chain.snapshot("c501", "l501")
    try:
        rows = chain.list()
        entries = backend_entries(chain)
        for make in (chain.clone, chain.view):
            with pytest.raises(TooManyLayers, match="501"):
                make("over", "l501")
        assert chain.list() == rows
        assert backend_entries(chain) == entries

        done = subprocess.run(
            [MINIFS, "--root", str(chain.state.root), "clone", "over", "--from", "l501"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 2 and done.stderr.count("\n") == 1
        assert done.stderr.startswith("minifs: error: ") and "501" in done.stderr
        assert chain.list() == rows
        assert backend_entries(chain) == entries
    finally:
        chain.remove("l501")


def test_mounting_a_501_layer_layer_says_why(chain: Storage, tmp_path: Path):
    """A layer that deep can exist (it is data), but its own mount cannot stack."""
    chain.clone("c501", f"l{DEPTH}")
    chain.snapshot("c501", "l501")
    target = tmp_path / "mnt"
    target.mkdir()
    try:
        with pytest.raises(TooManyLayers) as raised:
            mounter.mount_all(chain.mounts("l501"), target)
        assert not linux.is_mountpoint(target)
        assert "6.8" not in str(raised.value) and "501" in str(raised.value)
    finally:
        chain.remove("l501")


def test_view_of_a_multi_layer_layer_is_read_only(chain: Storage, tmp_path: Path):
    chain.view("look", "l5")
    target = tmp_path / "mnt"
    target.mkdir()
    try:
        (record,) = chain.mounts("look")
        assert record.type == "overlay" and "ro" in record.options
        mounter.mount_all([record], target)
        try:
            assert (target / "top").read_text() == "5\n"
            assert sorted(p.name for p in target.glob("f*")) == [f"f{i:03d}" for i in range(1, 6)]
            with pytest.raises(OSError) as raised:
                (target / "new").write_text("no\n")
            assert raised.value.errno == errno.EROFS
        finally:
            mounter.unmount(target)
    finally:
        chain.remove("look")


def test_docker_on_disk_shape(chain: Storage):
    data = chain.driver.data
    infos = [chain.stat(f"l{i}") for i in (1, 2, 3)]
    links = {}
    for info in infos:
        root = data / info.id
        assert {"diff", "work", "merged", "link"} <= set(os.listdir(root))
        assert all((root / d).is_dir() for d in ("diff", "work", "merged"))
        link = (root / "link").read_text()
        assert re.fullmatch(r"[A-Z2-7]{26}", link), link
        assert os.readlink(data / "l" / link) == f"../{info.id}/diff"
        assert (data / "l" / link).resolve() == (root / "diff").resolve()
        links[info.name] = link
    # The bottom layer has no lower file; the others list their parents nearest first.
    assert not (data / infos[0].id / "lower").exists()
    assert (data / infos[1].id / "lower").read_text() == f"l/{links['l1']}"
    assert (data / infos[2].id / "lower").read_text() == f"l/{links['l2']}:l/{links['l1']}"
    assert infos[2].kind is Kind.LAYER


def test_deletes_are_whiteouts_and_opaque_dirs(open_storage, mount):
    overlay2_or_skip()
    storage = open_storage("overlay2")
    storage.clone("b0")
    with mount(storage, "b0") as path:
        (path / "gone").write_text("base\n")
        (path / "dir").mkdir()
        (path / "dir/old").write_text("base\n")
        (path / "kept").write_text("base\n")
    storage.snapshot("b0", "base")
    storage.clone("work", "base")
    with mount(storage, "work") as path:
        (path / "gone").unlink()
        (path / "dir/old").unlink()
        (path / "dir").rmdir()
        (path / "dir").mkdir()
        (path / "dir/new").write_text("clone\n")

    diff = storage.driver.diff_dir(storage.stat("work").id)
    assert diff is not None
    whiteout = os.lstat(diff / "gone")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == os.makedev(0, 0)
    assert os.getxattr(diff / "dir", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(diff / "dir")) == ["new"]
    assert not (diff / "kept").exists()

    storage.snapshot("work", "top")
    storage.clone("after", "top")
    with mount(storage, "after") as path:
        assert sorted(os.listdir(path)) == ["dir", "kept"]
        assert sorted(os.listdir(path / "dir")) == ["new"]


def test_a_loop_image_is_sized_to_fit_its_disk(cli, tmpfs):
    """backing=loop without a size: 10G, or 90% of what the disk can spare, so
    a small disk never holds a sparse image that writeback cannot fill."""
    small = tmpfs("small", "size=64M") / "state"
    opts = ("--root", str(small), "--storage-opt", "overlay2.backing=loop")
    cli(*opts, "clone", "x", check=True)
    config = json.loads((small / "drivers" / "overlay2" / "config.json").read_text())
    assert 1 << 20 < parse_size(config["size"]) <= 64 * (1 << 20) * 0.9
    cli("--root", str(small), "rm", "x", check=True)
    cli("--root", str(small), "down", check=True)
