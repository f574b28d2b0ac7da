"""The one conformance suite every storage driver must pass.

Each test runs once per registered driver (`MINIFS_TEST_DRIVERS` narrows the
list; a driver this machine cannot run is a skip carrying its probe's reason).
Everything goes through the public `Storage` API and real mounts made by
`minifs.mounter`, and trees are compared with `tests.treeinfo` records, so a
driver that loses an xattr, a hard link or a device number fails by name.

What the suite asks is what every driver must keep, whatever it is built on.
One thing it deliberately does not ask: that writing through one name of a
hard-linked file *in a clone* changes the other names. overlayfs copies up a
single name and breaks the link (Docker's overlay2 does the same, with
`index=off`), so only hard links as a layer holds them are a shared promise.
"""

from __future__ import annotations

import contextvars
import errno
import json
import os
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from minifs.errors import AlreadyExists, BackendError, InUse, NotFound
from minifs.model import Kind, State
from minifs.plugins import get_driver
from minifs.storage import Storage
from tests import treeinfo
from tests.conftest import driver_params, keeps_xattrs

pytestmark = pytest.mark.parametrize("driver", driver_params())

MiB = 1 << 20


@pytest.fixture
def storage(driver: str, open_storage: Callable[..., Storage]) -> Storage:
    return open_storage(driver)


XATTRS = contextvars.ContextVar("XATTRS", default=True)
"""Whether the driver under test keeps xattrs (Driver.xattrs): the trees the
suite writes carry none where it does not, and everything else is tested."""


@pytest.fixture(autouse=True)
def _xattrs_kept(driver: str) -> Iterator[None]:
    token = XATTRS.set(keeps_xattrs(driver))
    yield
    XATTRS.reset(token)


def setxattr(path: Path, name: str, value: bytes) -> None:
    if XATTRS.get():
        os.setxattr(path, name, value)


def removexattr(path: Path, name: str) -> None:
    if XATTRS.get():
        os.removexattr(path, name)


def commit(
    storage: Storage,
    mount: Callable,
    layer: str,
    parent: str | None = None,
    change: Callable[[Path], None] | None = None,
) -> treeinfo.Tree:
    """Make layer `layer` on `parent` with `change` applied; return the tree as
    written (recorded in the clone just before the snapshot)."""
    work = f"{layer}.wip"
    storage.clone(work, parent)
    with mount(storage, work) as path:
        if change:
            change(path)
        tree = treeinfo.record(path, mtimes=True)
    storage.snapshot(work, layer)
    return tree


def seen(storage: Storage, mount: Callable, name: str) -> treeinfo.Tree:
    with mount(storage, name) as path:
        return treeinfo.record(path, mtimes=True)


