"""The aufs driver on unionfs-fuse: what the shared suites do not look at.

Its branches hold the engine's own whiteout records and `minifs diff` turns
them into OCI whiteouts (and back, through an apply) reproducibly; copy-up is
whole-file; every union is a daemon of its own that goes with its clone and
with `minifs down`, a dead one included; the layer limit is the engine's;
xattrs, which this engine cannot keep, are refused rather than lost.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from minifs import linux
from minifs.errors import MinifsError, TooManyLayers
from minifs.model import Kind
from minifs.plugins import get_driver
from minifs.resources import process_start_time
from minifs.storage import Storage
from tests.conftest import bring_down, refused

MiB = 1 << 20


def _skip_unless_aufs() -> None:
    wanted = os.environ.get("MINIFS_TEST_DRIVERS")
    if wanted and "aufs" not in wanted.split(","):
        pytest.skip("aufs is not in MINIFS_TEST_DRIVERS")
    try:
        get_driver("aufs").probe()
    except MinifsError as exc:
        pytest.skip(f"aufs: {exc}")


pytestmark = pytest.mark.usefixtures("aufs_runs")


@pytest.fixture
def aufs_runs() -> None:
    _skip_unless_aufs()


@pytest.fixture
def storage(open_storage: Callable[..., Storage]) -> Storage:
    return open_storage("aufs")


def _daemons(storage: Storage) -> dict[str, int]:
    """Snapshot id -> pid of every union daemon the driver has recorded."""
    run_dir = storage.driver.home / "run" / "unionfs"
    found = {}
    for sid in sorted(os.listdir(run_dir)) if run_dir.exists() else []:
        record = storage.driver._union(sid).resources.find("unionfs")
        if record and process_start_time(record["pid"]) == record["start_time"]:
            found[sid] = record["pid"]
    return found


def _diff(storage: Storage, name: str) -> bytes:
    from minifs.layers.snapshots import diff_of

    out = io.BytesIO()
    diff_of(storage, name, out)
    return out.getvalue()


def _base(storage: Storage, mount: Callable) -> None:
    """Layer `base`: files, a deep file, a directory to replace, a big file."""
    storage.clone("w", None)
    with mount(storage, "w") as path:
        (path / "keep").write_text("keep")
        (path / "gone").write_text("gone")
        (path / "d/sub").mkdir(parents=True)
        (path / "d/sub/deep").write_text("deep")
        (path / "d/sibling").write_text("sibling")
        (path / "big").write_bytes(b"\0" * (8 * MiB))
    storage.snapshot("w", "base")


def test_whiteouts_in_the_branch_and_as_oci(storage: Storage, mount: Callable) -> None:
    _base(storage, mount)
    storage.clone("c", "base")
    with mount(storage, "c") as path:
        os.unlink(path / "gone")
        for name in ("deep",):
            os.unlink(path / "d/sub" / name)
        os.rmdir(path / "d/sub")
        (path / "d/sub").mkdir()  # made again: nothing below may show through
        (path / "d/sub/new").write_text("new")
        assert sorted(os.listdir(path)) == ["big", "d", "keep"]
        assert sorted(os.listdir(path / "d/sub")) == ["new"]
    branch = storage.driver.dir(storage.stat("c").id)
    records = sorted(
        str(p.relative_to(branch / ".unionfs-fuse")) for p in (branch / ".unionfs-fuse").rglob("*")
    )
    assert "gone_HIDDEN~" in records and "d/sub_HIDDEN~" in records, records

    tar = _diff(storage, "c")
    assert tar == _diff(storage, "c"), "the diff of one clone differs between two runs"
    with tarfile.open(fileobj=io.BytesIO(tar)) as layer:
        names = set(layer.getnames())
    assert ".wh.gone" in names and "d/sub/new" in names, names
    assert not any(".unionfs-fuse" in n or "_HIDDEN~" in n for n in names), names

    # Committed, the records keep hiding what lies below.
    storage.snapshot("c", "top")
    storage.clone("child", "top")
    with mount(storage, "child") as path:
        assert not (path / "gone").exists()
        assert sorted(os.listdir(path / "d/sub")) == ["new"]


def test_diff_applies_back(storage: Storage, mount: Callable) -> None:
    """An apply sets the times of the directories it deletes from, which on a
    directory only a lower branch holds makes unionfs-fuse 1.0 copy the whole
    directory up, deleted entries included (see copy_directories)."""
    from minifs.layers.snapshots import apply_to

    _base(storage, mount)
    storage.clone("c", "base")
    with mount(storage, "c") as path:
        os.unlink(path / "d/sub/deep")
    tar = _diff(storage, "c")
    storage.clone("again", "base")
    apply_to(storage, "again", io.BytesIO(tar))
    with mount(storage, "again") as path:
        assert sorted(os.listdir(path / "d/sub")) == []
    assert _diff(storage, "again") == tar


def test_directory_changes_copy_up_nothing(storage: Storage, mount: Callable) -> None:
    _base(storage, mount)
    storage.clone("c", "base")
    with mount(storage, "c") as path:
        os.unlink(path / "d/sub/deep")
        os.chmod(path / "d/sub", 0o700)
        os.utime(path / "d", (1, 1))
        os.chown(path / "d", 1000, 1000)
        assert os.listdir(path / "d/sub") == []
        assert os.stat(path / "d").st_uid == 1000
    branch = storage.driver.dir(storage.stat("c").id)
    files = [p for p in branch.rglob("*") if p.is_file() and ".unionfs-fuse" not in p.parts]
    assert files == []  # neither 'deep' back nor 'sibling' copied along with its directory


@pytest.mark.xfail(
    strict=True,
    reason="unionfs-fuse 1.0 has no redirect for a renamed directory: the files lower "
    "layers hold for it stay behind, hidden, and the new name shows only the clone's own",
)
def test_directory_rename_keeps_lower_files(storage: Storage, mount: Callable) -> None:
    _base(storage, mount)
    storage.clone("c", "base")
    with mount(storage, "c") as path:
        os.rename(path / "d", path / "moved")
        assert sorted(os.listdir(path / "moved")) == ["sibling", "sub"]


def test_crash_in_prepare_is_rolled_back(cli: Callable) -> None:
    cli("clone", "w", "--driver", "aufs", check=True)
    cli("snapshot", "w", "base", "--driver", "aufs", check=True)
    env = {"MINIFS_FAILPOINT": "aufs:prepare-partial"}
    killed = cli("clone", "new", "--from", "base", "--driver", "aufs", env=env)
    assert killed.returncode == -signal.SIGKILL
    done = cli("gc", "--driver", "aufs", check=True)
    assert "roll back clone new" in done.stdout, done.stdout
    cli("clone", "new", "--from", "base", "--driver", "aufs", check=True)


def test_full_disk_still_stops_and_removes(tmpfs: Callable, mount: Callable) -> None:
    """A union's daemon is stopped, and its clone removed, on a disk so full
    that the daemon's record cannot be rewritten."""
    with Storage("aufs", tmpfs("full", "size=6m")) as storage:
        try:
            storage.clone("c", None)
            with mount(storage, "c") as path:
                pid = _daemons(storage)[storage.stat("c").id]
                with pytest.raises(OSError) as exc, open(path / "fill", "wb") as f:
                    while True:
                        f.write(b"x" * MiB)
                        f.flush()
                assert exc.value.errno == errno.ENOSPC
            storage.driver.unmounted(storage.stat("c").id)  # no reserve let go for it
            assert process_start_time(pid) is None and _daemons(storage) == {}
            storage.remove("c")
        finally:
            bring_down(storage)


