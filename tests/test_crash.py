"""Crash safety: SIGKILL the real CLI at every failpoint, then `minifs gc` repairs.

Each case builds a base layer with files and a clone with changes on it, kills
one `minifs` command at a named point (minifs.failpoints), and checks what the
issue promises: gc --dry-run names the pending recovery, gc makes the store
consistent (committed layers intact with their content, a killed clone gone or
complete, a killed snapshot rolled forward, a killed remove finished), a second
gc has nothing to do, the backend holds exactly the store's ids, and the name
can be used again.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from minifs import linux
from minifs.model import Kind
from minifs.storage import Storage
from tests.conftest import driver_params

BASE_FILES = {
    "etc/hostname": "minifs\n",
    "bin/tool": "#!/bin/sh\necho tool\n",
    "doomed": "deleted in the clone\n",
}
WORK_FILE = ("work.txt", "written in the clone\n")

# failpoint prefix -> (argv of the command to kill, name it works on, argv that
# reuses that name once gc is done)
OPERATIONS = {
    "clone": (("clone", "new", "--from", "base"), "new", ("clone", "new", "--from", "base")),
    "view": (("view", "new", "--from", "base"), "new", ("view", "new", "--from", "base")),
    "snapshot": (("snapshot", "work", "new"), "work", ("clone", "work", "--from", "new")),
    "remove": (("rm", "work"), "work", ("clone", "work", "--from", "base")),
    "overlay2": (("clone", "new", "--from", "base"), "new", ("clone", "new", "--from", "base")),
}
STORAGE_POINTS = [
    f"{op}:{step}"
    for op in ("clone", "view", "snapshot", "remove")
    for step in ("after-intent", "working", "after-driver")  # working: the lock let go
]


def crash_cases() -> list:
    """Every storage failpoint on every driver, plus each driver's own points."""
    cases = []
    for param in driver_params():
        driver = param.values[0]
        points = [*STORAGE_POINTS]
        if driver == "overlay2":
            points.append("overlay2:prepare-partial")
        for point in points:
            cases.append(pytest.param(driver, point, marks=param.marks, id=f"{driver}-{point}"))
    return cases


CLEAN = {"recovered": [], "orphans": [], "stale_mounts": [], "damaged": [], "partial": []}
"""What `gc` reports for a consistent store."""


def rows(root: Path) -> list[tuple]:
    """Every snapshot row as the database holds it, read behind minifs's back."""
    db = sqlite3.connect(root / "metadata.db")
    try:
        return db.execute(
            "SELECT id, driver, name, kind, parent_id, state, pending_name, labels"
            " FROM snapshots ORDER BY id"
        ).fetchall()
    finally:
        db.close()


def build(storage: Storage, mount) -> None:
    """Layer `base` with BASE_FILES, and clone `work` on it that adds a file and
    deletes one (so a rolled-forward snapshot must keep a whiteout)."""
    storage.clone("b0")
    with mount(storage, "b0") as path:
        for rel, text in BASE_FILES.items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_text(text)
        (path / "bin/tool").chmod(0o755)
        (path / "lib").symlink_to("bin")
    storage.snapshot("b0", "base")
    storage.clone("work", "base")
    with mount(storage, "work") as path:
        (path / WORK_FILE[0]).write_text(WORK_FILE[1])
        (path / "doomed").unlink()


def read_tree(path: Path) -> dict[str, str]:
    """Regular files and symlinks under `path` as {relative path: content or -> target}."""
    found = {}
    for entry in sorted(path.rglob("*")):
        rel = str(entry.relative_to(path))
        if entry.is_symlink():
            found[rel] = f"-> {entry.readlink()}"
        elif entry.is_file():
            found[rel] = entry.read_text()
    return found


BASE_TREE = {**BASE_FILES, "lib": "-> bin"}
WORK_TREE = {**{k: v for k, v in BASE_TREE.items() if k != "doomed"}, WORK_FILE[0]: WORK_FILE[1]}


def on_driver(cli, driver: str):
    """The `cli` fixture with MINIFS_DRIVER set, so every command uses `driver`."""

    def run(*args: str, env: dict[str, str] | None = None, check: bool = False):
        return cli(*args, env={"MINIFS_DRIVER": driver, **(env or {})}, check=check)

    return run


def gc(cli, *flags: str) -> dict[str, dict[str, list[str]]]:
    done = cli("gc", *flags, "--json", check=True)
    return json.loads(done.stdout)


