"""Never lose a layer: a damaged store is refused (not emptied), damage behind
minifs's back is named, a killed apply is known, a full disk is survived.

Each test drives the real CLI on every driver the conformance suite runs, with
real mounts; the state dir is damaged the way an operator or a crash would.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from minifs import linux
from minifs_drivers.devicemapper import pool_request
from tests.conftest import MINIFS, driver_params, refused
from tests.test_cli import on_driver

pytestmark = pytest.mark.parametrize("driver", driver_params())

Cli = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def run(driver: str, cli: Cli) -> Iterator[Cli]:
    """The CLI on `driver`; its backend is taken down at the end."""
    yield on_driver(cli, driver)
    cli("down")


def layer_tar(files: dict[str, bytes], opaque_root: bool = False) -> bytes:
    """A small OCI layer tar holding `files` (and `.wh..wh..opq` first if asked)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        names = ([".wh..wh..opq"] if opaque_root else []) + sorted(files)
        for name in names:
            data = files.get(name, b"")
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def make_layer(run: Cli, tmp_path: Path, name: str, files: dict[str, bytes], parent=None) -> str:
    """Layer `name` holding `files`; returns its diff_id (its content's fingerprint)."""
    tar = tmp_path / f"{name}.tar"
    tar.write_bytes(layer_tar(files))
    run("clone", f"{name}.wip", *(["--from", parent] if parent else []), check=True)
    run("apply", f"{name}.wip", str(tar), check=True)
    run("snapshot", f"{name}.wip", name, check=True)
    return diff_id(run, name)


def diff_id(run: Cli, name: str) -> str:
    done = run("diff", name, "-o", os.devnull, "--json", check=True)
    return json.loads(done.stdout)["diff_id"]


def listed(run: Cli) -> dict[str, dict]:
    return {i["name"]: i for i in json.loads(run("ls", "--json", check=True).stdout)}


def snapshot_id(run: Cli, name: str) -> str:
    return listed(run)[name]["id"]


def seen(run: Cli, name: str, where: Path) -> dict[str, bytes]:
    """The files a snapshot shows, read through a real mount."""
    where.mkdir(exist_ok=True)
    run("mount", name, str(where), check=True)
    try:
        return {
            str(p.relative_to(where)): p.read_bytes()
            for p in sorted(where.rglob("*"))
            if p.is_file()
        }
    finally:
        run("umount", str(where), check=True)


# -- 1, 2: a damaged store is refused, and can be rebuilt ------------------------------


def test_emptied_store_is_refused_and_rebuilt(driver, run, root, tmp_path):
    base = make_layer(run, tmp_path, "base", {"a": b"A" * 5000})
    top = make_layer(run, tmp_path, "top", {"b": b"B"}, parent="base")
    run("clone", "work", "--from", "top", "--label", "keep=me", check=True)
    before = listed(run)
    db = root / "metadata.db"

    for damage in ("truncate", "remove", "replace"):
        saved = db.read_bytes()
        if damage == "truncate":
            db.write_bytes(b"")
        elif damage == "remove":
            db.unlink()
        else:  # another state dir's store put in its place
            other = tmp_path / f"other-{driver}"
            subprocess.run([MINIFS, "--root", str(other), "clone", "x"], check=True,
                           capture_output=True)  # fmt: skip
            db.write_bytes((other / "metadata.db").read_bytes())
            subprocess.run([MINIFS, "--root", str(other), "rm", "x"], check=True)
            subprocess.run([MINIFS, "--root", str(other), "down"], check=True)
        for wal in (root / "metadata.db-wal", root / "metadata.db-shm"):
            wal.unlink(missing_ok=True)
        for argv in (("ls",), ("clone", "q"), ("gc",), ("gc", "--dry-run"), ("check",)):
            refused(run(*argv), "metadata store", "check --rebuild")
        # Nothing was taken for an orphan: every layer is still in its driver.
        db.write_bytes(saved)
        assert listed(run) == before, damage
        assert diff_id(run, "base") == base and diff_id(run, "top") == top

    db.write_bytes(b"")
    done = run("check", "--rebuild", check=True)
    assert f"{driver}: restored 3 snapshot(s)" in done.stdout
    after = listed(run)
    assert {n: (i["kind"], i["parent"], i["labels"]) for n, i in after.items()} == {
        n: (i["kind"], i["parent"], i["labels"]) for n, i in before.items()
    }
    assert diff_id(run, "base") == base and diff_id(run, "top") == top
    assert run("check").returncode == 0
    assert "nothing to do" in run("gc", check=True).stdout
    assert seen(run, "work", tmp_path / "w") == {"a": b"A" * 5000, "b": b"B"}


