"""Containers after `run`: ps, inspect, logs, exec, stop, rm, a stopped
container's clone turned into a layer, and a killed monitor's leftovers
reclaimed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from minifs.container.records import alive
from tests.conftest import MINIFS
from tests.test_run import (  # noqa: F401
    Run,
    cgroup_dir,
    env,
    inspect,
    minifs,
    no_containers_left,
    state,
    wait_exited,
)


def test_detached_container_ps_logs_exec_stop_rm(minifs: Run, state: Path) -> None:  # noqa: F811
    started = minifs(
        "run", "-d", "--name", "web", "--hostname", "web", "-e", "GREETING=hello",
        "busybox", "sh", "-c", 'echo "$GREETING from $(hostname)"; exec sleep 60',
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    cid = started.stdout.strip()
    assert len(cid) == 32
    try:
        rows = json.loads(minifs("ps", "--json").stdout)
        assert [(r["name"], r["id"], r["status"]) for r in rows] == [("web", cid, "running")]
        deadline = time.monotonic() + 10
        while "hello from web" not in (log := minifs("logs", "web").stdout):
            assert time.monotonic() < deadline, log
            time.sleep(0.05)
        data = inspect(minifs, cid[:8])
        assert data["name"] == "web" and data["stats"]["pids"] >= 1
        # exec joins the namespaces and cgroup: same hostname, its own pid, PID 1 is sleep.
        done = minifs(
            "exec", "-e", "X=1", "-w", "/tmp", "web",
            "sh", "-c", 'echo "$(hostname) $$ $X $PWD $(cat /proc/1/comm)"; exit 3',
        )  # fmt: skip
        assert done.returncode == 3, done.stderr
        host, pid, x, pwd, comm = done.stdout.split()
        assert (host, x, pwd, comm) == ("web", "1", "/tmp", "sleep") and int(pid) > 1
        missing = minifs("exec", "web", "no-such-command")
        assert missing.returncode == 127 and "command not found" in missing.stderr
        busy = minifs("rm", "web")
        assert busy.returncode == 2 and "is running" in busy.stderr
    finally:
        stopped = minifs("stop", "-t", "0.2", "web")
    assert stopped.returncode == 0, stopped.stderr
    data = inspect(minifs, "web")
    # sleep as PID 1 has no SIGTERM handler, so stop had to SIGKILL it.
    assert (data["status"], data["exit_code"], data["OOMKilled"]) == ("exited", 137, False)
    assert not any(Path(p).exists() for p in data["cgroup"]["paths"].values())
    assert minifs("ps", "--json").stdout.strip() == "[]"
    assert minifs("exec", "web", "true").returncode == 125
    assert minifs("rm", "web").returncode == 0
    no_containers_left(minifs, state)


def test_stopped_container_clone_becomes_a_layer(minifs: Run, state: Path) -> None:  # noqa: F811
    built = minifs("run", "--name", "builder", "busybox", "sh", "-c", "echo built > /artifact")
    assert built.returncode == 0, built.stderr
    assert minifs("snapshot", "builder", "with-artifact").returncode == 0
    assert minifs("rm", "builder").returncode == 0
    done = minifs("run", "--rm", "with-artifact", "cat", "/artifact")
    assert (done.returncode, done.stdout) == (0, "built\n"), done.stderr
    assert minifs("rm", "with-artifact").returncode == 0
    no_containers_left(minifs, state)


def kill_monitor(run: Run, name: str) -> dict:
    """SIGKILL container `name`'s monitor and wait until PID 1 follows it (it
    dies with its parents, PR_SET_PDEATHSIG, taking its namespaces along);
    returns the container's inspect data."""
    data = inspect(run, name)
    os.kill(data["monitor_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(data["pid"], data["pid_start"]):
        assert time.monotonic() < deadline, "PID 1 outlived its monitor"
        time.sleep(0.02)
    return data


def test_killed_monitor_is_reclaimed(minifs: Run, state: Path) -> None:  # noqa: F811
    started = minifs(
        "run", "-d", "--rm", "--name", "orphan", "--memory", "64M", "busybox", "sleep", "60"
    )
    assert started.returncode == 0, started.stderr
    data = kill_monitor(minifs, "orphan")
    # What outlives it (cgroup, clone, record) goes at the next ps.
    assert Path(cgroup_dir(data, "memory")).exists()
    assert json.loads(minifs("ps", "-a", "--json").stdout) == []
    assert not any(Path(p).exists() for p in data["cgroup"]["paths"].values())
    no_containers_left(minifs, state)


def test_concurrent_runs_share_nothing_and_leave_nothing(
    minifs: Run,  # noqa: F811
    state: Path,  # noqa: F811
    env: dict[str, str],  # noqa: F811
) -> None:
    """Four starts at once: the state lock, the cgroup parent that each end
    removes when it empties, and the names must not trip over each other."""
    procs = [
        subprocess.Popen(
            [MINIFS, "run", "--rm", "--memory", "32M", "busybox", "sh", "-c", f"exit {n}"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    results = [(p.wait(timeout=60), p.stderr.read() if p.stderr else "") for p in procs]
    for p in procs:
        if p.stderr:
            p.stderr.close()
    assert [code for code, _ in results] == [0, 1, 2, 3], results
    no_containers_left(minifs, state)