def assert_consistent(driver: str, root: Path, mount) -> Storage:
    """Every row is ready, and the backend holds exactly the store's ids."""
    assert {r[5] for r in rows(root)} == {"ready"}
    storage = Storage(driver, root)
    with storage.changing(recover=False):
        assert storage.driver.ids() == storage.store.ids(driver)
    if driver == "overlay2":
        links = storage.driver.data / "l"
        dangling = [p.name for p in links.iterdir() if not p.exists()]
        assert not dangling, f"l/ symlinks to nothing: {dangling}"
        assert len(list(links.iterdir())) == len(storage.store.ids(driver))
    with mount(storage, "base") as path:
        assert read_tree(path) == BASE_TREE
    return storage


@pytest.mark.parametrize(("driver", "point"), crash_cases())
def test_sigkill_then_gc(driver, point, open_storage, mount, cli, root):
    cli = on_driver(cli, driver)
    storage = open_storage(driver)
    build(storage, mount)
    argv, name, reuse = OPERATIONS[point.split(":")[0]]

    killed = cli(*argv, env={"MINIFS_FAILPOINT": point})
    assert killed.returncode == -9, killed.stderr

    before = rows(root)
    assert any(r[5] != "ready" for r in before), "the crash left no row to recover"
    planned = gc(cli, "--dry-run")[driver]
    assert len(planned["recovered"]) == 1, planned
    assert name in planned["recovered"][0]
    assert rows(root) == before, "gc --dry-run changed the store"

    done = gc(cli)[driver]
    assert done["recovered"] == planned["recovered"]
    assert gc(cli) == {driver: CLEAN}

    after = assert_consistent(driver, root, mount)
    names = {i.name: i for i in after.list()}
    if point.startswith("snapshot:"):
        # Roll forward: the clone became the layer, content and whiteout included.
        assert "work" not in names
        assert names["new"].kind is Kind.LAYER and names["new"].parent == "base"
        with mount(after, "new") as path:
            assert read_tree(path) == WORK_TREE
    elif point.startswith("remove:"):
        assert "work" not in names
    else:
        # A killed clone or view is gone, or (were it rolled forward) complete.
        if "new" in names:
            with mount(after, "new") as path:
                assert read_tree(path) == BASE_TREE
        with mount(after, "work") as path:
            assert read_tree(path) == WORK_TREE
    after.close()

    cli(*reuse, check=True)
    cli("clone", "again", "--from", "base", check=True)
    assert gc(cli)[driver] == CLEAN


@pytest.mark.parametrize("driver", driver_params())
def test_next_change_recovers_without_gc(driver, open_storage, mount, cli, root):
    """Start-up recovery: the next locked operation finishes what a crash left."""
    cli = on_driver(cli, driver)
    build(open_storage(driver), mount)
    for point, argv in (
        ("snapshot:after-driver", ("snapshot", "work", "new")),
        ("clone:after-driver", ("clone", "other", "--from", "new")),
    ):
        killed = cli(*argv, env={"MINIFS_FAILPOINT": point})
        assert killed.returncode == -9, killed.stderr
    # The killed snapshot must be finished before this clone can find layer "new",
    # and the killed clone rolled back before its name is free again.
    cli("clone", "other", "--from", "new", check=True)
    listed = json.loads(cli("ls", "--json", check=True).stdout)
    assert {(i["name"], i["kind"], i["state"]) for i in listed} == {
        ("base", "layer", "ready"),
        ("new", "layer", "ready"),
        ("other", "clone", "ready"),
    }
    storage = assert_consistent(driver, root, mount)
    with mount(storage, "other") as path:
        assert read_tree(path) == WORK_TREE
    storage.close()


@pytest.mark.parametrize("driver", driver_params())
def test_gc_sweeps_orphans_and_stale_mounts(driver, open_storage, mount, cli, root, tmp_path):
    cli = on_driver(cli, driver)
    build(open_storage(driver), mount)
    made = json.loads(cli("clone", "lost", "--from", "base", "--json").stdout)
    db = sqlite3.connect(root / "metadata.db")
    with db:
        db.execute("DELETE FROM snapshots WHERE id = ?", (made["id"],))
    db.close()

    target = tmp_path / "stale"
    target.mkdir()
    cli("mount", "work", str(target), check=True)
    linux.umount(target)  # behind minifs's back: its mount record is now stale

    planned = gc(cli, "--dry-run")[driver]
    assert planned == {**CLEAN, "orphans": [made["id"]], "stale_mounts": [str(target)]}
    storage = Storage(driver, root)
    with storage.changing(recover=False):
        assert made["id"] in storage.driver.ids()
    storage.close()

    assert gc(cli)[driver] == planned
    assert gc(cli)[driver] == CLEAN
    assert_consistent(driver, root, mount).close()
    cli("clone", "lost", "--from", "base", check=True)
