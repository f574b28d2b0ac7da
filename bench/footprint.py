"""Inodes and space: what a layer and a clone take on the bench disk, and the
seed's scenario — how many clones of an image fit on a disk before inodes or
space run out, and which runs out first.

The scenario is measured for real, on a small dedicated disk with a bounded
clone count, and compared with what the per-clone cost predicts; the same
prediction is then made for the full-size bench disk. The small disk is 16 MiB,
or the driver's minimum where mkfs or zpool refuse smaller (btrfs 109 MiB, zfs
64 MiB). Where the driver has no inode count to run out of (btrfs, zfs make
inodes from free space), inodes are reported unknown and only space predicts.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass, field

from minifs.driver import Driver
from minifs.errors import MinifsError
from minifs.plugins import get_driver
from minifs_bench.content import IMAGE_BYTES, IMAGE_INODES, check_image, write_image
from minifs_bench.probes import FsCounts, inodes_taken
from minifs_bench.session import IMAGE, Session, close_on_disk, open_on_disk
from minifs_bench.stats import summarize

MiB = 1 << 20
SCENARIO_DISK = 16 * MiB
"""Small enough that a driver with ~10 inodes per clone fills it in a few hundred."""
SCENARIO_BOUND = 2000
"""Most clones the scenario makes; reaching it means neither resource ran out."""
FULL = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), " is full", "out of space")
"""How a failed clone says the disk is full: the errno's words, or minifs's
one-line errors for a full disk ("the disk holding … is full", "zpool … is full")."""


def scenario_disk(driver: type[Driver]) -> int:
    """The scenario's disk for `driver`: 16 MiB, or the driver's own minimum."""
    return max(SCENARIO_DISK, driver.min_disk_size)


DEFINITIONS = {
    "layer": "an empty layer committed on the image: inodes and bytes the bench disk lost "
    "(statvfs before/after), and what the driver's usage() reports for it",
    "clone": "a clone of the image: inodes and bytes the bench disk lost when it was made, and "
    "once it was mounted",
    "scenario": f"clones of the image ({IMAGE_INODES} inodes, {IMAGE_BYTES // 1024} KiB), each "
    f"made and mounted once, on a fresh {SCENARIO_DISK // MiB} MiB disk (or the driver's "
    f"minimum: btrfs 109 MiB, zfs 64 MiB) until a clone fails or {SCENARIO_BOUND} exist; "
    "which resource ran out first",
    "predicted": "clones that fit by the per-clone cost: min(free inodes / inodes per clone, "
    "free bytes / bytes per clone); on the small disk the cost of its first clone, on the "
    "bench disk the median cost per mounted clone",
    "unknown": "inodes of a driver with no inode count (btrfs, zfs: statvfs says 0, or ZFS "
    "keeps none): only space predicts, and inodes cannot run out first",
    "space": "bytes as the driver counts its space: statvfs of the disk; zfs: its root "
    "dataset's used and available (what a clone may still take) plus the reserve the driver "
    "lets go when the pool is full, after a commit",
    "free at end": "bytes still counted free when the scenario stopped: space the clones "
    "could not use (btrfs: statvfs counts data space that snapshot metadata cannot take)",
}


def run(session: Session, record: dict) -> None:
    record["definitions"] = DEFINITIONS
    session.progress.step(f"{session.driver}: inodes and bytes per layer")
    record["layer"] = _per_layer(session)
    session.progress.step(f"{session.driver}: inodes and bytes per clone")
    record["clone"] = _per_clone(session)
    per_clone = record["clone"]["summary"]
    record["bench_disk"] = _predict(
        session.counts(),
        _median(per_clone["inodes_mounted"]),
        _median(per_clone["bytes_mounted"]),
    )
    size = scenario_disk(get_driver(session.driver)) // MiB
    session.progress.step(f"{session.driver}: clones until a {size} MiB disk fills")
    record["scenario"] = _scenario(session)
    session.progress.advance()


def _per_layer(session: Session) -> dict:
    samples = []
    for _ in range(session.runs):
        name = session.name("fp-layer")
        before = session.counts()
        session.make_layer(name, IMAGE)
        after = session.counts()
        usage = session.storage.usage(name)
        samples.append(
            {
                "inodes": inodes_taken(before, after),
                "bytes": after.bytes_used - before.bytes_used,
                "driver_inodes": usage.inodes,
                "driver_bytes": usage.size,
            }
        )
        session.progress.advance()
    return {"samples": samples, "summary": _summaries(samples)}


def _per_clone(session: Session) -> dict:
    samples = []
    clones = []
    baseline = session.counts()
    for _ in range(session.runs):
        name = session.name("fp-clone")
        before = session.counts()
        session.storage.clone(name, IMAGE)
        clones.append(name)
        made = session.counts()
        with session.mounted(name) as root:
            mounted = session.counts()
            check_image(root, f"{session.driver}: clone {name}")
        usage = session.storage.usage(name)
        samples.append(
            {
                "inodes": inodes_taken(before, made),
                "bytes": made.bytes_used - before.bytes_used,
                "inodes_mounted": inodes_taken(before, mounted),
                "bytes_mounted": mounted.bytes_used - before.bytes_used,
                "driver_inodes": usage.inodes,
                "driver_bytes": usage.size,
            }
        )
        session.progress.advance()
    for name in clones:
        session.storage.remove(name)
    after = session.counts()
    return {
        "samples": samples,
        "summary": _summaries(samples),
        "inodes_left_after_remove": inodes_taken(baseline, after),
        "bytes_left_after_remove": after.bytes_used - baseline.bytes_used,
    }


def _summaries(samples: list[dict]) -> dict:
    """Each key summarized; None for a count the driver does not keep."""
    summary: dict = {}
    for key in samples[0] if samples else ():
        values = [s[key] for s in samples]
        summary[key] = None if None in values else summarize(values)
    return summary


def _fit(free: int | None, per_clone: float | None) -> float | None:
    return free // per_clone if free is not None and per_clone and per_clone > 0 else None


def _median(summary: dict | None) -> float | None:
    return None if summary is None else summary["median"]


def _predict(free: FsCounts, inodes_per_clone: float | None, bytes_per_clone: float | None) -> dict:
    """Clones that fit in `free` by each resource; a resource without a count
    (inodes on btrfs and zfs) or without a cost per clone predicts nothing."""
    by_inodes = _fit(free.inodes_free, inodes_per_clone)
    by_space = _fit(free.bytes_free, bytes_per_clone)
    limits = {k: v for k, v in (("inodes", by_inodes), ("space", by_space)) if v is not None}
    first = min(limits, key=limits.get) if limits else None
    return {
        "counts": free.to_dict(),
        "inodes_per_clone": inodes_per_clone,
        "bytes_per_clone": bytes_per_clone,
        "fit_by_inodes": by_inodes,
        "fit_by_space": by_space,
        "predicted_clones": limits[first] if first else None,
        "predicted_first_exhausted": first,
    }


@dataclass
class Fill:
    """What filling the small disk came to: the clones made, the counts after
    the first, and the failure that stopped it (None: the bound was reached)."""

    made: list[str] = field(default_factory=list)
    first: FsCounts | None = None
    failure: BaseException | None = None
    failed: str | None = None
    """The clone being made when it failed, if it exists half-way."""


def _scenario(session: Session) -> dict:
    """Fill a small disk with clones. The prediction comes from what the first
    clone alone cost on that disk, so comparing it with the count reached
    tests whether the per-clone cost really explains when the disk fills."""
    workdir = session.workdir.parent / f"{session.workdir.name}-scenario"
    workdir.mkdir()
    size = scenario_disk(get_driver(session.driver))
    disk, storage = open_on_disk(session.driver, workdir, "small", size)
    small = Session(session.driver, storage, disk, workdir, session.runs, session.progress)
    try:
        small.make_layer(IMAGE, None, write_image)
        start = small.counts()
        fill = _fill(small)
        end = small.counts()
        _check_last(small, fill)
        return _scenario_record(size, start, end, fill)
    finally:
        close_on_disk(storage, disk, workdir)
        shutil.rmtree(workdir, ignore_errors=True)


def _fill(small: Session) -> Fill:
    """Clone the image and mount each clone once until one fails or the bound
    is reached."""
    fill = Fill()
    while len(fill.made) < SCENARIO_BOUND:
        name = small.name("c")
        try:
            small.storage.clone(name, IMAGE)
            with small.mounted(name):
                pass
        except (OSError, MinifsError) as exc:
            fill.failure = exc
            fill.failed = name if small.storage.find(name) else None
            return fill
        fill.made.append(name)
        fill.first = fill.first or small.counts()
    return fill


def _check_last(small: Session, fill: Fill) -> None:
    """The last clone made still shows the image. The one that failed goes
    first: made but not mountable, it may hold the very inode or block the
    check's mount needs (overlayfs makes its work dir at every mount)."""
    if fill.failed is not None:
        small.storage.remove(fill.failed)
    if fill.made:
        with small.mounted(fill.made[-1]) as root:
            check_image(root, f"{small.driver}: clone {len(fill.made)} of the scenario")


