"""The bench's probes and metric code on real loop disks, on cases whose answer
is known: a 64 MiB copy-up is at least 64 MiB written, a block-level update is
not, inode counts move by what was created."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from minifs_bench import amplification
from minifs_bench.content import IMAGE_INODES, VerificationFailed, pattern
from minifs_bench.disk import BenchDisk
from minifs_bench.probes import WriteCounter, WriteMeter, fs_counts
from minifs_bench.session import IMAGE, Session, close_on_disk, open_on_disk
from tests.conftest import driver_params

MiB = 1 << 20


class Quiet:
    def step(self, text: str) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass


@pytest.fixture
def disk(tmp_path: Path):
    made = BenchDisk(tmp_path, "probe", 256 * MiB, "ext4")
    made.up(tmp_path / "fs")
    yield made
    made.down()


def test_write_meter_counts_what_reaches_the_device(disk):
    meter = WriteMeter(WriteCounter(disk.device), [disk.mountpoint])
    data = pattern(7, 8 * MiB)

    def write() -> None:
        (disk.mountpoint / "eight").write_bytes(data)

    written = meter.measure(write)
    # All 8 MiB plus a little metadata and journal; not double.
    assert 8 * MiB <= written < 9 * MiB
    assert meter.measure(lambda: None) < 64 * 1024


def test_fs_counts_see_inodes_and_bytes(disk):
    before = fs_counts(disk.mountpoint)
    for i in range(10):
        (disk.mountpoint / f"f{i}").write_bytes(b"x" * 8192)
    after = fs_counts(disk.mountpoint)
    assert after.inodes_used - before.inodes_used == 10
    assert after.bytes_used - before.bytes_used >= 10 * 8192


@pytest.fixture
def session(request, tmp_path: Path):
    driver = request.param
    workdir = tmp_path / driver
    workdir.mkdir()
    disk, storage = open_on_disk(driver, workdir, "disk", 512 * MiB)
    try:
        yield Session(driver, storage, disk, workdir, 1, Quiet())
    finally:
        close_on_disk(storage, disk, workdir)


def _four_byte_update(session: Session, size: int) -> dict:
    layer = f"amp-{size}"
    session.make_layer(layer, None, amplification._file_writer(size))
    return amplification._sample(
        session, layer, amplification._update(size), amplification._check_update(size)
    )


@pytest.mark.parametrize("session", ["overlay2"], indirect=True)
def test_overlay2_copy_up_of_64m_is_counted_whole(session):
    sample = _four_byte_update(session, 64 * MiB)
    assert sample["device_bytes"] >= 64 * MiB
    # The clone itself costs a few directories, not a copy.
    assert sample["clone_device_bytes"] < 4 * MiB
    assert 0 < sample["clone_inodes"] < 32


@pytest.mark.parametrize("session", ["vfs"], indirect=True)
def test_vfs_pays_at_clone_time_not_at_the_update(session):
    sample = _four_byte_update(session, 16 * MiB)
    assert sample["device_bytes"] < 1 * MiB
    assert sample["clone_device_bytes"] >= 16 * MiB


@pytest.mark.parametrize("session", ["overlay2"], indirect=True)
def test_a_workload_that_does_not_land_fails_its_check(session):
    """A write that never reaches the file is caught, not timed."""
    size = 64 * 1024
    session.make_layer("amp", None, amplification._file_writer(size))
    with pytest.raises(VerificationFailed, match="other bytes"):
        amplification._sample(
            session, "amp", lambda root: os.stat(root), amplification._check_update(size)
        )
    assert session.stray_mounts() == []


@pytest.mark.parametrize("session", driver_params(), indirect=True)
def test_image_clone_costs_inodes_by_driver_kind(session):
    session.build_image()
    before = session.counts()
    session.storage.clone("c", IMAGE)
    used = session.counts().inodes_used - before.inodes_used
    if session.storage.driver.kind.value == "copy":
        assert used >= IMAGE_INODES
    else:
        assert 0 < used < IMAGE_INODES // 4
