"""Create / delete latency over a sweep of chain depths, layer commit latency,
and minifs's overhead against the bare kernel operation.

Three ways of making the same clone+mount are timed in each run, in rotating
order so none always goes first, after one untimed round of each: through
minifs (`Storage.clone`, its mount records, the mounter), through the driver
alone (no metadata store, no lock), and by hand (`bare`). Their ratio says what
minifs itself costs.
"""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

from minifs import mounter
from minifs.model import Kind, Mount
from minifs_bench.bare import BARE
from minifs_bench.content import TARGET, TARGET_SIZE, check
from minifs_bench.probes import elapsed_ms
from minifs_bench.session import Session
from minifs_bench.stats import ratio, summarize

DEFINITIONS = {
    "create": "clone+mount through minifs: Storage.clone on the layer at depth L, its mount "
    "records, mounting them (ms)",
    "delete": "umount+remove through minifs: unmount the clone, Storage.remove (ms)",
    "driver_create": "the same clone+mount through the driver alone, without the metadata "
    "store and its lock (ms)",
    "bare_create": "the bare kernel operation the clone stands for, by hand, with the same "
    "mount options on the same disk (ms); bare_delete: its umount and rm -r",
    "create x": "overhead: median minifs create / median bare create at the same depth, same "
    "run (1.0 = no overhead; aim <= 1.25); create_vs_driver in the JSON: over driver_create",
    "delete x": "median minifs delete / median bare delete, likewise",
    "commit": "Storage.snapshot of a clone into a layer of the chain: the image, then empty "
    "layers (ms)",
    "depth": "L = number of layers under the clone, the image at the bottom",
    "runs": "each depth: one untimed round of every way, then --runs rounds in rotating order",
}


def run(session: Session, depths: list[int], record: dict) -> None:
    record["definitions"] = DEFINITIONS
    record["depths"] = depths
    bare = BARE.get(session.driver)
    record["bare"] = bare.what if bare else None
    points: list[dict] = []
    record["points"] = points
    record["commit"] = {
        "samples": [asdict(r) for r in session.chain],
        "summary": summarize([r.commit_ms for r in session.chain]),
    }
    for depth in depths:
        session.progress.step(f"{session.driver}: create/delete at depth {depth}")
        samples: dict[str, list[float]] = defaultdict(list)
        point = {"depth": depth, "samples_ms": samples}
        points.append(point)
        ways: list[Callable[[dict[str, list[float]]], None]] = [
            partial(_through_minifs, session, depth),
            partial(_through_driver, session, depth),
        ]
        if bare is not None:
            clone_records, layer_records = _records(session, depth)
            ways.append(partial(_bare, session, depth, clone_records, layer_records))
        for way in ways:
            way(defaultdict(list))  # warm-up, not kept: first calls pay for cold code paths
        for n in range(session.runs):
            for i in range(len(ways)):
                ways[(n + i) % len(ways)](samples)
            session.progress.advance()
        point["summary"] = {key: summarize(values) for key, values in samples.items()}
        point["overhead"] = {
            "create": _median_ratio(point, "create", "bare_create"),
            "delete": _median_ratio(point, "delete", "bare_delete"),
            "create_vs_driver": _median_ratio(point, "create", "driver_create"),
        }
    worst = [p["overhead"]["create"] for p in points if p["overhead"]["create"] is not None]
    record["overhead_create_max"] = max(worst) if worst else None


def _median_ratio(point: dict, top: str, bottom: str) -> float | None:
    summary = point["summary"]
    if bottom not in summary:
        return None
    return ratio(summary[top]["median"], summary[bottom]["median"])


def _check_mounted(session: Session, target: Path, how: str, depth: int) -> None:
    st = (target / TARGET).stat()
    check(
        st.st_size == TARGET_SIZE,
        f"{session.driver}: a clone at depth {depth} made {how} does not show the image",
    )


def _through_minifs(session: Session, depth: int, samples: dict[str, list[float]]) -> None:
    name = session.name("lat")
    target = session.target()
    start = time.perf_counter_ns()
    session.storage.clone(name, session.layer_at(depth))
    clone_ms = elapsed_ms(start)
    records = session.storage.mounts(name)
    records_ms = elapsed_ms(start) - clone_ms
    mounter.mount_all(records, target)
    create_ms = elapsed_ms(start)
    mount_ms = create_ms - clone_ms - records_ms
    _check_mounted(session, target, "through minifs", depth)
    start = time.perf_counter_ns()
    mounter.unmount_all(records, target)
    umount_ms = elapsed_ms(start)
    session.storage.remove(name)
    delete_ms = elapsed_ms(start)
    target.rmdir()
    for key, value in (
        ("clone", clone_ms),
        ("records", records_ms),
        ("mount", mount_ms),
        ("create", create_ms),
        ("umount", umount_ms),
        ("remove", delete_ms - umount_ms),
        ("delete", delete_ms),
    ):
        samples[key].append(value)


def _through_driver(session: Session, depth: int, samples: dict[str, list[float]]) -> None:
    driver = session.storage.driver
    layer = session.storage.stat(session.layer_at(depth))
    chain = session.storage.store.chain(layer.id)
    sid = secrets.token_hex(16)
    target = session.target()
    start = time.perf_counter_ns()
    driver.prepare(sid, chain)
    records = driver.mounts(sid, Kind.CLONE, chain)
    mounter.mount_all(records, target)
    create_ms = elapsed_ms(start)
    _check_mounted(session, target, "by the driver", depth)
    start = time.perf_counter_ns()
    mounter.unmount_all(records, target)
    driver.remove(sid)
    delete_ms = elapsed_ms(start)
    target.rmdir()
    samples["driver_create"].append(create_ms)
    samples["driver_delete"].append(delete_ms)


def _records(session: Session, depth: int) -> tuple[list[Mount], list[Mount]]:
    """The mount records of a clone of the layer at `depth`, and of the layer:
    what the bare operation must reproduce, asked for outside the timed region."""
    layer = session.layer_at(depth)
    probe = session.name("bare-probe")
    session.storage.clone(probe, layer)
    try:
        return session.storage.mounts(probe), session.storage.mounts(layer)
    finally:
        session.storage.remove(probe)


def _bare(
    session: Session,
    depth: int,
    clone_records: list[Mount],
    layer_records: list[Mount],
    samples: dict[str, list[float]],
) -> None:
    bare = BARE[session.driver]
    scratch = session.scratch / session.name("bench-bare")
    target = session.target()
    start = time.perf_counter_ns()
    bare.create(clone_records, layer_records, scratch, target)
    create_ms = elapsed_ms(start)
    _check_mounted(session, target, "by hand", depth)
    start = time.perf_counter_ns()
    bare.delete(scratch, target)
    delete_ms = elapsed_ms(start)
    target.rmdir()
    samples["bare_create"].append(create_ms)
    samples["bare_delete"].append(delete_ms)