def test_garbage_store_fails_gc(driver, run, root, tmp_path):
    make_layer(run, tmp_path, "base", {"a": b"A"})
    db = root / "metadata.db"
    run("gc", check=True)  # checkpoint: the whole store is in metadata.db
    whole = db.read_bytes()
    for damaged in (os.urandom(len(whole)), whole[:100]):
        db.write_bytes(damaged)
        for wal in (root / "metadata.db-wal", root / "metadata.db-shm"):
            wal.unlink(missing_ok=True)
        for argv in (("gc",), ("gc", "--dry-run"), ("check",), ("ls",)):
            refused(run(*argv), "metadata store")
        assert db.read_bytes() == damaged
    db.write_bytes(whole)
    assert diff_id(run, "base")


# -- 3: damage behind minifs's back is named ---------------------------------------


def test_deleted_layer_is_reported_with_its_dependents(driver, run, root, tmp_path):
    make_layer(run, tmp_path, "base", {"a": b"A"})
    make_layer(run, tmp_path, "top", {"b": b"B"}, parent="base")
    run("clone", "work", "--from", "top", check=True)
    assert run("check").returncode == 0
    destroy_behind_back(driver, root / "drivers" / driver, snapshot_id(run, "base"))
    for argv in (("check",), ("gc", "--dry-run"), ("gc",)):
        done = run(*argv)
        assert done.returncode == 1, (argv, done.stdout, done.stderr)
        line = next(x for x in done.stdout.splitlines() if "base" in x)
        assert "damaged" in line and "top" in line and "work" in line, line
    refused(run("clone", "again", "--from", "base"), "layer base", "damaged", "minifs check")
    (tmp_path / "m").mkdir()
    refused(run("mount", "base", str(tmp_path / "m")), "layer base", "damaged")
    # The way out: remove the dependents and the damaged layer, then all is well.
    run("rm", "work", "top", "base", check=True)
    assert run("check").returncode == 0


def destroy_behind_back(driver: str, home: Path, sid: str) -> None:
    """What a careless operator does to one layer's data with the backend's own
    tools: `zfs destroy`, `btrfs subvolume delete`, the thin pool's delete, or
    `rm -rf` (of the object, not of where minifs mounts it)."""
    if driver == "zfs":
        argv = ["zfs", "list", "-H", "-o", "name", "-t", "filesystem"]
        names = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
        dataset = next(n for n in names if n.endswith("/" + sid))
        for _ in range(50):  # zfs-fuse: "dataset is busy" for a moment after an unmount
            if subprocess.run(["zfs", "destroy", "-R", "-f", dataset]).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"cannot destroy {dataset}")
    if driver == "devicemapper":  # as `umount`, `dmsetup remove`, `dmsetup message POOL 0 delete`
        if linux.is_mountpoint(home / "mnt" / sid):  # inspect mounted it to give its records
            linux.umount(home / "mnt" / sid)
        listed = ["losetup", "--noheadings", "-O", "NAME", "-j", str(home / "devices" / sid)]
        for device in subprocess.run(listed, capture_output=True, text=True).stdout.split():
            subprocess.run(["losetup", "--detach", device], check=True)
        answer = pool_request(home / "devices", {"op": "delete", "name": sid})
        assert "ok" in answer, answer
        return
    found = [
        p
        for p in home.rglob(sid)
        if p.is_dir() and not {"records", "mnt", "run"} & set(p.relative_to(home).parts)
    ]
    assert found, f"no directory of {sid} under {home}"
    if driver == "btrfs":
        subprocess.run(["btrfs", "subvolume", "delete", str(found[0])], check=True,
                       capture_output=True)  # fmt: skip
    else:
        subprocess.run(["rm", "-rf", str(found[0])], check=True)


