"""The devicemapper driver's own promises, beyond the shared suites: its pool's
state moves to kernel dm-thin through the real thin-provisioning-tools, and
SIGKILLs of its FUSE daemon (mid-write, mid-snapshot, mid-clone) lose no
committed layer. Everything through the real CLI, daemon, loop devices, ext4."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from minifs.plugins import registered
from minifs.resources import process_start_time
from tests.conftest import MINIFS, driver_params, refused

DM = next((p for p in driver_params() if p.values[0] == "devicemapper"), None)
pytestmark = pytest.mark.skipif(
    DM is None or bool(DM.marks), reason="the devicemapper driver is not run here"
)
OPTS = ("--storage-opt", "devicemapper.datasize=1G", "--storage-opt", "devicemapper.basesize=256M")
MiB = 1 << 20


@pytest.fixture
def dm(cli):
    """`dm(args...)`: the CLI on the devicemapper driver (its first start makes a
    1G pool with 256M clones); `minifs down` at the end, by the cli fixture."""

    def run(*args: str, env: dict[str, str] | None = None, check: bool = False):
        return cli(*args, *OPTS, env={"MINIFS_DRIVER": "devicemapper", **(env or {})}, check=check)

    return run


def home(root: Path) -> Path:
    return root / "drivers" / "devicemapper"


def write_layer(dm, tmp_path: Path, name: str, files: dict[str, bytes], parent=None) -> None:
    """Layer `name`: a clone of `parent` with `files` written, committed."""
    dm("clone", f"{name}.wip", *(["--from", parent] if parent else []), check=True)
    target = tmp_path / f"{name}.mnt"
    target.mkdir()
    dm("mount", f"{name}.wip", str(target), check=True)
    for rel, data in files.items():
        (target / rel).write_bytes(data)
    dm("umount", str(target), check=True)
    dm("snapshot", f"{name}.wip", name, check=True)


def read_back(dm, tmp_path: Path, name: str, rels) -> dict[str, bytes]:
    target = tmp_path / f"read-{name}-{time.monotonic_ns()}"
    target.mkdir()
    dm("mount", name, str(target), check=True)
    try:
        return {rel: (target / rel).read_bytes() for rel in rels}
    finally:
        dm("umount", str(target), check=True)


def daemon_pid(root: Path) -> int:
    records = json.loads((home(root) / "run" / "resources.json").read_text())
    record = next(r for r in records if r["key"] == "daemon")
    assert process_start_time(record["pid"]) == record["start_time"]
    return record["pid"]


def gc_clean(dm) -> dict:
    done = dm("gc", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)["devicemapper"]


def test_dump_restores_into_kernel_metadata_that_thin_check_accepts(dm, tmp_path, root):
    """Three snapshot generations, a clone with its own writes and a view:
    thin_restore makes dm-thin metadata of the dump, thin_check accepts it,
    and thin_dump reads back the same devices and mappings."""
    write_layer(dm, tmp_path, "g1", {"a": os.urandom(3 * MiB)})
    write_layer(dm, tmp_path, "g2", {"b": os.urandom(MiB)}, parent="g1")
    write_layer(dm, tmp_path, "g3", {"a": b"rewritten"}, parent="g2")
    dm("clone", "work", "--from", "g3", check=True)
    dm("view", "look", "--from", "g1", check=True)
    xml = tmp_path / "pool.xml"
    dm("thin", "dump", "-o", str(xml), check=True)
    text = xml.read_text()
    assert dm("thin", "dump", check=True).stdout == text
    devices = re.findall(r'<device dev_id="(\d+)" mapped_blocks="(\d+)"', text)
    assert len(devices) == 1 + 3 + 1 + 1  # the base, three layers, the clone, the view

    metadata = tmp_path / "metadata"
    with open(metadata, "wb") as f:
        f.truncate(64 * MiB)  # thin_restore writes into an existing file
    for argv in (
        ["thin_restore", "-i", str(xml), "-o", str(metadata)],
        ["thin_check", str(metadata)],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
    back = subprocess.run(["thin_dump", str(metadata)], capture_output=True, text=True, check=True)
    assert re.findall(r'<device dev_id="(\d+)" mapped_blocks="(\d+)"', back.stdout) == devices
    assert 'data_block_size="128"' in back.stdout  # 64 KiB in sectors


def test_daemon_killed_mid_write_loses_no_committed_layer(dm, tmp_path, root):
    files = {"keep": os.urandom(2 * MiB), "small": b"committed"}
    write_layer(dm, tmp_path, "base", files)
    dm("clone", "work", "--from", "base", check=True)
    target = tmp_path / "work"
    target.mkdir()
    dm("mount", "work", str(target), check=True)
    writer = subprocess.Popen(
        ["dd", "if=/dev/urandom", f"of={target / 'big'}", "bs=1M", "count=200", "oflag=direct"],
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(0.3)
        os.kill(daemon_pid(root), signal.SIGKILL)
        assert writer.wait(timeout=60) != 0, "the write should fail with its device gone"
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        writer.stderr.close()  # type: ignore[union-attr]
    dm("umount", str(target), check=True)  # the bind goes; the dead ext4 below is minifs's

    # The next command restarts the daemon; every committed layer is whole.
    assert read_back(dm, tmp_path, "base", files) == files
    dm("snapshot", "work", "after", check=True)  # its ext4 journal replayed on commit
    assert read_back(dm, tmp_path, "after", files) == files
    assert gc_clean(dm)["damaged"] == []


@pytest.mark.parametrize(
    ("point", "argv", "name"),
    [
        ("thin:set-before-commit", ("snapshot", "work", "new"), "work"),
        ("thin:snap-before-commit", ("clone", "new", "--from", "base"), "new"),
    ],
    ids=["mid-snapshot", "mid-clone"],
)
def test_daemon_killed_mid_operation_then_gc(dm, tmp_path, root, point, argv, name):
    """The daemon dies after changing its memory, before committing: the
    command fails in one line, gc restarts the daemon and rolls the
    operation forward (snapshot) or back (clone) from committed metadata."""
    files = {"f": b"base file"}
    write_layer(dm, tmp_path, "base", files)
    dm("clone", "work", "--from", "base", check=True)
    dm("down", check=True)  # the next command starts the daemon, with the failpoint set
    done = dm(*argv, env={"MINIFS_FAILPOINT": point})
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1 and "thin pool daemon" in done.stderr
    report = gc_clean(dm)
    assert len(report["recovered"]) == 1 and name in report["recovered"][0], report
    assert gc_clean(dm) == {**report, "recovered": []}
    assert read_back(dm, tmp_path, "base", files) == files
    listed = {i["name"]: i["kind"] for i in json.loads(dm("ls", "--json", check=True).stdout)}
    if point.startswith("thin:set"):  # rolled forward: the clone is the layer now
        assert listed == {"base": "layer", "new": "layer"}
        dm("clone", "work", "--from", "new", check=True)
    else:  # rolled back: the name is free again
        assert listed == {"base": "layer", "work": "clone"}
        dm(*argv, check=True)


def test_damaged_pool_metadata_is_refused_in_one_line(dm, tmp_path, root):
    dm("clone", "c", check=True)
    dm("down", check=True)
    checkpoint = home(root) / "pool" / "metadata" / "checkpoint"
    raw = bytearray(checkpoint.read_bytes())
    raw[-1] ^= 0xFF
    checkpoint.write_bytes(bytes(raw))
    line = refused(dm("clone", "d"), "checksum", str(checkpoint), code=2)
    assert "restore it" in line
    assert not any(
        r["key"] == "daemon" and process_start_time(r["pid"]) == r["start_time"]
        for r in json.loads((home(root) / "run" / "resources.json").read_text() or "[]")
    )


def test_full_pool_fails_the_write_not_the_pool(cli, tmp_path, root):
    """A 64M pool under a 256M clone: the clone's write fails at the pool's
    end; the pool and its committed layer stay whole, and removing the clone
    gives the blocks back."""
    opts = (
        "--storage-opt",
        "devicemapper.datasize=64M",
        "--storage-opt",
        "devicemapper.basesize=256M",
    )

    def dm(*args: str, check: bool = False):
        return cli(*args, *opts, env={"MINIFS_DRIVER": "devicemapper"}, check=check)

    files = {"f": os.urandom(MiB)}
    write_layer(dm, tmp_path, "base", files)
    dm("clone", "hog", "--from", "base", check=True)
    target = tmp_path / "hog"
    target.mkdir()
    dm("mount", "hog", str(target), check=True)
    try:
        with pytest.raises(OSError), open(target / "fill", "wb") as f:
            for _ in range(100):
                f.write(os.urandom(MiB))
            os.fsync(f.fileno())
    finally:
        dm("umount", str(target), check=True)
    assert read_back(dm, tmp_path, "base", files) == files
    # Another clone cannot even mount (ext4 writes its superblock): said in one line.
    dm("clone", "late", "--from", "base", check=True)
    (tmp_path / "late").mkdir()
    refused(dm("mount", "late", str(tmp_path / "late")), "thin pool", "is full", "minifs rm")
    dm("rm", "late", "hog", check=True)
    dm("clone", "again", "--from", "base", check=True)
    assert read_back(dm, tmp_path, "again", files) == files


def test_kernel_engine_is_refused_with_its_reason(dm):
    from minifs_drivers import devicemapper_kernel

    why = devicemapper_kernel.unavailable()
    if why is None:
        pytest.skip("this kernel has dm-thin")
    refused(dm("clone", "c", "--storage-opt", "devicemapper.engine=kernel"), "engine=kernel", why)
    listed = json.loads(subprocess.run([MINIFS, "drivers", "--json"], capture_output=True,
                                       text=True, check=True).stdout)  # fmt: skip
    entry = next(d for d in listed if d["name"] == "devicemapper")
    assert why in entry["backend"] and entry["kind"] == "row"
    assert registered()["devicemapper"].driver.size_limit
