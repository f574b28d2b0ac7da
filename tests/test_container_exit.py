"""How a container's end is told: its exit code recorded whoever ends it (its
monitor, a concurrent stop, a reclaim), and docker's codes for a command that
cannot start: 127 when it is not in the image, 126 when it is there but
cannot be run, from `run`, `run -d` and `exec` alike."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from minifs.container import records
from minifs.container.lifecycle import _orphan, reclaim
from minifs.container.records import Container
from minifs.resources import process_start_time
from tests.conftest import MINIFS, refused
from tests.corpus import docker_archive, member, tar_bytes
from tests.test_container_cli import kill_monitor
from tests.test_run import (  # noqa: F401
    Run,
    env,
    inspect,
    minifs,
    no_containers_left,
    state,
)

# -- the exit code, whoever ends the container ----------------------------------------


def _each(argvs: list[list[str]], env: dict[str, str]) -> list[tuple[int, str]]:  # noqa: F811
    """Run every `minifs ARGV` at once; (exit code, stderr) of each."""
    procs = [
        subprocess.Popen(
            [MINIFS, *argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    deadline = time.monotonic() + 60
    try:
        results = []
        for proc in procs:
            _, stderr = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            results.append((proc.returncode, stderr))
        return results
    finally:
        for proc in procs:  # only on a timeout: those still running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()


def test_parallel_stops_each_record_the_exit_code(
    minifs: Run,  # noqa: F811
    state: Path,  # noqa: F811
    env: dict[str, str],  # noqa: F811
) -> None:
    """20 stops at once. Each monitor records its container's end, and the
    reclaim every stop runs afterwards must not take a container whose monitor
    saved the end and exited after the reclaim listed it for one whose monitor
    died: it used to, and wrote "no exit code" over the 137 of many of them."""
    names = [f"par{n}" for n in range(20)]
    try:
        started = _each(
            [["run", "-d", "--name", n, "busybox", "sleep", "1000"] for n in names], env
        )
        assert [code for code, _ in started] == [0] * len(names), started
        stopped = _each([["stop", "-t", "0", n] for n in names], env)
        assert [code for code, _ in stopped] == [0] * len(names), stopped
        rows = json.loads(minifs("ps", "-a", "--json").stdout)
        # -t 0: SIGTERM, which sleep as PID 1 ignores, then SIGKILL at once.
        ends = {r["name"]: (r["status"], r["exit_code"], r["state"][:12]) for r in rows}
        assert ends == {n: ("exited", 137, "exited (137)") for n in names}
    finally:
        removed = minifs("rm", "-f", *names)
    assert removed.returncode == 0, removed.stderr
    no_containers_left(minifs, state)


def test_container_whose_monitor_died_is_recorded_as_killed(minifs: Run, state: Path) -> None:  # noqa: F811
    """No monitor left to reap it: the monitor's death SIGKILLs PID 1 (parent
    death signals), and the reclaim that finds it records 137 for it."""
    started = minifs("run", "-d", "--name", "orphan", "busybox", "sleep", "60")
    assert started.returncode == 0, started.stderr
    try:
        kill_monitor(minifs, "orphan")
        rows = json.loads(minifs("ps", "-a", "--json").stdout)
        ends = [(r["name"], r["status"], r["exit_code"], r["error"]) for r in rows]
        assert ends == [("orphan", "exited", 137, "its monitor died")]
    finally:
        removed = minifs("rm", "-f", "orphan")
    assert removed.returncode == 0, removed.stderr
    no_containers_left(minifs, state)


@pytest.fixture
def dead_monitor() -> tuple[int, int]:
    """The pid and start time of a process that has ended, as a killed
    monitor's record names them."""
    proc = subprocess.Popen(["sleep", "60"])
    start = process_start_time(proc.pid)
    assert start is not None
    proc.kill()
    proc.wait()
    return proc.pid, start


def _running(root: Path, monitor: tuple[int, int], **values: object) -> Container:
    """A saved record of a running container whose monitor is `monitor`."""
    pid, start = monitor
    container = Container.new(
        root,
        image="busybox",
        driver="vfs",
        status=records.RUNNING,
        monitor_pid=pid,
        monitor_start=start,
        **values,
    )
    container.save()
    return container