# -- 4: a killed apply is known ---------------------------------------------------------


def test_killed_apply_leaves_a_partial_clone(driver, run, tmp_path):
    make_layer(run, tmp_path, "base", {"keep": b"K", "gone": b"G"})
    run("clone", "work", "--from", "base", check=True)
    files = {f"f{i}": os.urandom(4096) for i in range(50)}
    files["big"] = os.urandom(4 << 20)
    tar = tmp_path / "layer.tar"
    tar.write_bytes(layer_tar(files))
    other = tmp_path / "other.tar"
    other.write_bytes(layer_tar({"x": b"x"}))

    killed = run("apply", "work", str(tar), env={"MINIFS_FAILPOINT": "apply:after-intent"})
    assert killed.returncode == -signal.SIGKILL
    assert listed(run)["work"]["state"] == "applying"
    planned = run("gc", "--dry-run")
    assert "mark clone work partly applied" in planned.stdout
    done = run("gc")
    assert done.returncode == 1 and "cannot fix: clone work is partly applied" in done.stdout
    assert listed(run)["work"]["state"] == "partial"
    assert run("check").returncode == 1

    refused(run("snapshot", "work", "L"), "partly applied", "apply that layer again")
    refused(run("apply", "work", str(other)), "partly applied")
    run("apply", "work", str(tar), check=True)  # the same layer finishes it
    assert listed(run)["work"]["state"] == "ready"
    assert run("check").returncode == 0
    run("snapshot", "work", "L", check=True)
    assert seen(run, "L", tmp_path / "m") == {"gone": b"G", "keep": b"K", **files}


# -- 5: helpers die with the command --------------------------------------------------


def test_killed_clone_leaves_no_helper(driver, run, root, tmp_path):
    files = {f"d{i // 500}/f{i}": b"x" * 64 for i in range(6000)}
    make_layer(run, tmp_path, "base", files)
    for delay in (0.3, 0.45, 0.6):
        proc = subprocess.Popen(
            [MINIFS, "clone", "c", "--from", "base"],
            env={**os.environ, "MINIFS_ROOT": str(root),
                 "MINIFS_DRIVER": driver},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        helpers = children_of(proc.pid, until=time.monotonic() + delay)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in helpers) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not [pid for pid in helpers if alive(pid)], "a helper outlived its command"
        done = run("gc")
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr and "b'" not in done.stderr
        made = listed(run).get("c")
        if made is not None:  # the clone finished before the kill (a CoW clone is quick)
            assert made["state"] == "ready", made
            run("rm", "c", check=True)
    assert run("check").returncode == 0


def children_of(pid: int, until: float) -> set[int]:
    """Every child `pid` starts before `until`."""
    found: set[int] = set()
    while time.monotonic() < until:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == pid:
                    found.add(int(entry))
        time.sleep(0.005)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# -- 6: a full disk ---------------------------------------------------------------------


def test_full_state_disk_is_survived(driver, cli, tmpfs, tmp_path):
    small = tmpfs("small", "size=20m")
    state = small / "state"

    def run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
        return cli(*args, env={"MINIFS_ROOT": str(state), "MINIFS_DRIVER": driver}, check=check)

    try:
        first = run("clone", "c1")
        if first.returncode != 0:
            # A backend on a sparse image (a zpool, a btrfs image) never gets one
            # larger than the disk can hold: refused up front, nothing half-made.
            refused(first, "needs at least", "to spare")
            assert listed(run) == {}
            assert not list(state.glob("drivers/*/*.img")) + list(state.glob("drivers/*/pool/*"))
            return
        big = tmp_path / "big.tar"
        big.write_bytes(
            layer_tar({"blob": os.urandom(50 << 20)} | {f"f{i}": b"f" for i in range(50)})
        )
        refused(run("apply", "c1", str(big)), "disk full", "apply the same layer again")
        assert listed(run)["c1"]["state"] == "partial"
        for argv in (("clone", "c2"), ("mount", "c1", str(tmp_path)), ("ls",), ("check",)):
            done = run(*argv)
            assert "Traceback" not in done.stderr, (argv, done.stderr)
            assert len(done.stderr.splitlines()) <= 1, (argv, done.stderr)
        run("umount", str(tmp_path))
        run("rm", "c1", check=True)  # deleting frees space, and always gets through
        run("rm", "c2")
        assert run("check").returncode == 0, run("check").stdout
        run("clone", "c3", check=True)
        run("rm", "c3", check=True)
    finally:
        if linux.is_mountpoint(tmp_path):
            linux.umount(tmp_path, linux.MNT_DETACH)
        run("down")