def test_copy_up_is_whole_file(storage: Storage, mount: Callable) -> None:
    _base(storage, mount)
    storage.clone("c", "base")
    with mount(storage, "c") as path:
        fd = os.open(path / "big", os.O_WRONLY)
        try:
            os.pwrite(fd, b"4mid", 4 * MiB)
        finally:
            os.close(fd)
    copied = storage.driver.dir(storage.stat("c").id) / "big"
    assert copied.stat().st_size == 8 * MiB
    assert storage.usage("c").size >= 8 * MiB  # the whole file, for a 4-byte write
    with open(storage.driver.dir(storage.stat("base").id) / "big", "rb") as f:
        f.seek(4 * MiB)
        assert f.read(4) == b"\0\0\0\0"  # the layer itself never changes


def test_a_daemon_per_union_and_none_left(storage: Storage, mount: Callable) -> None:
    _base(storage, mount)
    storage.clone("c", "base")
    sid = storage.stat("c").id
    with mount(storage, "c") as path:
        (path / "f").write_text("f")
        pid = _daemons(storage)[sid]
        assert (path / "f").read_text() == "f"
    storage.driver.unmounted(sid)
    assert sid not in _daemons(storage) and process_start_time(pid) is None
    assert not linux.is_mountpoint(storage.driver.mnt_dir / sid)

    # A killed daemon leaves a dead mount; the next mount replaces it.
    with mount(storage, "c") as path:
        os.kill(_daemons(storage)[sid], signal.SIGKILL)
        time.sleep(0.1)
        with pytest.raises(OSError):
            os.listdir(path)
    with mount(storage, "c") as path:
        assert (path / "f").read_text() == "f"

    # commit stops the clone's writer; the layer gets a read-only one.
    storage.snapshot("c", "L")
    assert sid not in _daemons(storage)
    with mount(storage, "L") as path:
        with pytest.raises(OSError) as exc:
            (path / "g").write_text("g")
        assert exc.value.errno == errno.EROFS
    storage.clone("c2", "L")
    with mount(storage, "c2"):
        assert len(_daemons(storage)) == 2
    storage.remove("c2")
    assert list(_daemons(storage)) == [storage.stat("L").id]
    storage.down()
    assert _daemons(storage) == {}
    assert not [e for e in linux.mountinfo() if e.source.startswith("minifs-aufs:")
                and e.target.startswith(str(storage.driver.home))]  # fmt: skip


