"""Micro-benchmarks of the core operations, with pytest-benchmark.

Run with `make bench-micro` (not part of `make test`: pyproject's testpaths is
tests/). Each operation is timed alone, its setup outside the timed region, on
every driver that runs here, so a change to the store, the mounter or a driver
shows up as a number before it shows up in `minifs bench`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from minifs import linux, mounter
from minifs.errors import MinifsError
from minifs.plugins import registered
from minifs.storage import Storage

DEPTH = 50


def _drivers() -> list:
    params = []
    for name, reg in sorted(registered().items()):
        try:
            reg.driver.probe()
            marks = []
        except MinifsError as exc:
            marks = [pytest.mark.skip(reason=f"{name}: {exc}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=_drivers())
def storage(request, tmp_path: Path) -> Iterator[Storage]:
    """A store holding an image layer with a chain of DEPTH layers on it."""
    s = Storage(request.param, tmp_path / "state")
    s.clone("base")
    target = tmp_path / "fill"
    target.mkdir()
    mounter.mount_all(s.mounts("base"), target)
    try:
        for i in range(64):
            (target / f"f{i}").write_bytes(b"x" * 4096)
    finally:
        mounter.unmount(target)
    s.snapshot("base", "layer1")
    for depth in range(2, DEPTH + 1):
        s.clone("work", f"layer{depth - 1}")
        s.snapshot("work", f"layer{depth}")
    yield s
    for target, _ in s.store.all_mounts():
        if linux.is_mountpoint(target):
            linux.umount(target, linux.MNT_DETACH)
    s.down()
    s.close()


@pytest.fixture
def names() -> Iterator[str]:
    return (f"c{i}" for i in itertools.count())


def test_clone(benchmark, storage, names):
    benchmark.pedantic(
        storage.clone, setup=lambda: ((next(names), "layer1"), {}), rounds=30, iterations=1
    )


def test_clone_deep(benchmark, storage, names):
    benchmark.pedantic(
        storage.clone, setup=lambda: ((next(names), f"layer{DEPTH}"), {}), rounds=30, iterations=1
    )


def test_snapshot(benchmark, storage, names):
    def setup():
        clone = next(names)
        storage.clone(clone, "layer1")
        return (clone, f"{clone}-layer"), {}

    benchmark.pedantic(storage.snapshot, setup=setup, rounds=30, iterations=1)


def test_remove(benchmark, storage, names):
    def setup():
        clone = next(names)
        storage.clone(clone, "layer1")
        return (clone,), {}

    benchmark.pedantic(storage.remove, setup=setup, rounds=30, iterations=1)


def test_mount_records_deep(benchmark, storage):
    storage.clone("deep", f"layer{DEPTH}")
    benchmark(storage.mounts, "deep")


def test_mount_and_unmount_deep(benchmark, storage, tmp_path):
    storage.clone("deep", f"layer{DEPTH}")
    records = storage.mounts("deep")
    target = tmp_path / "mnt"
    target.mkdir()

    def cycle() -> None:
        mounter.mount_all(records, target)
        mounter.unmount(target)

    benchmark(cycle)


def test_store_chain_deep(benchmark, storage):
    sid = storage.stat(f"layer{DEPTH}").id
    chain = benchmark(storage.store.chain, sid)
    assert len(chain) == DEPTH


def test_store_stat(benchmark, storage):
    benchmark(storage.stat, f"layer{DEPTH}")