def test_clone_failing_on_a_full_driver_disk_leaves_nothing(driver, tmpfs, tmp_path):
    """A clone stopped by a full disk at any of its steps (the intent's record,
    the backend's work, the record saying it is ready) says so in one line and
    is undone in the same command: no row left creating (the process itself could not remove it),
    no torn record, no empty record directory. The driver's home is a tmpfs
    given one more inode each try, until the clone fits."""
    from minifs.errors import MinifsError
    from minifs.storage import Storage

    if driver not in ("vfs", "overlay2", "aufs"):
        pytest.skip(f"{driver} keeps its snapshots in an image or pool of its own")
    root = tmp_path / "state"
    (root / "drivers").mkdir(parents=True)
    home = tmpfs(f"state/drivers/{driver}", "size=8m,nr_inodes=1000")

    def inodes() -> int:
        st = os.statvfs(home)
        return st.f_files - st.f_ffree

    with Storage(driver, root) as storage:
        storage.clone("base")
        storage.snapshot("base", "layer")
        storage.clone("warm", "layer")  # what a driver keeps once it has cloned at all
        storage.remove("warm")
        used = inodes()
        failures = []
        for spare in range(40):
            subprocess.run(["mount", "-o", f"remount,nr_inodes={used + spare}", home], check=True)
            try:
                storage.clone("c", "layer")
            except MinifsError as exc:  # one line, whichever step met the full disk
                assert "[Errno" not in str(exc), (spare, exc)  # not a raw OSError's text
                failures.append(str(exc))
                assert storage.find("c") is None, (spare, exc)
                assert inodes() == used, (spare, exc)
                continue
            storage.remove("c")
            break
        else:
            pytest.fail("the clone never fit")
        assert len(failures) >= 3, failures  # the record, the backend and the ready record
        assert [i.name for i in storage.list()] == ["layer"]
        storage.down()


# -- 7: one clone, one mount -----------------------------------------------------------


def test_clone_mounted_once(driver, run, tmp_path):
    run("clone", "c1", check=True)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    run("mount", "c1", str(first), check=True)
    try:
        refused(run("mount", "c1", str(second)), "c1 again", str(first))
        assert not linux.is_mountpoint(second)
    finally:
        run("umount", str(first), check=True)
    run("mount", "c1", str(second), check=True)
    run("umount", str(second), check=True)


# -- 10: a layer whose root is opaque hides everything below ----------------------------


def test_opaque_root_hides_lower_layers(driver, run, tmp_path):
    make_layer(run, tmp_path, "base", {"old": b"old", "dir/inner": b"i"})
    run("clone", "c", "--from", "base", check=True)
    tar = tmp_path / "opaque.tar"
    tar.write_bytes(layer_tar({"new": b"new"}, opaque_root=True))
    run("apply", "c", str(tar), check=True)
    assert seen(run, "c", tmp_path / "m1") == {"new": b"new"}
    before = diff_id(run, "c")
    run("snapshot", "c", "L", check=True)
    assert diff_id(run, "L") == before  # the diff is reproducible
    run("clone", "child", "--from", "L", check=True)
    assert seen(run, "child", tmp_path / "m2") == {"new": b"new"}
    assert seen(run, "L", tmp_path / "m3") == {"new": b"new"}
    # Its own diff, applied to a fresh clone of the same parent, gives the same tree.
    out = tmp_path / "again.tar"
    run("diff", "L", "-o", str(out), check=True)
    run("clone", "again", "--from", "base", check=True)
    run("apply", "again", str(out), check=True)
    assert seen(run, "again", tmp_path / "m4") == {"new": b"new"}
