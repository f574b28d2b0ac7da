"""Many minifs processes on one store: readers never wait for a copy, writers
on other snapshots or drivers go on, and the final state is exactly what the
operations imply.

The state dir's lock covers only the store's short steps; a snapshot's own
lock keeps its long backend work to one command. A process stopped (SIGSTOP)
in the middle of that work stands for a long vfs copy: every command below
must finish while it is stopped, so none of them waited for it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from minifs.storage import Storage
from tests.conftest import MINIFS, refused

WAIT = 60.0
"""A command that would wait for the stopped one never ends: this bounds it."""


def wait_stopped(proc: subprocess.Popen) -> None:
    """Wait until `proc` has stopped itself at its failpoint."""
    deadline = time.monotonic() + WAIT
    while True:
        with open(f"/proc/{proc.pid}/stat", encoding="ascii") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the command never reached its failpoint"
        time.sleep(0.02)


def _stopping_at(root: Path, point: str, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "MINIFS_ROOT": str(root),
        "MINIFS_FAILPOINT": point,
        "MINIFS_FAILPOINT_ACTION": "stop",
    }
    proc = subprocess.Popen(
        [MINIFS, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_stopped(proc)
    return proc


def _resume(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err


@pytest.fixture
def layer(cli) -> str:
    """A vfs layer with a few files, the parent of the clones below."""
    cli("clone", "base", "-d", "vfs", check=True)
    cli("snapshot", "base", "L", "-d", "vfs", check=True)
    return "L"


@pytest.mark.parametrize(
    ("point", "args", "busy"),
    [
        ("clone:working", ("clone", "slow", "--from", "L", "-d", "vfs"), "slow"),
        ("snapshot:working", ("snapshot", "work", "slow-layer", "-d", "vfs"), "work"),
        ("remove:working", ("rm", "gone", "-d", "vfs"), "gone"),
    ],
    ids=["clone", "snapshot", "remove"],
)
def test_nothing_waits_for_another_commands_backend_work(
    cli, root, tmp_path, layer, point, args, busy
):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli("clone", "work", "--from", layer, "-d", "vfs", check=True)
    cli("clone", "gone", "--from", layer, "-d", "vfs", check=True)
    proc = _stopping_at(root, point, *args)
    try:
        run = lambda *a: cli(*a, timeout=WAIT)  # noqa: E731
        rows = {r["name"]: r for r in json.loads(run("ls", "--json").stdout)}
        assert rows[busy]["state"] in ("creating", "committing", "removing")
        assert run("inspect", layer, "-d", "vfs").returncode == 0
        assert run("usage", layer, "-d", "vfs").returncode == 0
        # Work in progress is neither a problem nor something to recover.
        dry = run("gc", "--dry-run", "--json")
        assert dry.returncode == 0 and busy not in dry.stdout, dry.stdout
        assert run("check").returncode == 0
        # Writers on other snapshots and on another driver go on.
        assert run("clone", "other", "--from", layer, "-d", "vfs").returncode == 0
        assert run("rm", "other", "-d", "vfs").returncode == 0
        assert run("clone", "o", "-d", "overlay2").returncode == 0
        assert run("gc").returncode == 0
        # The snapshot at work is left to its command.
        refused(run("rm", busy, "-d", "vfs"), busy, "another minifs command")
        refused(run("mount", busy, str(mnt), "-d", "vfs"), busy, "another minifs")
    finally:
        _resume(proc)
    names = {r["name"]: r["state"] for r in json.loads(cli("ls", "--json").stdout)}
    done = {"clone:working": "slow", "snapshot:working": "slow-layer"}.get(point)
    if done:
        assert names.get(done) == "ready"
    else:
        assert "gone" not in names
    assert cli("check").returncode == 0


def test_many_processes_on_one_store(cli, root, layer, open_storage):
    """Each worker clones, commits, clones again and removes, on vfs or
    overlay2, while readers list; all in parallel. Nothing fails, nothing
    deadlocks, and what is left is exactly what the operations imply."""
    script = """
set -e
m() { "$MINIFS" "$@" >/dev/null; }
m clone c$1 --from L -d vfs
m snapshot c$1 l$1 -d vfs
m clone d$1 --from l$1 -d vfs
m rm d$1 -d vfs
m clone o$1 -d overlay2
m snapshot o$1 p$1 -d overlay2
m ls --json
m rm p$1 -d overlay2
"""
    env = {**os.environ, "MINIFS_ROOT": str(root), "MINIFS": MINIFS}
    workers = 8

    def run_all(parallel: bool, offset: int) -> float:
        start = time.monotonic()
        procs = []
        for i in range(offset, offset + workers):
            proc = subprocess.Popen(
                ["bash", "-c", script, "worker", str(i)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            if not parallel:
                proc.wait(timeout=WAIT * 4)
            procs.append(proc)
        for proc in procs:
            _, err = proc.communicate(timeout=WAIT * 4)
            assert proc.returncode == 0, err
        return time.monotonic() - start

    serial = run_all(False, 0)
    parallel = run_all(True, workers)
    print(f"{workers} workers x 8 commands: serial {serial:.2f} s, parallel {parallel:.2f} s")
    listed = {r["name"]: (r["driver"], r["state"]) for r in json.loads(cli("ls", "--json").stdout)}
    expected = {"L": ("vfs", "ready")}
    for i in range(2 * workers):
        expected[f"l{i}"] = ("vfs", "ready")
    assert listed == expected
    assert cli("check").returncode == 0
    for driver in ("vfs", "overlay2"):
        storage = open_storage(driver)
        storage.up()
        assert storage.driver.ids() == {i.id for i in storage.list()}


def test_one_image_unpacked_once_by_parallel_clones(cli, root, open_storage):
    """Two clones from an image nobody unpacked yet: one unpacks each layer,
    the other waits for that layer instead of unpacking it again."""
    cli("image", "busybox", check=True)
    env = {**os.environ, "MINIFS_ROOT": str(root)}
    procs = [
        subprocess.Popen(
            [MINIFS, "clone", f"b{i}", "--from", "busybox", "-d", "vfs"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
    storage: Storage = open_storage("vfs")
    storage.up()
    kinds = sorted(i.kind.value for i in storage.list())
    assert kinds.count("clone") == 3 and kinds.count("layer") >= 1
    assert not [i for i in storage.list() if "minifs.transient" in i.labels]
