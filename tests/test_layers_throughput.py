"""Apply throughput against plain `tar -x` of the same file, in the same run.

Both write the same uncompressed layer into a fresh clone of the same driver
(minifs through its two-pass, descriptor-confined apply; GNU tar into the
mounted clone), and the two trees must agree. The figures are printed (run
with -s); the size is small by default to keep the suite fast and set with
MINIFS_THROUGHPUT_MB / MINIFS_THROUGHPUT_FILES for a real measurement.
"""

from __future__ import annotations

import os
import random
import subprocess
import time

import pytest

from minifs.layers.snapshots import apply_to
from minifs.layers.tarformat import DIR, FILE, Entry, TarWriter
from tests import treeinfo
from tests.conftest import driver_params

MEGABYTES = int(os.environ.get("MINIFS_THROUGHPUT_MB", "32"))
FILES = int(os.environ.get("MINIFS_THROUGHPUT_FILES", "4000"))
LAYER_MTIME_NS = 10**18


def _write_layer(path, megabytes: int, files: int) -> int:
    """A layer of `files` files over 100 directories, sizes spread around the
    mean; a file larger than the 1 MiB pool of random bytes repeats it."""
    rng = random.Random(42)
    pool = rng.randbytes(1 << 20)
    mean = (megabytes << 20) // files
    total = 0
    with open(path, "wb") as out:
        tar = TarWriter(out)
        for d in range(100):
            tar.add(Entry(name=b"d%03d" % d, type=DIR, mode=0o755, mtime_ns=LAYER_MTIME_NS))
            for f in range(d, files, 100):
                size = rng.randint(0, 2 * mean)
                head = min(size, len(pool))
                start = rng.randrange(len(pool) - head + 1)
                whole, rest = divmod(size - head, len(pool))
                data = [pool[start : start + head], *[pool] * whole, pool[:rest]]
                total += size
                entry = Entry(
                    name=b"d%03d/f%06d" % (d, f), type=FILE, size=size, mtime_ns=LAYER_MTIME_NS
                )
                tar.add(entry, iter(data))
        tar.close()
    return total


def _keeps_lone_mtimes(path) -> bool:
    """Whether the mounted clone keeps an mtime set with the atime left alone
    (UTIME_OMIT), as GNU tar sets a file's after extracting it: unionfs-fuse
    1.0 (aufs) ignores such a call, so tar's files there carry the time of
    extraction. minifs's own apply sets both times."""
    probe = path / ".mtime-probe"
    probe.write_bytes(b"")
    try:
        subprocess.run(["touch", "-m", "-d", f"@{LAYER_MTIME_NS // 10**9}", probe], check=True)
        return os.stat(probe).st_mtime_ns == LAYER_MTIME_NS
    finally:
        probe.unlink()


@pytest.mark.parametrize("driver", driver_params())
def test_apply_throughput_against_tar(driver, open_storage, mount, tmp_path):
    layer = tmp_path / "layer.tar"
    payload = _write_layer(layer, MEGABYTES, FILES)
    size = layer.stat().st_size
    storage = open_storage(driver)
    storage.clone("by-minifs")
    storage.clone("by-tar")

    started = time.perf_counter()
    stats = apply_to(storage, "by-minifs", layer)
    minifs_seconds = time.perf_counter() - started
    with mount(storage, "by-tar") as path:
        started = time.perf_counter()
        subprocess.run(["tar", "-xpf", str(layer), "-C", str(path)], check=True)
        tar_seconds = time.perf_counter() - started
        tar_mtimes = _keeps_lone_mtimes(path)
        by_tar = treeinfo.record(path, mtimes=tar_mtimes)
    with mount(storage, "by-minifs") as path:
        by_minifs = treeinfo.record(path, mtimes=True)
    del by_tar["."], by_minifs["."]
    assert {e.get("mtime_ns", LAYER_MTIME_NS) for e in by_minifs.values()} == {LAYER_MTIME_NS}
    if not tar_mtimes:
        by_minifs = {
            p: {k: v for k, v in e.items() if k != "mtime_ns"} for p, e in by_minifs.items()
        }
    assert treeinfo.differences(by_tar, by_minifs) == []
    assert stats.files == FILES and stats.file_bytes == payload

    mib = size / (1 << 20)
    print(
        f"\n{driver}: {mib:.0f} MiB, {FILES} files: "
        f"minifs {mib / minifs_seconds:.0f} MiB/s {FILES / minifs_seconds:.0f} files/s "
        f"({minifs_seconds:.2f} s); tar -x {mib / tar_seconds:.0f} MiB/s "
        f"{FILES / tar_seconds:.0f} files/s ({tar_seconds:.2f} s)"
    )