def test_xattrs_refused_not_lost(storage: Storage, mount: Callable) -> None:
    """unionfs-fuse 1.0 (Debian) has no xattr support: a write says so."""
    storage.clone("c", None)
    with mount(storage, "c") as path:
        (path / "f").write_text("f")
        with pytest.raises(OSError) as exc:
            os.setxattr(path / "f", "user.k", b"v")
        assert exc.value.errno == errno.EOPNOTSUPP


def test_layer_limit_is_the_engines(storage: Storage) -> None:
    """As many lower branches as one unionfs-fuse argument holds mount (the
    bottom one's file read through all of them); one more is refused."""
    driver = storage.driver
    limit = driver.max_depth
    assert limit is not None
    storage.clone("probe", None)  # brings the driver up in its home
    ids = [f"{i:032x}" for i in range(1, limit + 3)]
    driver.prepare(ids[0], [])
    (driver.dir(ids[0]) / "bottom").write_text("found")
    for sid in ids[1:]:
        os.mkdir(driver.dir(sid))  # empty branches; prepare would only add time
    top, lowers = ids[-1], ids[:-1][::-1]
    try:
        [record] = driver.mounts(top, Kind.CLONE, lowers[1:])  # the limit exactly
        assert (Path(record.source) / "bottom").read_text() == "found"
        driver.remove(top)
        with pytest.raises(TooManyLayers, match="flatten"):
            driver.mounts(ids[-2], Kind.CLONE, [*lowers[1:], f"{0:032x}"])
    finally:
        for sid in ids:
            driver.remove(sid)


def test_bad_root_refused(cli: Callable, tmp_path: Path) -> None:
    bad = tmp_path / "a,b"
    done = cli("--root", str(bad), "clone", "x", "--driver", "aufs")
    refused(done, "aufs", "','")
    assert not bad.exists()