@pytest.mark.parametrize(("saved", "recorded"), [(3, 3), (None, 137)], ids=["saved", "none"])
def test_reclaim_keeps_the_code_its_monitor_saved(
    root: Path, dead_monitor: tuple[int, int], saved: int | None, recorded: int
) -> None:
    """A monitor saves the code as soon as it reaps the command, then cleans
    up. Killed in between, it leaves the code for reclaim to keep; killed
    before, its container was SIGKILLed with it: 137."""
    container = _running(root, dead_monitor, exit_code=saved)
    assert reclaim(root) == [f"reclaimed container {container.name} ({container.id[:12]})"]
    ended = records.load(container.dir)
    assert ended is not None
    assert (ended.status, ended.exit_code, ended.error) == ("exited", recorded, "its monitor died")
    assert reclaim(root) == []


def test_a_stale_listing_is_not_taken_for_an_orphan(
    root: Path, dead_monitor: tuple[int, int]
) -> None:
    """The race concurrent stops lost, step by step: reclaim lists a running
    container; its monitor saves the end and exits; reclaim then finds the
    monitor dead. The record on disk decides, not the listing."""
    listed = _running(root, dead_monitor)
    ended = records.load(listed.dir)
    assert ended is not None
    ended.status, ended.exit_code = records.EXITED, 137
    ended.save()
    assert _orphan(listed) is None
    assert reclaim(root) == []
    final = records.load(listed.dir)
    assert final is not None and (final.status, final.exit_code) == ("exited", 137)


# -- 126 and 127: a command that cannot start ---------------------------------------

BAD = "test/bad-commands:1"
COMMANDS = [
    ("no-such-command", 127, "no-such-command: command not found"),
    ("/no/such/file", 127, "/no/such/file: no such file"),
    ("/script", 127, "/script: its #! interpreter or loader is not in the image"),
    ("/data", 126, "/data: permission denied"),
    ("/dir", 126, "/dir: is a directory"),
    ("/garbage", 126, "/garbage: exec format error"),
]
"""(command, docker's exit code, what the one error line says)."""


@pytest.fixture
def bad_image(minifs: Run, tmp_path: Path) -> Iterator[str]:  # noqa: F811
    """busybox beside a file that is not executable, a directory, a script
    whose interpreter is missing and an executable file of no known format."""
    busybox = Path("/bin/busybox").read_bytes()
    layer = tar_bytes([
        member("bin", "dir"),
        member("bin/busybox", data=busybox, mode=0o755),
        member("bin/sh", "hardlink", linkname="bin/busybox"),
        member("bin/sleep", "hardlink", linkname="bin/busybox"),
        member("data", data=b"not a program\n", mode=0o644),
        member("dir", "dir"),
        member("script", data=b"#!/no/interpreter\n", mode=0o755),
        member("garbage", data=b"\x00\x01 neither ELF nor #!\n", mode=0o755),
    ])  # fmt: skip
    archive = tmp_path / "bad.tar"
    archive.write_bytes(docker_archive([layer], tags=(BAD,)))
    imported = minifs("image", "import", str(archive))
    assert imported.returncode == 0, imported.stderr
    yield BAD
    removed = minifs("image", "rm", BAD)
    assert removed.returncode == 0, removed.stderr


@pytest.mark.parametrize("detach", [False, True], ids=["foreground", "detached"])
def test_run_a_command_that_cannot_start(
    minifs: Run,  # noqa: F811
    state: Path,  # noqa: F811
    bad_image: str,
    detach: bool,
) -> None:
    """127 when the command is not in the image, 126 when it cannot be run, as
    docker: one line, nothing left behind."""
    flags = ["-d"] if detach else []
    for command, code, words in COMMANDS:
        done = minifs("run", "--rm", *flags, bad_image, command)
        refused(done, words, code=code)
        assert done.stdout == ""
    no_containers_left(minifs, state)


def test_exec_a_command_that_cannot_start(minifs: Run, state: Path, bad_image: str) -> None:  # noqa: F811
    """exec tells the same cases apart with the same codes."""
    started = minifs("run", "-d", "--name", "host", bad_image, "sleep", "60")
    assert started.returncode == 0, started.stderr
    try:
        for command, code, words in COMMANDS:
            refused(minifs("exec", "host", command), words, code=code)
        assert minifs("exec", "host", "sh", "-c", "exit 3").returncode == 3
    finally:
        removed = minifs("rm", "-f", "host")
    assert removed.returncode == 0, removed.stderr
    no_containers_left(minifs, state)
