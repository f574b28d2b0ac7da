"""Shared fixtures: real state dirs, real mounts, and a leak check on every test."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from minifs import linux, mounter
from minifs.errors import MinifsError
from minifs.plugins import get_driver, registered
from minifs.resources import Resources
from minifs.state import StateDir
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


def keeps_xattrs(driver: str) -> bool:
    """Whether `driver`'s clones keep xattrs (Driver.xattrs): the shared tests
    write and expect none on a driver without them, and test everything else."""
    return registered()[driver].driver.xattrs


BackendFactory = Callable[[Path], AbstractContextManager[dict[str, str]]]
"""Makes what one driver's backend needs outside minifs in a scratch dir and
yields the storage options that use it; undoes that on exit (after the driver
itself is down). containerd's SnapshotterSuite(t, name, factory) in pytest form."""

BACKENDS: dict[str, BackendFactory] = {}


def backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Register how the tests make driver `name`'s backend; a driver without
    one runs with no options (its defaults)."""

    def register(factory: BackendFactory) -> BackendFactory:
        BACKENDS[name] = factory
        return factory

    return register


@backend("btrfs")
@contextlib.contextmanager
def btrfs_backend(scratch: Path) -> Iterator[dict[str, str]]:
    """Its own loop-backed image, sparse, of a size the tests fill at most a
    few percent of: the driver makes and removes everything itself."""
    yield {"size": "1G"}


@backend("devicemapper")
@contextlib.contextmanager
def devicemapper_backend(scratch: Path) -> Iterator[dict[str, str]]:
    """A sparse pool and clones of a size the tests fill a few percent of
    (the largest layer they apply is 768M)."""
    yield {"datasize": "4G", "basesize": "2G"}


@pytest.fixture(scope="session")
def scope(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session", autouse=True)
def zfs_fuse_daemon(scope: Path) -> Iterator[Resources]:
    """One zfs-fuse daemon for the whole session, started before the first
    test, so zfs tests share it instead of each starting and stopping one
    (3-4 s a stop); taken down once at the end. Where zfs is not in the
    session, or a daemon already answers (or kernel ZFS), nothing is started."""
    resources = Resources(scope / "zfs-session" / "run")
    if "zfs" in registered() and _runs_here("zfs"):
        from minifs_drivers import zfs, zfs_fuse

        if zfs.flavour() == "zfs-fuse":
            zfs_fuse.ensure(resources, resources.run_dir / "zfs-fuse.log")
    yield resources
    resources.down()


def _runs_here(driver: str) -> bool:
    try:
        registered()[driver].driver.probe()
    except MinifsError:
        return False
    wanted = os.environ.get("MINIFS_TEST_DRIVERS")
    return not wanted or driver in wanted.split(",")


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
def backend_options(tmp_path: Path) -> Iterator[Callable[[str], dict[str, str]]]:
    """`backend_options(driver)`: the storage options of `driver`'s test backend,
    made on first use in this test (see BACKENDS) and undone at teardown."""
    made: dict[str, dict[str, str]] = {}
    with contextlib.ExitStack() as undo:

        def options(driver: str) -> dict[str, str]:
            if driver not in made:
                scratch = tmp_path / f"backend-{driver}"
                scratch.mkdir()
                factory = BACKENDS.get(driver)
                made[driver] = undo.enter_context(factory(scratch)) if factory else {}
            return dict(made[driver])

        yield options


@pytest.fixture
def open_storage(
    root: Path, backend_options: Callable[[str], dict[str, str]]
) -> Iterator[Callable[..., Storage]]:
    """Open Storage objects on `root`, with the driver's test backend unless
    options are given or the driver's home was made already (by the CLI, say:
    its recorded options then hold); at teardown unmount, stop and close them
    (before the backend's own teardown, which `backend_options` runs after)."""
    opened: list[Storage] = []

    def factory(driver: str, **options: str) -> Storage:
        made = get_driver(driver)(StateDir(root).home(driver)).config_path.exists()
        storage = Storage(driver, root, options or ({} if made else backend_options(driver)))
        opened.append(storage)
        return storage

    yield factory
    for storage in reversed(opened):
        bring_down(storage)
        storage.close()


def bring_down(storage: Storage) -> None:
    """Detach what a test left mounted from `storage`, then stop its backend."""
    for target, _ in storage.store.all_mounts():
        if linux.is_mountpoint(target):
            linux.umount(target, linux.MNT_DETACH)
    storage.down()


def bring_down_all(root: Path) -> None:
    """Stop every backend that CLI commands brought up in `root` (a loop-backed
    image, a daemon) and the test left running: the `minifs down` a test
    would end with. Homes that never started anything are left alone."""
    drivers = registered()
    for record in sorted(StateDir(root).drivers_dir.glob("*/run/resources.json")):
        name = record.parent.parent.name
        if name in drivers:
            with Storage(name, root) as storage:
                bring_down(storage)


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
def cli(root: Path) -> Iterator[Callable[..., subprocess.CompletedProcess]]:
    """Run the installed `minifs` command against the test's state dir; at
    teardown, stop the backends those commands brought up there."""

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

    yield run
    bring_down_all(root)


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
