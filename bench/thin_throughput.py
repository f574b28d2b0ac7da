"""devicemapper throughput against its floor, in one run.

`python -m minifs_bench.thin_throughput [-o FILE]` times a sequential write
(then fsync) and a cold sequential read of 512 MiB through a devicemapper
clone, and a 4-byte update in the middle of a 256 MiB file that a lower layer
holds, each beside the same operation on ext4 on a loop device over a plain
file (the fastest this machine offers a filesystem on a file: the floor).
Rounds alternate the two so drift on a shared machine hits both alike; the
medians and their ratios are printed as JSON. The clone's cost of the update
is also counted in pool bytes: redirect-on-write stores one 64 KiB block.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from minifs import mounter
from minifs.storage import Storage
from minifs_bench.disk import BenchDisk
from minifs_bench.probes import drop_caches

MiB = 1 << 20


def sequential_write(path: Path, size: int, chunk: bytes) -> float:
    """Seconds to write `size` bytes in 1 MiB writes and fsync them."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for _ in range(size // len(chunk)):
            os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def sequential_read(path: Path, fs: Path) -> float:
    """Seconds to read `path` whole with nothing of it cached."""
    drop_caches(fs, "ext4")
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(MiB):
            pass
    return time.perf_counter() - start


def update_in_middle(path: Path) -> float:
    """Seconds to change 4 bytes in the middle of `path` and fsync."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, b"4byt", os.fstat(fd).st_size // 2)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def measure(rounds: int, size: int, workdir: Path) -> dict[str, object]:
    chunk = os.urandom(MiB)
    floor = BenchDisk(workdir, "floor", 2 * size + 512 * MiB, "ext4")
    floor_mnt = workdir / "floor.mnt"
    floor_mnt.mkdir()
    storage = Storage(
        "devicemapper",
        workdir / "state",
        {"datasize": f"{(4 * size + 1024 * MiB) >> 20}M", "basesize": f"{(2 * size) >> 20}M"},
    )
    clone_mnt = workdir / "clone.mnt"
    clone_mnt.mkdir()
    times: dict[str, list[float]] = {}

    def timed(key: str, run: Callable[[], float]) -> None:
        times.setdefault(key, []).append(run())

    try:
        floor.up(floor_mnt)
        floor_disk = floor.describe()
        storage.clone("lower")
        with mounter.mounted(storage.mounts("lower"), clone_mnt):
            sequential_write(clone_mnt / "big", size // 2, chunk)
        storage.snapshot("lower", "layer")
        sequential_write(floor_mnt / "big", size // 2, chunk)
        for _ in range(rounds):
            storage.clone("seq", "layer")
            with mounter.mounted(storage.mounts("seq"), clone_mnt):
                timed("clone_write", lambda: sequential_write(clone_mnt / "seq", size, chunk))
                timed("clone_read", lambda: sequential_read(clone_mnt / "seq", clone_mnt))
                timed("clone_update", lambda: update_in_middle(clone_mnt / "big"))
            usage = storage.usage("seq")
            storage.remove("seq")
            timed("floor_write", lambda: sequential_write(floor_mnt / "seq", size, chunk))
            timed("floor_read", lambda: sequential_read(floor_mnt / "seq", floor_mnt))
            timed("floor_update", lambda: update_in_middle(floor_mnt / "big"))
            (floor_mnt / "seq").unlink()
        storage.clone("upd", "layer")
        with mounter.mounted(storage.mounts("upd"), clone_mnt):
            update_in_middle(clone_mnt / "big")
        update_bytes = storage.usage("upd").size
    finally:
        storage.down()
        storage.close()
        floor.down()
    median = {key: statistics.median(samples) for key, samples in times.items()}
    mb = size / MiB
    return {
        "size_mib": mb,
        "rounds": rounds,
        "loop_over_plain_file": floor_disk,
        "write_mib_s": {"clone": mb / median["clone_write"], "floor": mb / median["floor_write"]},
        "read_mib_s": {"clone": mb / median["clone_read"], "floor": mb / median["floor_read"]},
        "write_ratio": median["floor_write"] / median["clone_write"],
        "read_ratio": median["floor_read"] / median["clone_read"],
        "update_ms": {
            "clone": median["clone_update"] * 1e3,
            "floor": median["floor_update"] * 1e3,
        },
        "update_pool_bytes": update_bytes,
        "seq_clone_pool_bytes": usage.size,
        "samples_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", help="also write the JSON here")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--workdir", default="/var/tmp", help="where the images go (a disk)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir) / f"minifs-thin-bench-{os.getpid()}"
    workdir.mkdir(parents=True)
    try:
        result = measure(args.rounds, args.size_mib * MiB, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