def assert_same(expected: treeinfo.Tree, actual: treeinfo.Tree, what: str) -> None:
    diff = treeinfo.differences(expected, actual)
    assert not diff, f"{what} differs from the tree as written:\n  " + "\n  ".join(diff[:40])


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """A `system.posix_acl_*` xattr value (the kernel's little-endian v2 format)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


ANY = 0xFFFFFFFF
ACL_READ_BY_1000 = posix_acl((0x01, 6, ANY), (0x02, 4, 1000), (0x04, 4, ANY), (0x10, 4, ANY),
                             (0x20, 4, ANY))  # fmt: skip
ACL_RW_BY_2000 = posix_acl((0x01, 6, ANY), (0x02, 6, 2000), (0x04, 0, ANY), (0x10, 6, ANY),
                           (0x20, 0, ANY))  # fmt: skip


def populate(root: Path) -> None:
    """A tree with every kind of thing an image carries."""
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("minifs\n")
    (root / "empty").touch()
    (root / "big").write_bytes(os.urandom(3 * MiB + 123))
    (root / "with space ünïcode").write_text("odd names survive")
    (root / "a/b/c/d").mkdir(parents=True)
    (root / "a/b/c/d/deep").write_text("deep")
    # Owners first: chown clears setuid/setgid bits, even for root.
    (root / "bin").mkdir(mode=0o755)
    for name, mode, owner in (
        ("bin/setuid", 0o4755, (0, 0)),
        ("bin/setgid", 0o2711, (0, 50)),
        ("owned", 0o640, (1234, 5678)),
        ("private", 0o600, (65534, 65534)),
    ):
        (root / name).write_text(name)
        os.chown(root / name, *owner)
        os.chmod(root / name, mode)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "home/user").mkdir(parents=True)
    os.chown(root / "home/user", 1000, 1000)
    os.chmod(root / "home/user", 0o2750)
    # Symlinks: relative, absolute, dangling, to a directory, owned by someone.
    os.symlink("etc/hostname", root / "rel")
    os.symlink("/etc/hostname", root / "abs")
    os.symlink("nowhere/at/all", root / "dangling")
    os.symlink("a/b", root / "dirlink")
    os.lchown(root / "dangling", 1234, 5678)
    # Hard links: a group of three across directories and a pair.
    (root / "hl").mkdir()
    (root / "hl/one").write_text("linked three times")
    os.link(root / "hl/one", root / "hl/two")
    os.link(root / "hl/one", root / "a/b/three")
    (root / "hl/pair").write_text("linked twice")
    os.link(root / "hl/pair", root / "hl/pair2")
    # xattrs every container filesystem has (other namespaces: test_xattr_namespace).
    setxattr(root / "etc/hostname", "user.plain", b"text")
    setxattr(root / "etc/hostname", "user.binary", b"\x00\xff\x01 nul inside")
    setxattr(root / "a", "user.on-a-dir", b"d" * 2000)
    # Special files.
    (root / "dev").mkdir()
    os.mkfifo(root / "dev/fifo", 0o620)
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "dev/tty5", stat.S_IFCHR | 0o620, os.makedev(4, 5))
    os.mknod(root / "dev/loop7", stat.S_IFBLK | 0o660, os.makedev(7, 7))
    os.chown(root / "dev/loop7", 0, 6)
    os.mknod(root / "dev/sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))


def test_tree_survives_snapshot_and_clone(storage, mount):
    written = commit(storage, mount, "L1", change=populate)
    assert written["bin/setuid"]["mode"] == 0o4755  # the tree really has what we test
    assert_same(written, seen(storage, mount, "L1"), "the layer mounted read-only")
    storage.view("v1", "L1")
    assert_same(written, seen(storage, mount, "v1"), "a view of the layer")
    storage.clone("c1", "L1")
    assert_same(written, seen(storage, mount, "c1"), "a clone of the layer")
    # Second generation: an untouched clone snapshot again, and a clone of that.
    storage.snapshot("c1", "L2")
    storage.clone("c2", "L2")
    assert_same(written, seen(storage, mount, "c2"), "a clone of a clone's layer")


def test_root_directory_attributes(storage, mount):
    def chmod_root(path: Path) -> None:
        os.chown(path, 1000, 1001)
        os.chmod(path, 0o750)
        setxattr(path, "user.root", b"yes")

    written = commit(storage, mount, "L1", change=chmod_root)
    storage.clone("c1", "L1")
    assert_same(written, seen(storage, mount, "c1"), "a clone's root directory")
    written = commit(storage, mount, "L2", "L1", lambda p: (p / "f").touch())
    storage.clone("c2", "L2")
    assert_same(written, seen(storage, mount, "c2"), "a second-generation root directory")


def test_hardlinks(storage, mount):
    def links(path: Path) -> None:
        (path / "x").mkdir()
        (path / "orig").write_text("same inode")
        os.link(path / "orig", path / "x/alias")
        os.link(path / "orig", path / "alias2")

    commit(storage, mount, "L1", change=links)

    def more_links(path: Path) -> None:
        (path / "new").write_text("made in the second layer")
        os.link(path / "new", path / "x/new-alias")

    commit(storage, mount, "L2", "L1", more_links)
    storage.clone("c", "L2")
    with mount(storage, "c") as path:
        first = {os.lstat(path / p).st_ino for p in ("orig", "x/alias", "alias2")}
        second = {os.lstat(path / p).st_ino for p in ("new", "x/new-alias")}
        assert len(first) == 1 and len(second) == 1 and first != second
        assert os.lstat(path / "orig").st_nlink == 3
        assert os.lstat(path / "new").st_nlink == 2
        assert treeinfo.hardlink_groups(treeinfo.record(path)) == {
            ("alias2", "orig", "x/alias"),
            ("new", "x/new-alias"),
        }


XATTR_CASES = {
    # case: (name on a file, name on a directory, first value, changed value)
    "user": ("user.k", "user.k", b"\x00binary\xff", b"changed"),
    "trusted": ("trusted.minifs", "trusted.minifs", b"t1", b"t2"),
    "security": ("security.minifs", "security.minifs", b"s1", b"s2"),
    "acl": (
        "system.posix_acl_access",
        "system.posix_acl_default",
        ACL_READ_BY_1000,
        ACL_RW_BY_2000,
    ),
}


@pytest.mark.parametrize("case", sorted(XATTR_CASES))
def test_xattr_namespace(storage, mount, case):
    if not XATTRS.get():
        pytest.skip(f"{storage.name}'s clones keep no xattrs")
    on_file, on_dir, value, changed = XATTR_CASES[case]

    def set_them(path: Path) -> None:
        for name in ("f", "g"):
            (path / name).write_text(name)
        (path / "d").mkdir()
        try:
            os.setxattr(path / "f", on_file, value)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EPERM):
                pytest.skip(f"this driver's clones refuse {on_file} xattrs: {exc.strerror}")
            raise
        os.setxattr(path / "g", on_file, value)
        os.setxattr(path / "d", on_dir, value)

    written = commit(storage, mount, "L1", change=set_them)
    assert written["f"]["xattrs"][on_file] == value
    storage.clone("c1", "L1")
    assert_same(written, seen(storage, mount, "c1"), f"{case} xattrs in a clone")

    def change_them(path: Path) -> None:
        os.removexattr(path / "f", on_file)
        os.setxattr(path / "g", on_file, changed)
        (path / "h").write_text("h")
        os.setxattr(path / "h", on_file, changed)

    written2 = commit(storage, mount, "L2", "L1", change_them)
    after = seen(storage, mount, "L2")
    assert_same(written2, after, f"{case} xattrs changed in a clone")
    assert on_file not in after["f"]["xattrs"]
    assert after["g"]["xattrs"][on_file] == changed
    assert_same(written, seen(storage, mount, "L1"), "the parent layer")


def test_special_files(storage, mount):
    def make(path: Path) -> None:
        os.mkfifo(path / "fifo", 0o600)
        os.mknod(path / "char", stat.S_IFCHR | 0o640, os.makedev(10, 200))
        os.mknod(path / "block", stat.S_IFBLK | 0o600, os.makedev(259, 3))
        os.chown(path / "block", 0, 6)

    commit(storage, mount, "L1", change=make)

    def touch_metadata(path: Path) -> None:
        os.chmod(path / "fifo", 0o666)
        os.chown(path / "char", 1000, 1000)

    commit(storage, mount, "L2", "L1", touch_metadata)
    storage.clone("c", "L2")
    with mount(storage, "c") as path:
        fifo, char, block = (os.lstat(path / n) for n in ("fifo", "char", "block"))
        assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o666
        assert stat.S_ISCHR(char.st_mode) and (char.st_uid, char.st_gid) == (1000, 1000)
        assert (os.major(char.st_rdev), os.minor(char.st_rdev)) == (10, 200)
        assert stat.S_ISBLK(block.st_mode) and block.st_gid == 6
        assert (os.major(block.st_rdev), os.minor(block.st_rdev)) == (259, 3)


def test_deletes_hidden_after_snapshot(storage, mount):
    def base(path: Path) -> None:
        for name in ("keep", "gone", "d/x", "d/y", "tree/a/b/c"):
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(name)
        os.symlink("keep", path / "link")
        os.mkfifo(path / "fifo")

    commit(storage, mount, "L1", change=base)

    def delete(path: Path) -> None:
        for name in ("gone", "d/x", "link", "fifo"):
            os.unlink(path / name)
        for top, dirs, files in os.walk(path / "tree", topdown=False):
            for name in files:
                os.unlink(os.path.join(top, name))
            for name in dirs:
                os.rmdir(os.path.join(top, name))
        os.rmdir(path / "tree")

    commit(storage, mount, "L2", "L1", delete)
    storage.clone("c2", "L2")
    with mount(storage, "c2") as path:
        assert sorted(os.listdir(path)) == ["d", "keep"]
        assert os.listdir(path / "d") == ["y"]
    storage.clone("c1", "L1")
    with mount(storage, "c1") as path:
        assert sorted(os.listdir(path)) == ["d", "fifo", "gone", "keep", "link", "tree"]


def test_type_changes(storage, mount):
    def base(path: Path) -> None:
        (path / "was-file").write_text("file")
        (path / "was-dir").mkdir()
        (path / "was-dir/inside").write_text("inside")
        os.symlink("was-file", path / "was-link")

    commit(storage, mount, "L1", change=base)

    def change(path: Path) -> None:
        os.unlink(path / "was-file")
        (path / "was-file").mkdir()
        (path / "was-file/now-inside").write_text("new")
        os.unlink(path / "was-dir/inside")
        os.rmdir(path / "was-dir")
        os.symlink("/somewhere", path / "was-dir")
        os.unlink(path / "was-link")
        (path / "was-link").write_text("now a file")

    written = commit(storage, mount, "L2", "L1", change)
    storage.clone("c", "L2")
    after = seen(storage, mount, "c")
    assert_same(written, after, "a clone after type changes")
    assert [after[p]["type"] for p in ("was-file", "was-dir", "was-link")] == [
        "dir",
        "symlink",
        "file",
    ]
    assert "was-dir/inside" not in after


def test_opaque_directory_replacement(storage, mount):
    def base(path: Path) -> None:
        (path / "dir/sub").mkdir(parents=True)
        (path / "dir/old1").write_text("old")
        (path / "dir/sub/old2").write_text("old")
        setxattr(path / "dir", "user.generation", b"1")

    commit(storage, mount, "L1", change=base)

    def replace(path: Path) -> None:
        for top, dirs, files in os.walk(path / "dir", topdown=False):
            for name in files:
                os.unlink(os.path.join(top, name))
            for name in dirs:
                os.rmdir(os.path.join(top, name))
        os.rmdir(path / "dir")
        (path / "dir").mkdir(mode=0o700)
        (path / "dir/new").write_text("new")

    commit(storage, mount, "L2", "L1", replace)
    commit(storage, mount, "L3", "L2", lambda p: (p / "dir/more").write_text("more"))
    storage.clone("c2", "L2")
    storage.clone("c3", "L3")
    two, three = seen(storage, mount, "c2"), seen(storage, mount, "c3")
    assert sorted(p for p in two if p.startswith("dir/")) == ["dir/new"]
    assert sorted(p for p in three if p.startswith("dir/")) == ["dir/more", "dir/new"]
    assert two["dir"]["mode"] == 0o700 and two["dir"]["xattrs"] == {}
    assert sorted(p for p in seen(storage, mount, "L1") if p.startswith("dir/")) == [
        "dir/old1",
        "dir/sub",
        "dir/sub/old2",
    ]


def test_clone_never_changes_parent(storage, mount):
    commit(storage, mount, "L1", change=populate)
    before = seen(storage, mount, "L1")
    storage.clone("c1", "L1")
    with mount(storage, "c1") as path:
        with open(path / "etc/hostname", "a") as f:
            f.write("appended\n")
        fd = os.open(path / "big", os.O_WRONLY)
        try:
            os.pwrite(fd, b"4mid", MiB + 3)  # a small write in the middle of a big file
        finally:
            os.close(fd)
        os.truncate(path / "with space ünïcode", 4)
        os.unlink(path / "hl/two")
        os.unlink(path / "a/b/c/d/deep")
        os.rmdir(path / "a/b/c/d")
        os.chmod(path / "bin/setuid", 0o755)
        os.chown(path / "owned", 1, 1)
        os.chmod(path / "tmp", 0o755)
        setxattr(path / "etc/hostname", "user.plain", b"changed")
        removexattr(path / "a", "user.on-a-dir")
        os.rename(path / "empty", path / "renamed")
        os.link(path / "hl/pair", path / "hl/pair3")
        os.mknod(path / "dev/new", stat.S_IFCHR | 0o600, os.makedev(1, 7))
        os.utime(path / "rel", (1, 1), follow_symlinks=False)
        (path / "brand-new").write_text("new")
        changed = treeinfo.record(path, mtimes=True)
    assert treeinfo.differences(before, changed)  # the clone did change
    assert_same(before, seen(storage, mount, "L1"), "the parent layer after clone writes")
    storage.view("v1", "L1")
    assert_same(before, seen(storage, mount, "v1"), "a view of the parent")
    storage.clone("c2", "L1")
    assert_same(before, seen(storage, mount, "c2"), "a sibling clone")
    storage.snapshot("c1", "L2")
    assert_same(before, seen(storage, mount, "L1"), "the parent after the child's snapshot")
    step = storage.driver.copy_up_mtime_ns  # files the clone's changes copied up
    assert_same(_times_to(changed, step), _times_to(seen(storage, mount, "L2"), step), "the child")


def _times_to(tree: treeinfo.Tree, step: int) -> treeinfo.Tree:
    return {
        path: {**e, "mtime_ns": e["mtime_ns"] // step * step} if "mtime_ns" in e else e
        for path, e in tree.items()
    }


def test_views_and_layers_are_read_only(storage, mount):
    commit(storage, mount, "L1", change=populate)
    storage.view("v1", "L1")
    storage.view("empty-view", None)
    for name in ("v1", "L1", "empty-view"):
        with mount(storage, name) as path:
            attempts: list[tuple[str, Callable[[], object]]] = [
                ("create", lambda p=path: (p / "new").write_text("x")),
                ("mkdir", lambda p=path: (p / "newdir").mkdir()),
            ]
            if name != "empty-view":
                attempts += [
                    ("write", lambda p=path: os.open(p / "etc/hostname", os.O_WRONLY)),
                    ("unlink", lambda p=path: os.unlink(p / "owned")),
                    ("rmdir", lambda p=path: os.rmdir(p / "tmp")),
                    ("chmod", lambda p=path: os.chmod(p / "owned", 0o777)),
                    ("chown", lambda p=path: os.chown(p / "owned", 0, 0)),
                    ("mknod", lambda p=path: os.mkfifo(p / "dev/f2")),
                ]
                if XATTRS.get():
                    attempts.append(("xattr", lambda p=path: setxattr(p / "etc", "user.x", b"x")))
            for what, attempt in attempts:
                with pytest.raises(OSError) as caught:
                    attempt()
                assert caught.value.errno == errno.EROFS, f"{what} in {name}: {caught.value}"


def test_remove_with_children_refused(storage, mount, tmp_path):
    commit(storage, mount, "L1", change=lambda p: (p / "f").write_text("1"))
    commit(storage, mount, "L2", "L1", lambda p: (p / "g").write_text("2"))
    storage.clone("c", "L2")
    storage.view("v", "L1")
    for name in ("L1", "L2"):
        with pytest.raises(InUse):
            storage.remove(name)
    (tmp_path / "mounted").mkdir()
    storage.mount("c", tmp_path / "mounted")
    try:
        with pytest.raises(InUse):
            storage.remove("c")  # mounted through minifs
    finally:
        storage.umount(tmp_path / "mounted")
    # Refusals changed nothing.
    assert {i.name for i in storage.list()} == {"L1", "L2", "c", "v"}
    assert seen(storage, mount, "c").keys() == {".", "f", "g"}
    ids = {i.name: i.id for i in storage.list()}
    for name in ("c", "L2", "v", "L1"):
        storage.remove(name)
        with pytest.raises(NotFound):
            storage.stat(name)
        assert ids[name] not in storage.driver.ids()
    assert storage.list() == []
    assert storage.driver.ids() == set()


def test_usage_grows_with_data(storage, mount):
    commit(storage, mount, "L1", change=lambda p: (p / "seed").write_text("seed"))
    for name, parent in (("fresh", None), ("on-layer", "L1")):
        storage.clone(name, parent)
        start = storage.usage(name)
        with mount(storage, name) as path:
            (path / "blob").write_bytes(os.urandom(4 * MiB))
            (path / "many").mkdir()
            for i in range(64):
                (path / "many" / str(i)).write_text(str(i))
        grown = storage.usage(name)
        assert grown.size - start.size >= 4 * MiB, (name, start, grown)
        assert grown.inodes - start.inodes >= 66, (name, start, grown)
    storage.snapshot("fresh", "L2")
    layer = storage.usage("L2")
    assert layer.size >= 4 * MiB and layer.inodes >= 66


def test_state_survives_reopening(driver, root, mount, open_storage, backend_options):
    # Opened by hand, not by the fixture, so it can really be closed mid-test.
    first = Storage(driver, root, backend_options(driver))
    try:
        commit(first, mount, "L1", change=populate)
        first.set_labels("L1", {"role": "base"})
        commit(first, mount, "L2", "L1", lambda p: (p / "second").write_text("2"))
        first.clone("c", "L2", labels={"who": "me"})
        with mount(first, "c") as path:
            (path / "unsaved").write_text("still here")
        first.view("v", "L1")
        infos = [i.to_dict() for i in first.list()]
        trees = {name: seen(first, mount, name) for name in ("L1", "L2", "c", "v")}
    except BaseException:
        first.down()
        raise
    finally:
        first.close()
    again = open_storage(driver)  # re-attaches to a backend that is still up
    assert [i.to_dict() for i in again.list()] == infos
    again.down()
    restarted = open_storage(driver)  # brings the backend up again
    assert [i.to_dict() for i in restarted.list()] == infos
    for name, tree in trees.items():
        assert_same(tree, seen(restarted, mount, name), f"{name} after reopening")
    restarted.snapshot("c", "L3")
    restarted.clone("c3", "L3")
    assert seen(restarted, mount, "c3")["unsaved"]["size"] == len("still here")


def test_options_recorded_at_first_start(driver, root, storage):
    """The image unpacker, the launcher and gc reopen the store without the
    options it was made with; the driver must find them recorded."""
    storage.clone("c")
    made_with = storage.driver.options
    assert made_with == json.loads(storage.driver.config_path.read_text())
    again = Storage(driver, root)
    try:
        again.clone("d", labels={"reopened": "yes"})
        assert again.driver.options == made_with
        assert {i.name for i in again.list()} == {"c", "d"}
    finally:
        again.close()


def test_driver_refuses_work_before_start(driver, root, backend_options):
    """A library user who skips start() gets a one-line error, not a crash on
    a backend that is not up, and nothing is made."""
    home = root / "drivers" / driver
    unstarted = get_driver(driver)(home, backend_options(driver))
    for attempt in (
        lambda: unstarted.prepare("0" * 32, []),
        lambda: unstarted.mounts("0" * 32, Kind.CLONE, []),
        unstarted.ids,
    ):
        with pytest.raises(BackendError, match="not started; call start"):
            attempt()
    assert not root.exists()


def test_labels_and_filters(storage, mount):
    storage.clone("c", labels={"a": "1", "b": "2"})
    storage.snapshot("c", "L", labels={"b": "3", "c": "4"})
    assert storage.stat("L").labels == {"a": "1", "b": "3", "c": "4"}
    storage.set_labels("L", {"a": "", "d": "5"})
    assert storage.stat("L").labels == {"b": "3", "c": "4", "d": "5"}
    storage.clone("other", "L", labels={"c": "4"})
    assert [i.name for i in storage.list({"label.c": "4"})] == ["L", "other"]
    assert [i.name for i in storage.list({"label.c": "4", "kind": "clone"})] == ["other"]
    assert storage.list({"label.a": "1"}) == []


def test_names_unique(storage, mount):
    commit(storage, mount, "L1")
    storage.clone("c", "L1")
    storage.view("v", "L1")
    before = [i.to_dict() for i in storage.list()]
    for attempt in (
        lambda: storage.clone("c", "L1"),
        lambda: storage.clone("L1"),
        lambda: storage.view("c", "L1"),
        lambda: storage.snapshot("c", "v"),
        lambda: storage.snapshot("c", "L1"),
    ):
        with pytest.raises(AlreadyExists):
            attempt()
    # Nothing half-made: the same rows, all ready, and one backend object each.
    assert [i.to_dict() for i in storage.list()] == before
    assert storage.driver.ids() == {i["id"] for i in before}
    storage.remove("v")
    storage.view("v", "L1")  # a removed name is free again
    assert storage.stat("v").kind is Kind.VIEW


def test_list_filters(storage, mount):
    commit(storage, mount, "L1")
    commit(storage, mount, "L2", "L1")
    storage.clone("c1", "L1")
    storage.clone("c2", "L2")
    storage.view("v1", "L1")
    storage.clone("e")

    def names(**filters: str) -> list[str]:
        return [i.name for i in storage.list(filters)]

    assert names() == ["L1", "L2", "c1", "c2", "v1", "e"]  # in creation order
    assert names(kind="layer") == ["L1", "L2"]
    assert names(kind="clone") == ["c1", "c2", "e"]
    assert names(kind="view") == ["v1"]
    assert names(parent="L1") == ["L2", "c1", "v1"]
    assert names(parent="L1", kind="clone") == ["c1"]
    assert names(name="c2") == ["c2"]
    infos = {i.name: i for i in storage.list()}
    assert infos["c2"].parent == "L2" and infos["c2"].parent_id == infos["L2"].id
    assert infos["e"].parent is None and infos["L1"].parent is None
    assert all(i.state is State.READY and i.driver == storage.name for i in infos.values())


WORKER = """
import json, os, sys, time
from pathlib import Path
from minifs.errors import AlreadyExists
from minifs.storage import Storage

