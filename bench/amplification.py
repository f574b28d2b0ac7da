"""Write amplification: bytes the bench disk's block device received divided by
bytes the workload wrote, per workload, and the one-off cost of the clone.

Each workload runs in a fresh clone of a layer that holds its file, so a
4-byte update in the middle of a file that lives in a lower layer is exactly
the case where a file-level CoW driver (overlay2) must copy the whole file up
and a block-level one need not. Sizes go from 4 KiB to 64 MiB so the copy-up
shows as a line, not a point.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from minifs_bench.content import check, check_bytes, pattern
from minifs_bench.probes import inodes_taken
from minifs_bench.session import IMAGE, Session
from minifs_bench.stats import summarize

KiB, MiB = 1 << 10, 1 << 20
UPDATE_SIZES = [4 * KiB * 4**i for i in range(8)]
"""4 KiB, 16 KiB, … 64 MiB: files updated by 4 bytes in their middle."""
UPDATE = b"MFS!"
SEQUENTIAL_BYTES = 32 * MiB
CHUNK = 1 * MiB
RANDOM_FILE = 16 * MiB
RANDOM_WRITES = 256
RANDOM_BLOCK = 4 * KiB
SMALL_FILES = 1000
SMALL_FILE_SIZE = 1 * KiB
IDLE_READINGS = 5
"""Fewest idle readings the baseline is the median of (more with --runs)."""
DATA = "data"

DEFINITIONS = {
    "amplification": "bytes the bench disk's block device received (its kernel write counter, "
    "after the driver's flush: syncfs; zfs: a forced commit) / bytes the workload wrote",
    "idle flush": "what one reading costs with no work at all: the bytes the flush at its end "
    "writes by itself (0 on ext4 and btrfs; a zpool's forced commit writes a transaction "
    "group: uberblocks, space maps, the MOS), median of the idle readings taken in the same "
    "run before the workloads",
    "net": "device bytes minus the idle flush: what the work added to the one flush every "
    "reading ends with (amplification net likewise); raw and net are both in the JSON",
    "sequential": f"a new {SEQUENTIAL_BYTES // MiB} MiB file written sequentially in "
    f"{CHUNK // MiB} MiB chunks, in a clone of the image",
    "update-4b": "4 bytes written in the middle of a file that lives in the layer under the "
    "clone; file-level CoW copies the whole file up first",
    "random-4k": f"{RANDOM_WRITES} random {RANDOM_BLOCK // KiB} KiB overwrites in a "
    f"{RANDOM_FILE // MiB} MiB file that lives in the layer under the clone",
    "small-files": f"{SMALL_FILES} new files of {SMALL_FILE_SIZE // KiB} KiB in a clone of the "
    "image",
    "clone": "the one-off cost of making and mounting the clone: device bytes, and inodes and "
    "bytes taken on the bench disk",
    "seconds": "time from the start of the work until all of it is on the device (one flush)",
}


def estimate_bytes() -> int:
    """Disk space the workloads need at once, at most: every update layer plus
    one copied-up clone, and the sequential and small-file writes."""
    return 2 * sum(UPDATE_SIZES) + SEQUENTIAL_BYTES + SMALL_FILES * 4 * KiB


def _layer(size: int) -> str:
    return f"amp-{size}"


@dataclass(frozen=True)
class Workload:
    """One write pattern: what it writes, in a clone of which layer, and how
    its effect is checked. `touched` are the (offset, length) ranges it
    overwrites in a file of the layer, which must stay unchanged there."""

    name: str
    file_size: int
    layer: str
    logical_bytes: int
    work: Callable[[Path], None]
    verify: Callable[[Path], None]
    touched: tuple[tuple[int, int], ...] = ()


def workloads() -> list[Workload]:
    return [
        Workload("sequential", 0, IMAGE, SEQUENTIAL_BYTES, _sequential, _check_sequential),
        *(
            Workload(
                "update-4b",
                size,
                _layer(size),
                len(UPDATE),
                _update(size),
                _check_update(size),
                ((size // 2, len(UPDATE)),),
            )
            for size in UPDATE_SIZES
        ),
        Workload(
            "random-4k",
            RANDOM_FILE,
            _layer(RANDOM_FILE),
            RANDOM_WRITES * RANDOM_BLOCK,
            _random,
            _check_random,
            tuple((i * RANDOM_BLOCK, RANDOM_BLOCK) for i in _random_offsets()[:8]),
        ),
        Workload("small-files", 0, IMAGE, SMALL_FILES * SMALL_FILE_SIZE, _small, _check_small),
    ]


def run(session: Session, record: dict) -> None:
    record["definitions"] = DEFINITIONS
    entries: list[dict] = []
    record["workloads"] = entries
    session.progress.step(f"{session.driver}: layers holding files of 4 KiB … 64 MiB")
    for size in UPDATE_SIZES:
        session.make_layer(_layer(size), None, _file_writer(size))
    idle = [session.meter().idle() for _ in range(max(IDLE_READINGS, session.runs))]
    record["idle_flush"] = {"samples": idle, "summary": summarize(idle)}
    baseline = record["idle_flush"]["summary"]["median"]
    session.progress.advance()
    for w in workloads():
        session.progress.step(f"{session.driver}: write amplification, {w.name} {w.file_size}")
        entry: dict = {
            "workload": w.name,
            "file_size": w.file_size,
            "layer": w.layer,
            "logical_bytes": w.logical_bytes,
            "samples": [],
        }
        entries.append(entry)
        for _ in range(session.runs):
            entry["samples"].append(_sample(session, w.layer, w.work, w.verify))
            session.progress.advance()
        if w.touched:
            _check_layer_unchanged(session, w)
        for sample in entry["samples"]:
            sample["device_bytes_net"] = sample["device_bytes"] - baseline
            sample["clone_device_bytes_net"] = sample["clone_device_bytes"] - baseline
        entry["summary"] = _summaries(entry["samples"], w.logical_bytes)


def _summaries(samples: list[dict], logical_bytes: int) -> dict:
    """Every sampled quantity summarized, amplification raw and net; a count
    the driver does not keep (inodes on btrfs and zfs) is None, not a number."""
    summary = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        summary[key] = None if None in values else summarize(values)
    for suffix in ("", "_net"):
        summary["amplification" + suffix] = summarize(
            [s["device_bytes" + suffix] / logical_bytes for s in samples]
        )
    return summary


def _sample(
    session: Session, layer: str, work: Callable[[Path], None], verify: Callable[[Path], None]
) -> dict[str, float | None]:
    """One fresh clone of `layer`: what making and mounting it cost, then what
    the work cost, then its effect read back after a remount."""
    clone = session.name("amp")
    meter = session.meter()
    before = session.counts()
    meter.start()
    session.storage.clone(clone, layer)
    with session.mounted(clone) as target:
        clone_device = meter.stop()
        after = session.counts()
        meter.start()
        start = time.perf_counter_ns()
        work(target)
        device = meter.stop()
        seconds = (time.perf_counter_ns() - start) / 1e9
        session.remount(target)
        verify(target)
    session.storage.remove(clone)
    return {
        "device_bytes": device,
        "seconds": seconds,
        "clone_device_bytes": clone_device,
        "clone_inodes": inodes_taken(before, after),
        "clone_bytes": after.bytes_used - before.bytes_used,
    }


# -- the workloads and their checks ------------------------------------------------


def _file_writer(size: int) -> Callable[[Path], None]:
    return lambda root: (root / DATA).write_bytes(pattern(size, size))


def _sequential(root: Path) -> None:
    chunk = pattern(1, CHUNK)
    with open(root / "sequential", "wb") as f:
        for _ in range(SEQUENTIAL_BYTES // CHUNK):
            f.write(chunk)


def _check_sequential(root: Path) -> None:
    path = root / "sequential"
    check(
        path.stat().st_size == SEQUENTIAL_BYTES,
        "sequential: the new file has the wrong size after a remount",
    )
    for offset in (0, SEQUENTIAL_BYTES - CHUNK):
        check_bytes(path, offset, pattern(1, CHUNK), "sequential")


def _update(size: int) -> Callable[[Path], None]:
    def update(root: Path) -> None:
        fd = os.open(root / DATA, os.O_WRONLY)
        try:
            os.pwrite(fd, UPDATE, size // 2)
        finally:
            os.close(fd)

    return update


def _check_update(size: int) -> Callable[[Path], None]:
    def verify(root: Path) -> None:
        path = root / DATA
        check(path.stat().st_size == size, f"update-4b {size}: the file changed size")
        expected = bytearray(pattern(size, size))
        expected[size // 2 : size // 2 + len(UPDATE)] = UPDATE
        for offset in {0, size // 2 - size // 2 % 4096, size - 4096}:
            check_bytes(path, offset, bytes(expected[offset : offset + 4096]), f"update-4b {size}")

    return verify


def _check_layer_unchanged(session: Session, workload: Workload) -> None:
    """What the workload overwrote in its clones must not have reached the layer."""
    view = session.name("amp-view")
    session.storage.view(view, workload.layer)
    original = pattern(workload.file_size, workload.file_size)
    try:
        with session.mounted(view) as root:
            for offset, length in workload.touched:
                expected = original[offset : offset + length]
                check_bytes(
                    root / DATA, offset, expected, f"layer {workload.layer} after {workload.name}"
                )
    finally:
        session.storage.remove(view)


def _random_offsets() -> list[int]:
    rng = random.Random(RANDOM_FILE)
    return rng.sample(range(RANDOM_FILE // RANDOM_BLOCK), RANDOM_WRITES)


def _random(root: Path) -> None:
    block = pattern(2, RANDOM_BLOCK)
    fd = os.open(root / DATA, os.O_WRONLY)
    try:
        for index in _random_offsets():
            os.pwrite(fd, block, index * RANDOM_BLOCK)
    finally:
        os.close(fd)


def _check_random(root: Path) -> None:
    block = pattern(2, RANDOM_BLOCK)
    for index in _random_offsets():
        check_bytes(root / DATA, index * RANDOM_BLOCK, block, "random-4k")


def _small(root: Path) -> None:
    (root / "small").mkdir()
    for i in range(SMALL_FILES):
        (root / "small" / f"{i:04}").write_bytes(pattern(i, SMALL_FILE_SIZE))


def _check_small(root: Path) -> None:
    names = sorted(os.listdir(root / "small"))
    check(len(names) == SMALL_FILES, f"small-files: {len(names)} files, not {SMALL_FILES}")
    for i in range(0, SMALL_FILES, 97):
        check_bytes(root / "small" / f"{i:04}", 0, pattern(i, SMALL_FILE_SIZE), "small-files")
