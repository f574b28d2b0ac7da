"""Inodes and space: what a layer and a clone take on the bench disk, and the
seed's scenario — how many clones of an image fit on a disk before inodes or
space run out, and which runs out first.

The scenario is measured for real, on a small dedicated disk with a bounded
clone count, and compared with what the per-clone cost predicts; the same
prediction is then made for the full-size bench disk.
"""

from __future__ import annotations

import errno
import os
import shutil

from minifs.errors import MinifsError
from minifs_bench.content import IMAGE_BYTES, IMAGE_INODES, check_image, write_image
from minifs_bench.probes import FsCounts
from minifs_bench.session import IMAGE, Session, close_on_disk, open_on_disk
from minifs_bench.stats import summarize

MiB = 1 << 20
SCENARIO_DISK = 16 * MiB
"""Small enough that a driver with ~10 inodes per clone fills it in a few hundred."""
SCENARIO_BOUND = 2000
"""Most clones the scenario makes; reaching it means neither resource ran out."""

DEFINITIONS = {
    "layer": "an empty layer committed on the image: inodes and bytes the bench disk lost "
    "(statvfs before/after), and what the driver's usage() reports for it",
    "clone": "a clone of the image: inodes and bytes the bench disk lost when it was made, and "
    "once it was mounted",
    "scenario": f"clones of the image ({IMAGE_INODES} inodes, {IMAGE_BYTES // 1024} KiB), each "
    f"made and mounted once, on a fresh {SCENARIO_DISK // MiB} MiB disk until a clone fails "
    f"or {SCENARIO_BOUND} exist; which resource ran out first",
    "predicted": "clones that fit by the per-clone cost: min(free inodes / inodes per clone, "
    "free bytes / bytes per clone); on the small disk the cost of its first clone, on the "
    "bench disk the median cost per mounted clone",
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
        per_clone["inodes_mounted"]["median"],
        per_clone["bytes_mounted"]["median"],
    )
    session.progress.step(f"{session.driver}: clones until a {SCENARIO_DISK // MiB} MiB disk fills")
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
                "inodes": after.inodes_used - before.inodes_used,
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
                "inodes": made.inodes_used - before.inodes_used,
                "bytes": made.bytes_used - before.bytes_used,
                "inodes_mounted": mounted.inodes_used - before.inodes_used,
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
        "inodes_left_after_remove": after.inodes_used - baseline.inodes_used,
        "bytes_left_after_remove": after.bytes_used - baseline.bytes_used,
    }


def _summaries(samples: list[dict]) -> dict:
    return {key: summarize([s[key] for s in samples]) for key in samples[0]} if samples else {}


def _predict(free: FsCounts, inodes_per_clone: float, bytes_per_clone: float) -> dict:
    by_inodes = free.inodes_free // inodes_per_clone if inodes_per_clone > 0 else None
    by_space = free.bytes_free // bytes_per_clone if bytes_per_clone > 0 else None
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


def _scenario(session: Session) -> dict:
    """Fill a small disk with clones. The prediction comes from what the first
    clone alone cost on that disk, so comparing it with the count reached
    tests whether the per-clone cost really explains when the disk fills."""
    workdir = session.workdir.parent / f"{session.workdir.name}-scenario"
    workdir.mkdir()
    disk, storage = open_on_disk(session.driver, workdir, "small", SCENARIO_DISK)
    small = Session(session.driver, storage, disk, workdir, session.runs, session.progress)
    try:
        small.make_layer(IMAGE, None, write_image)
        start = small.counts()
        made: list[str] = []
        first: FsCounts | None = None
        failure = None
        while len(made) < SCENARIO_BOUND:
            name = small.name("c")
            try:
                storage.clone(name, IMAGE)
                with small.mounted(name):
                    pass
            except (OSError, MinifsError) as exc:
                failure = exc
                break
            made.append(name)
            first = first or small.counts()
        end = small.counts()
        if made:
            with small.mounted(made[-1]) as root:
                check_image(root, f"{session.driver}: clone {len(made)} of the scenario")
        count = len(made)
        inodes_each = (end.inodes_used - start.inodes_used) / count if count else 0
        bytes_each = (end.bytes_used - start.bytes_used) / count if count else 0
        predicted = (
            _predict(
                start,
                first.inodes_used - start.inodes_used,
                first.bytes_used - start.bytes_used,
            )
            if first
            else None
        )
        return {
            "disk_size": SCENARIO_DISK,
            "bound": SCENARIO_BOUND,
            "after_image": start.to_dict(),
            "at_end": end.to_dict(),
            "clones": count,
            "first_exhausted": _exhausted(failure, end, inodes_each, bytes_each),
            "failure": None if failure is None else str(failure),
            "inodes_per_clone": inodes_each,
            "bytes_per_clone": bytes_each,
            "predicted": predicted,
        }
    finally:
        close_on_disk(storage, disk, workdir)
        shutil.rmtree(workdir, ignore_errors=True)


def _exhausted(
    failure: BaseException | None, end: FsCounts, inodes_each: float, bytes_each: float
) -> str:
    """Which resource stopped the scenario: of the two, the one with fewer
    clones' worth left when a clone failed for lack of space."""
    if failure is None:
        return "neither (bound reached)"
    full = (
        failure.errno in (errno.ENOSPC, errno.EDQUOT)
        if isinstance(failure, OSError)
        else os.strerror(errno.ENOSPC) in str(failure)
    )
    if not full or inodes_each <= 0 or bytes_each <= 0:
        return f"neither: {failure}"
    return "inodes" if end.inodes_free / inodes_each < end.bytes_free / bytes_each else "space"
