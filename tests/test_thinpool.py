"""The userspace thin pool against real files: sharing, redirect-on-write,
reference counts, transactions, and metadata damage found by its checksums."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from minifs_drivers.thin_pool import UNMAPPED, ThinCorrupt, ThinFull, ThinPool

BLOCK = 64 << 10
MiB = 1 << 20


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    """A formatted pool: a 16 MiB sparse data file (256 blocks) and its metadata."""
    data = tmp_path / "data"
    with open(data, "wb") as f:
        f.truncate(16 * MiB)
    ThinPool.format(tmp_path / "meta", data, BLOCK)
    return tmp_path / "meta", data


def reopen(pool: ThinPool, paths: tuple[Path, Path]) -> ThinPool:
    """Open the pool again from its files, as after a crash: nothing of the
    first object's memory survives, only what it committed."""
    os.close(pool.fd)
    return ThinPool(*paths)


def test_snapshot_shares_blocks_and_writes_redirect(paths):
    pool = ThinPool(*paths)
    pool.create("a", 4 * MiB)
    original = os.urandom(3 * BLOCK)
    pool.write("a", 0, original)
    free = pool.status()["free_blocks"]
    pool.snapshot("a", "b")
    assert pool.status()["free_blocks"] == free, "a snapshot copies no data"
    assert pool.devices[2].mapping[:3] == pool.devices[1].mapping[:3]
    assert all(pool.refcount[p] == 2 for p in pool.devices[1].mapping[:3])

    pool.write("b", BLOCK + 10, b"XYZ")  # partial write to a shared block
    assert pool.status()["free_blocks"] == free - 1, "one block redirected"
    assert pool.read("a", 0, 3 * BLOCK) == original
    expected = bytearray(original)
    expected[BLOCK + 10 : BLOCK + 13] = b"XYZ"
    assert pool.read("b", 0, 3 * BLOCK) == bytes(expected), "the rest of the block copied"
    assert pool.own_blocks("b") == 1 and pool.own_blocks("a") == 3

    pool.write("b", 0, b"in place")  # block 0 is still shared: redirected too
    pool.write("b", BLOCK, b"again")  # block 1 is b's own now: written in place
    assert pool.status()["free_blocks"] == free - 2
    assert pool.read("a", 0, 8) == original[:8]
    assert pool.read("b", 4 * MiB - 4, 100) == bytes(4), "reads stop at the device's end"
    pool.close()


def test_delete_frees_only_unshared_blocks(paths):
    pool = ThinPool(*paths)
    pool.create("a", MiB)
    pool.write("a", 0, os.urandom(4 * BLOCK))
    pool.snapshot("a", "b")
    pool.write("b", 0, os.urandom(BLOCK))
    free = pool.status()["free_blocks"]
    pool.delete("a")  # 3 of its 4 blocks are still b's
    assert pool.status()["free_blocks"] == free + 1
    pool.delete("b")
    assert pool.status()["free_blocks"] == 256
    assert pool.refcount.count(0) == 256
    pool.delete("b")  # deleting what is gone is a no-op (repeated after a crash)
    pool.close()


def test_discard_unmaps_whole_blocks_and_zeroes_parts(paths):
    pool = ThinPool(*paths)
    pool.create("a", MiB)
    pool.write("a", 0, b"\xff" * (3 * BLOCK))
    free = pool.status()["free_blocks"]
    pool.discard("a", 100, 2 * BLOCK)  # part of block 0, all of block 1, part of block 2
    assert pool.devices[1].mapping[1] == UNMAPPED
    assert pool.read("a", 0, 3 * BLOCK) == b"\xff" * 100 + bytes(2 * BLOCK) + b"\xff" * (
        BLOCK - 100
    )
    assert pool.status()["free_blocks"] == free, "freed only once the discard commits"
    pool.commit()
    assert pool.status()["free_blocks"] == free + 1
    pool.close()


def test_only_committed_state_survives_a_crash(paths):
    pool = ThinPool(*paths)
    pool.create("a", MiB)
    pool.write("a", 0, b"committed")
    pool.commit()
    pool.write("a", 0, b"lost!!!!!")  # in place: a's own block, as a disk's cache is
    pool.write("a", 5 * BLOCK, b"never committed")
    pool.snapshot("a", "b")  # commits everything before it
    pool.write("b", 0, b"after the snapshot")
    again = reopen(pool, paths)
    assert set(again.by_name) == {"a", "b"}
    assert again.read("a", 5 * BLOCK, 15) == b"never committed"
    assert again.read("b", 0, 9) == b"lost!!!!!", "b's redirected write was never committed"
    assert again.status()["free_blocks"] == 256 - 2
    os.close(again.fd)