driver, root, wid, count, mnt, go = sys.argv[1:]
storage = Storage(driver, root)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.002)
result = {"race": None, "layers": []}
try:
    storage.clone("race", "base")
    result["race"] = "won"
except AlreadyExists:
    result["race"] = "lost"
for k in range(int(count)):
    clone = f"w{wid}-c{k}"
    storage.clone(clone, "base", labels={"worker": wid})
    target = Path(mnt) / clone
    target.mkdir()
    storage.mount(clone, target)
    (target / "who").write_text(f"{wid}-{k}")
    storage.umount(target)
    result["layers"].append(storage.snapshot(clone, f"w{wid}-l{k}").id)
storage.close()
print(json.dumps(result), flush=True)
"""


def test_concurrent_processes(driver, storage, mount, root, tmp_path):
    count = 6
    commit(storage, mount, "base", change=lambda p: (p / "base").write_text("base"))
    go = tmp_path / "go"
    workers = []
    for wid in ("1", "2"):
        mnt = tmp_path / f"worker{wid}"
        mnt.mkdir()
        argv = [sys.executable, "-c", WORKER, driver, str(root), wid, str(count), str(mnt), str(go)]
        workers.append(
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        go.touch()  # both start at once
        for worker in workers:
            out, err = worker.communicate(timeout=120)
            assert worker.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert sorted(r["race"] for r in results) == ["lost", "won"]
    ids = [sid for r in results for sid in r["layers"]]
    assert len(ids) == len(set(ids)) == 2 * count
    layers = storage.list({"kind": "layer"})
    assert {i.id for i in layers} >= set(ids)
    assert all(i.state is State.READY for i in storage.list())
    assert storage.driver.ids() == {i.id for i in storage.list()}
    for wid in ("1", "2"):
        assert len(storage.list({"label.worker": wid, "kind": "layer"})) == count
    for k in (0, count - 1):
        with mount(storage, f"w2-l{k}") as path:
            assert (path / "who").read_text() == f"2-{k}"
            assert (path / "base").read_text() == "base"
    report = storage.gc(dry_run=True)
    assert not any(report.to_dict().values()), report


def test_deep_chain(storage, mount):
    depth = 20
    parent = None
    for i in range(depth):

        def step(path: Path, i: int = i) -> None:
            (path / f"f{i}").write_text(f"layer {i}")
            (path / "counter").write_text(str(i))
            if i:
                os.unlink(path / f"tmp{i - 1}")
            (path / f"tmp{i}").write_text("temporary")
            (path / "dirs" / str(i)).mkdir(parents=True)

        commit(storage, mount, f"L{i}", parent, step)
        parent = f"L{i}"
    storage.clone("top", parent)
    with mount(storage, "top") as path:
        for i in range(depth):
            assert (path / f"f{i}").read_text() == f"layer {i}"
        assert (path / "counter").read_text() == str(depth - 1)
        assert sorted(p.name for p in path.glob("tmp*")) == [f"tmp{depth - 1}"]
        assert len(os.listdir(path / "dirs")) == depth
    storage.view("middle", "L9")
    with mount(storage, "middle") as path:
        assert sorted(p.name for p in path.glob("f*")) == sorted(f"f{i}" for i in range(10))
        assert (path / "counter").read_text() == "9"
