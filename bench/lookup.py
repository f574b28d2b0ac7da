"""Layer-depth lookup cost: finding a file that lives in the bottom layer
through the empty layers stacked above it, and a name that is in no layer.

Three cache states, because they tell different stories:
cold   page cache, dentries and inodes dropped, and what the driver caches
       itself (zfs's ARC): every layer's directory is read from the bench disk;
first  a fresh mount with the bench disk's caches warm: the union filesystem
       walks its layers again, the disk does not;
warm   the same lookup repeated: what a long-running container sees.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from minifs_bench.content import MISSING, TARGET, TARGET_SIZE, check, target_content
from minifs_bench.session import IMAGE, Session
from minifs_bench.stats import summarize

WARM_REPEATS = 200
"""Warm lookups take microseconds; a sample is the mean of this many."""

DEFINITIONS = {
    "stat": "stat() of a file that lives in the bottom layer (µs)",
    "read": f"open()+read() of all {TARGET_SIZE} bytes of that file (µs)",
    "miss": "stat() of a name that exists in no layer: every layer is searched (µs)",
    "cold": "the clone unmounted while the driver drops its own caches (zfs: pool exported "
    "and imported, which empties its ARC), mounted again, then the driver's flush (syncfs; "
    "zfs: a forced commit), an ext4 journal checkpoint and drop_caches=3 (page cache, "
    "dentries, inodes); the bytes each read from the bench disk are kept, and one that read "
    "nothing is counted as not cold",
    "first": "on a freshly made mount, the bench disk's caches warm",
    "warm": f"repeated on the same mount; mean of {WARM_REPEATS}",
    "depth": "L = layers under the clone: the file in the bottom one, L-1 empty layers above",
}


def _stat(root: Path) -> Callable[[], None]:
    path = str(root / TARGET)
    return lambda: os.stat(path)


def _read(root: Path) -> Callable[[], None]:
    path = str(root / TARGET)

    def read() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.read(fd, TARGET_SIZE)
        finally:
            os.close(fd)

    return read


def _miss(root: Path) -> Callable[[], None]:
    path = str(root / MISSING)

    def miss() -> None:
        try:
            os.stat(path)
        except FileNotFoundError:
            return
        raise AssertionError(f"{path} exists")

    return miss


OPS = {"stat": _stat, "read": _read, "miss": _miss}


def _timed(op: Callable[[], None]) -> float:
    start = time.perf_counter_ns()
    op()
    return (time.perf_counter_ns() - start) / 1e3


def run(session: Session, depths: list[int], record: dict) -> None:
    record["definitions"] = DEFINITIONS
    record["depths"] = depths
    record["placement"] = _check_placement(session, max(depths))
    points: list[dict] = []
    record["points"] = points
    for depth in depths:
        session.progress.step(f"{session.driver}: lookups through {depth} layers")
        samples: dict[str, list[float]] = defaultdict(list)
        reads: dict[str, list[int]] = defaultdict(list)
        point = {"depth": depth, "samples_us": samples, "cold_device_read_bytes": reads}
        points.append(point)
        clone = session.name("lookup")
        session.storage.clone(clone, session.layer_at(depth))
        with session.mounted(clone) as target:
            check(
                (target / TARGET).read_bytes() == target_content(),
                f"{session.driver}: the bottom layer's file reads back wrong at depth {depth}",
            )
            ops = {name: make(target) for name, make in OPS.items()}
            for n in range(session.runs):
                names = list(ops)[n % 3 :] + list(ops)[: n % 3]
                for name in names:
                    session.make_cold(target)
                    before = session.device.bytes_read()
                    samples[f"{name}_cold"].append(_timed(ops[name]))
                    reads[name].append(session.device.bytes_read() - before)
                for name in names:
                    session.remount(target)
                    samples[f"{name}_first"].append(_timed(ops[name]))
                for name in names:
                    samples[f"{name}_warm"].append(_warm(ops[name]))
                session.progress.advance()
        session.storage.remove(clone)
        point["summary"] = {key: summarize(values) for key, values in samples.items()}
        # A cold lookup that read nothing from the bench disk was served from memory.
        point["not_cold"] = sum(v == 0 for values in reads.values() for v in values)
    record["not_cold"] = sum(p["not_cold"] for p in points)


def _warm(op: Callable[[], None]) -> float:
    """Mean of WARM_REPEATS lookups after one untimed one."""
    op()
    start = time.perf_counter_ns()
    for _ in range(WARM_REPEATS):
        op()
    return (time.perf_counter_ns() - start) / 1e3 / WARM_REPEATS


def _check_placement(session: Session, deepest: int) -> str:
    """Prove the looked-up file lives in the bottom layer only, where the driver
    keeps per-layer diffs; drivers holding full trees cannot be told apart."""
    driver = session.storage.driver
    bottom = driver.diff_dir(session.storage.stat(IMAGE).id)
    if bottom is None:
        return "not checkable: this driver keeps full trees, not per-layer diffs"
    check(
        (bottom / TARGET).is_file(),
        f"{session.driver}: the lookup target is not in the bottom layer",
    )
    for depth in range(2, deepest + 1):
        diff = driver.diff_dir(session.storage.stat(session.layer_at(depth)).id)
        check(
            diff is not None and not any(diff.iterdir()),
            f"{session.driver}: layer at depth {depth} is not empty",
        )
    return f"checked: in the bottom layer's diff, layers 2..{deepest} empty"