def test_freed_blocks_wait_for_the_commit(paths):
    """A block freed in the open transaction still holds committed data: it
    must not be handed out (and overwritten) before the free is committed."""
    pool = ThinPool(*paths)
    pool.create("a", MiB)
    pool.write("a", 0, b"A" * BLOCK)
    pool.create("b", 16 * MiB)  # commits a's write
    held = pool.devices[1].mapping[0]
    pool.discard("a", 0, BLOCK)
    pool.write("b", 0, os.urandom(255 * BLOCK))  # every other block
    assert held not in pool.devices[2].mapping
    with pytest.raises(ThinFull):
        pool.write("b", 255 * BLOCK, b"one more")
    crashed = reopen(pool, paths)
    assert crashed.read("a", 0, BLOCK) == b"A" * BLOCK, "committed data kept its block"
    crashed.discard("a", 0, BLOCK)
    crashed.commit()
    crashed.write("b", 0, b"now it may")
    assert crashed.devices[2].mapping[0] == held
    crashed.close()


def test_full_pool_refuses_writes_and_stays_usable(paths):
    pool = ThinPool(*paths)
    pool.create("big", 64 * MiB)  # thin: four times the data device
    with pytest.raises(ThinFull):
        pool.write("big", 0, bytes(17 * MiB))
    assert pool.status()["free_blocks"] == 0
    pool.commit()
    again = reopen(pool, paths)
    assert again.read("big", 0, 16) == bytes(16)
    again.delete("big")
    assert again.status()["free_blocks"] == 256
    os.close(again.fd)


def test_checkpoint_and_journal_replay_agree(paths):
    pool = ThinPool(*paths)
    pool.create("a", 2 * MiB)
    pool.write("a", 0, os.urandom(MiB))
    pool.snapshot("a", "b")
    pool.write("b", 7, b"b's own")
    pool.commit()
    from_journal = reopen(pool, paths)
    assert (paths[0] / "journal").stat().st_size > 0
    from_journal.set("b", readonly=True, name="c")
    from_journal.checkpoint()
    assert (paths[0] / "journal").stat().st_size == 0
    from_checkpoint = reopen(from_journal, paths)
    assert from_checkpoint.status() == from_journal.status()
    assert from_checkpoint.read("c", 0, MiB) == from_journal.read("c", 0, MiB)
    assert from_checkpoint.by_name["c"].readonly
    os.close(from_checkpoint.fd)


def test_torn_journal_tail_is_dropped(paths):
    pool = ThinPool(*paths)
    pool.create("a", MiB)
    pool.write("a", 0, b"one")
    pool.commit()
    size = (paths[0] / "journal").stat().st_size
    pool.write("a", BLOCK, b"two")
    pool.commit()
    os.close(pool.fd)
    journal = paths[0] / "journal"
    os.truncate(journal, journal.stat().st_size - 5)  # the crash cut the last append
    again = ThinPool(*paths)
    assert again.read("a", 0, 3) == b"one" and again.read("a", BLOCK, 3) == bytes(3)
    assert journal.stat().st_size == size, "the torn batch is cut off"
    again.write("a", BLOCK, b"three")
    again.commit()
    assert reopen(again, paths).read("a", BLOCK, 5) == b"three"


@pytest.mark.parametrize("where", ["checkpoint", "journal"])
def test_damaged_metadata_is_refused(paths, where):
    pool = ThinPool(*paths)
    pool.create("a", MiB)
    pool.write("a", 0, b"x")
    pool.commit()
    pool.write("a", BLOCK, b"y")
    pool.commit()
    os.close(pool.fd)
    target = paths[0] / where
    raw = bytearray(target.read_bytes())
    raw[40] ^= 0xFF  # a flipped bit in the first checkpoint header or journal batch
    target.write_bytes(bytes(raw))
    with pytest.raises(ThinCorrupt, match="damaged"):
        ThinPool(*paths)


def test_missing_metadata_is_refused(paths):
    (paths[0] / "checkpoint").unlink()
    with pytest.raises(ThinCorrupt, match="missing"):
        ThinPool(*paths)
