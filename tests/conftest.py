"""Shared fixtures: real state dirs, real mounts, and a leak check on every test."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from minifs import linux, mounter
from minifs.errors import MinifsError
from minifs.plugins import registered
from minifs.storage import Storage
from tests import leaks

MINIFS = str(Path(sys.executable).with_name("minifs"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="minifs tests use real mounts and need root")
        for item in items:
            item.add_marker(skip)


def driver_params() -> list:
    """Every registered driver (or those in MINIFS_TEST_DRIVERS); an unavailable
    one is a skip that carries its probe's reason, never a silent pass."""
    wanted = os.environ.get("MINIFS_TEST_DRIVERS")
    names = sorted(registered())
    if wanted:
        names = [n for n in wanted.split(",") if n]
    params = []
    for name in names:
        reason = None
        try:
            registered()[name].driver.probe()
        except MinifsError as exc:
            reason = str(exc)
        except KeyError:
            reason = f"driver {name} is not registered"
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(scope="session")
def scope(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(autouse=True)
def leak_check(scope: Path) -> Iterator[None]:
    before = leaks.snapshot(scope)
    yield
    after = leaks.snapshot(scope)
    leaked = {kind: after[kind] - before[kind] for kind in after if after[kind] - before[kind]}
    if leaked:
        leaks.clean(leaked)
        pytest.fail(f"test left these behind: {leaked}", pytrace=False)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A fresh state dir for one test."""
    return tmp_path / "state"


@pytest.fixture
def open_storage(root: Path) -> Iterator[Callable[..., Storage]]:
    """Open Storage objects on `root`; at teardown unmount, stop and close them."""
    opened: list[Storage] = []

    def factory(driver: str, **options: str) -> Storage:
        storage = Storage(driver, root, options)
        opened.append(storage)
        return storage

    yield factory
    for storage in reversed(opened):
        for target, _ in storage.store.all_mounts():
            if linux.is_mountpoint(target):
                linux.umount(target, linux.MNT_DETACH)
        storage.down()
        storage.close()


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[[Storage, str], contextlib.AbstractContextManager]]:
    """`with mount(storage, name) as path:` mounts through the real mounter."""
    counter = iter(range(1_000_000))

    @contextlib.contextmanager
    def mounted(storage: Storage, name: str) -> Iterator[Path]:
        target = tmp_path / f"mnt{next(counter)}"
        target.mkdir()
        records = storage.mounts(name)
        mounter.mount_all(records, target)
        try:
            yield target
        finally:
            for _ in records:
                mounter.unmount(target)

    return mounted


@pytest.fixture
def cli(root: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run the installed `minifs` command against the test's state dir."""

    def run(
        *args: str, env: dict[str, str] | None = None, check: bool = False, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "MINIFS_ROOT": str(root), **(env or {})}
        done = subprocess.run(
            [MINIFS, *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"minifs {' '.join(args)} failed: {done.stderr}")
        return done

    return run


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """`tmpfs(name, options)` mounts a tmpfs under tmp_path; unmounted at teardown."""
    made: list[Path] = []

    def mount(name: str, options: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        linux.mount("tmpfs", where, "tmpfs", 0, options)
        made.append(where)
        return where

    yield mount
    for where in reversed(made):
        if linux.is_mountpoint(where):
            linux.umount(where, linux.MNT_DETACH)


def refused(done: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    """The one error line of a refused command: the minifs prefix, exit `code`,
    no traceback, naming each of `words`."""
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("minifs: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]