def _scenario_record(size: int, start: FsCounts, end: FsCounts, fill: Fill) -> dict:
    count = len(fill.made)
    taken = inodes_taken(start, end)
    inodes_each = None if taken is None else taken / count if count else 0
    bytes_each = (end.bytes_used - start.bytes_used) / count if count else 0
    first = fill.first
    predicted = (
        _predict(start, inodes_taken(start, first), first.bytes_used - start.bytes_used)
        if first
        else None
    )
    return {
        "disk_size": size,
        "bound": SCENARIO_BOUND,
        "after_image": start.to_dict(),
        "at_end": end.to_dict(),
        "clones": count,
        "first_exhausted": _exhausted(fill.failure, end, inodes_each, bytes_each),
        "failure": None if fill.failure is None else str(fill.failure),
        "inodes_per_clone": inodes_each,
        "bytes_per_clone": bytes_each,
        "predicted": predicted,
    }


def _exhausted(
    failure: BaseException | None, end: FsCounts, inodes_each: float | None, bytes_each: float
) -> str:
    """Which resource stopped the scenario: of the two, the one with fewer
    clones' worth left when a clone failed for lack of space. Without an
    inode count (btrfs, zfs) inodes come from free space: it is space."""
    if failure is None:
        return "neither (bound reached)"
    full = (
        failure.errno in (errno.ENOSPC, errno.EDQUOT)
        if isinstance(failure, OSError)
        else any(words in str(failure) for words in FULL)
    )
    if not full or bytes_each <= 0:
        return f"neither: {failure}"
    if inodes_each is None or end.inodes_free is None:
        return "space"
    if inodes_each <= 0:
        return f"neither: {failure}"
    return "inodes" if end.inodes_free / inodes_each < end.bytes_free / bytes_each else "space"
