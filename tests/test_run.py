"""`minifs run` end to end, as root, through the installed command: the seed's
hand-built container (namespaces, pivot_root, /proc, hostname, cgroup limits
checked with a busy loop and an allocation) on every available driver.

One state dir per module holds the busybox image, unpacked on every driver up
front, so each test pays only for its containers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from minifs.container.cgroups import Hierarchy, choose, hierarchies, own_cgroups
from minifs.errors import MinifsError
from minifs.images import ensure_busybox, resolve_layer
from minifs.plugins import registered
from minifs.storage import Storage
from tests import leaks
from tests.conftest import MINIFS, driver_params
from tests.corpus import docker_archive, member, tar_bytes
from tests.test_concurrency import wait_stopped

Run = Callable[..., subprocess.CompletedProcess]


def available_drivers() -> list[str]:
    """The drivers driver_params() will not skip."""
    wanted = os.environ.get("MINIFS_TEST_DRIVERS")
    found = []
    for name, reg in sorted(registered().items()):
        if wanted and name not in wanted.split(","):
            continue
        try:
            reg.driver.probe()
        except MinifsError:
            continue
        found.append(name)
    return found


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A state dir with busybox unpacked on every driver that runs here."""
    root = tmp_path_factory.mktemp("containers") / "state"
    ref = ensure_busybox(root)
    drivers = available_drivers()
    for driver in drivers:
        with Storage(driver, root) as storage:
            resolve_layer(storage, ref)
    yield root
    for driver in drivers:
        with Storage(driver, root) as storage:
            storage.down()


@pytest.fixture
def env(state: Path, scope: Path, tmp_path: Path) -> dict[str, str]:
    """minifs's environment: this module's state dir, this session's cgroup
    parent, and MINIFS_OWNER so a leaked monitor process is found."""
    return {
        **os.environ,
        "MINIFS_ROOT": str(state),
        "MINIFS_CGROUP_PARENT": leaks.cgroup_parent(scope),
        "MINIFS_OWNER": str(tmp_path),
    }


@pytest.fixture
def minifs(env: dict[str, str]) -> Run:
    def run(
        *args: str, timeout: float = 60, prefix: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*prefix, MINIFS, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )

    return run


def inspect(minifs: Run, name: str) -> dict:
    done = minifs("inspect", name)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_exited(minifs: Run, name: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        data = inspect(minifs, name)
        if data["status"] == "exited":
            return data
        assert time.monotonic() < deadline, f"{name} still {data['state']}"
        time.sleep(0.05)


def cgroup_dir(data: dict, controller: str) -> Path:
    """The container's directory for `controller` (v2 controllers share one)."""
    return Path(data["cgroup"]["paths"][controller])


def no_containers_left(minifs: Run, state: Path) -> None:
    assert json.loads(minifs("ps", "-a", "--json").stdout) == []
    assert not list((state / "containers").glob("*"))
    clones = json.loads(minifs("ls", "--json", "-f", "kind=clone").stdout)
    assert clones == []


# -- isolation, on every driver ------------------------------------------------------

ISOLATION_SCRIPT = r"""
echo "self $$"
sh -c 'echo "second $$"'
echo "pids $(ls /proc | grep '^[0-9]' | tr '\n' ' ')"
echo "pid1 $(tr '\0' ' ' < /proc/1/cmdline)"
echo "mounts $(cut -d' ' -f5 /proc/self/mountinfo | tr '\n' ' ')"
echo "hostname $(hostname) $(cat /etc/hostname)"
test -e /.oldroot && echo "oldroot visible"
test -e "$HOST_ONLY" && echo "host file visible"
echo "devices $(ls /dev | tr '\n' ' ')"
echo "sys $(touch /sys/x 2>&1 | grep -c 'Read-only')"
echo "nameservers $(grep '^nameserver' /etc/resolv.conf | cut -d' ' -f2 | tr '\n' ' ')"
exit 7
"""


@pytest.mark.parametrize("driver", driver_params())
def test_isolation_on_every_driver(driver: str, minifs: Run, state: Path, tmp_path: Path) -> None:
    host_only = tmp_path / "host-only"
    host_only.write_text("the container must not see this")
    host_name = socket.gethostname()
    done = minifs(
        "run", "--rm", "--driver", driver, "--hostname", "tuna", "-e", f"HOST_ONLY={host_only}",
        "busybox", "sh", "-c", ISOLATION_SCRIPT,
    )  # fmt: skip
    assert done.returncode == 7, done.stderr
    out = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    # The --fork lesson: the command is PID 1 and the next process gets a pid.
    assert out["self"] == "1"
    assert out["second"].isdigit() and int(out["second"]) > 1
    assert out["pid1"].startswith("sh -c")
    pids = [int(p) for p in out["pids"].split()]
    assert max(pids) < 10, f"host pids visible: {pids}"
    # pivot_root: only the container's own mounts, no old root, no host files
    # (mounts below /proc and /sys are the hardening's masks: test_container_security.py).
    mounts = {m for m in out["mounts"].split() if not m.startswith(("/proc/", "/sys/"))}
    assert mounts == {"/", "/proc", "/dev", "/dev/pts", "/dev/shm", "/sys"}
    assert "oldroot visible" not in out and "host file visible" not in out
    assert out["hostname"] == "tuna tuna"
    assert socket.gethostname() == host_name
    assert set(out["devices"].split()) >= {"null", "zero", "full", "random", "urandom", "tty"}
    assert out["sys"] == "1"
    # The host's resolvers, but not a loopback one: in the container's own
    # network namespace 127.0.0.53 would be nobody.
    host = [line.split()[1] for line in Path("/etc/resolv.conf").read_text().splitlines()
            if line.startswith("nameserver") and len(line.split()) > 1]  # fmt: skip
    assert out.get("nameservers", "").split() == [
        ns for ns in host if not ns.startswith("127.") and ns != "::1"
    ]
    no_containers_left(minifs, state)


def host_mounts() -> list[tuple[str, str]]:
    """(source, target) of every mount in the test's (the host's) namespace."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        fields = [line.split(" - ", 1) for line in f]
    return [(after.split()[1], before.split()[4]) for before, after in fields]


@pytest.mark.parametrize("driver", driver_params())
def test_container_mounts_never_reach_the_host(
    driver: str, env: dict[str, str], state: Path
) -> None:
    """The container's copy of the mount table is a slave (so a clone the
    backend mounts after unshare still arrives), never a peer: neither what
    the launcher mounts (clone, /proc, /dev) nor a tmpfs the command mounts
    itself shows up on the host while the container runs."""
    script = (
        'trap "exit 0" TERM; mkdir -p /probe && mount -t tmpfs mfs-inside /probe && '
        "grep -c mfs-inside /proc/self/mountinfo && echo ready || exit 3; "
        "while :; do sleep 0.05; done"
    )
    may_mount = ("--cap-add", "SYS_ADMIN")  # a default container may not mount at all
    proc = subprocess.Popen(
        [MINIFS, "run", "--rm", "--driver", driver, *may_mount, "busybox", "sh", "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        seen = [proc.stdout.readline().strip(), proc.stdout.readline().strip()]
        if seen != ["1", "ready"]:  # it ended: say how
            pytest.fail(f"{seen}, exit {proc.wait(timeout=20)}: {proc.stderr.read()}")
        containers = f"{state / 'containers'}/"
        leaked = [(source, target) for source, target in host_mounts()
                  if source == "mfs-inside" or target.startswith(containers)]  # fmt: skip
        assert leaked == []
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        proc.stdout.close()
        proc.stderr.close()
    assert code == 0


def test_trace_names_the_seed_steps(minifs: Run) -> None:
    done = minifs("run", "--rm", "--trace", "busybox", "true")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("minifs trace")]
    assert all(" ms " in line for line in lines)
    steps = [line[len("minifs trace") :].split("  ")[1].strip() for line in lines]
    monitor = ["cgroup", "devices", "fork", "storage", "image", "clone", "started"]
    # The unshare process joins the cgroup and, once PID 1 is forked, leaves
    # the pids one (on cgroup2 the monitor moves it: the same step count).
    unshare = ["cgroup", "unshare", "fork", "cgroup"]
    pid1 = ["mount", "mount", "pivot_root", "mount proc", "umount old", "mount dev", "hostname"]
    hardening = ["seccomp", "mask /proc", "capabilities", "seccomp"]
    assert sorted(steps) == sorted([*monitor, *unshare, *pid1, *hardening, "exec"]), steps
    # The monitor clones while the unshare process joins the cgroup, so their
    # lines interleave; PID 1 goes on once the clone is there, in the seed's order.
    after = ["clone", "pivot_root", "mount proc", "umount old", "mount dev", "hostname", "exec"]
    assert [s for s in steps if s in after] == after
    assert steps.index("unshare") < steps.index("pivot_root")


def test_ctrl_c_while_the_storage_starts_undoes_the_start(
    env: dict[str, str], minifs: Run, state: Path
) -> None:
    """Signals are the container's only from when PID 1 can exist: a Ctrl-C
    while the storage starts (the unshare process forked, waiting) interrupts
    minifs run itself, which takes back the record, cgroup and process."""
    proc = subprocess.Popen(
        [MINIFS, "run", "--rm", "busybox", "true"],
        env={**env, "MINIFS_FAILPOINT": "run:storage", "MINIFS_FAILPOINT_ACTION": "stop"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_stopped(proc)
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "minifs: interrupted"
    no_containers_left(minifs, state)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=str)
def test_signals_reach_the_container(minifs: Run, env: dict[str, str], sig: int) -> None:
    name = signal.Signals(sig).name[3:]
    script = f'trap "echo got {name}; exit 42" {name}; echo ready; while :; do sleep 0.05; done'
    proc = subprocess.Popen(
        [MINIFS, "run", "--rm", "busybox", "sh", "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 42
    assert proc.stdout.read().strip() == f"got {name}"
    proc.stdout.close()


def test_image_entrypoint_cmd_env_workdir_as_docker(
    minifs: Run, state: Path, tmp_path: Path
) -> None:
    """Entrypoint + Cmd, a CMD on the command line replacing Cmd only, the
    image's Env under -e, WorkingDir under -w: docker's rules."""
    busybox = Path("/bin/busybox").read_bytes()
    layer = tar_bytes([
        member("bin", "dir"),
        member("bin/busybox", data=busybox, mode=0o755),
        member("bin/sh", "hardlink", linkname="bin/busybox"),
        member("data", "dir"),
    ])  # fmt: skip
    config = {
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ['echo "cmd $FOO $PWD $PATH $HOME"'],
        "Env": ["FOO=image", "PATH=/bin"],
        "WorkingDir": "/data",
    }
    archive = tmp_path / "cfg.tar"
    archive.write_bytes(docker_archive([layer], tags=("test/cfg:1",), config=config))
    assert minifs("image", "import", str(archive)).returncode == 0
    try:
        plain = minifs("run", "--rm", "test/cfg:1")
        assert (plain.returncode, plain.stdout) == (0, "cmd image /data /bin /root\n"), plain
        override = minifs("run", "--rm", "test/cfg:1", 'echo "override $FOO"')
        assert override.stdout == "override image\n", override.stderr
        flags = minifs("run", "--rm", "-e", "FOO=cli", "-w", "/tmp", "test/cfg:1")
        assert flags.stdout == "cmd cli /tmp /bin /root\n", flags.stderr
    finally:
        removed = minifs("image", "rm", "test/cfg:1")
    assert removed.returncode == 0, removed.stderr
    no_containers_left(minifs, state)


# -- cgroup limits -------------------------------------------------------------------


def _members(directory: Path) -> set[int]:
    return {int(pid) for pid in (directory / "cgroup.procs").read_text().split()}


def test_container_is_in_every_cgroup_and_its_unshare_process_only_out_of_pids(
    minifs: Run, state: Path
) -> None:
    """The join writes the joining thread to `tasks` (see Cgroup.join): the
    whole process must be moved, and PID 1 forked after it too; the unshare
    process takes none of the container's --pids."""
    done = minifs("run", "-d", "--name", "member", "--pids", "8", "busybox", "sleep", "30")
    assert done.returncode == 0, done.stderr
    try:
        data = inspect(minifs, "member")
        pid1 = data["pid"]
        status = Path(f"/proc/{pid1}/status").read_text()
        unshare = int(status.split("PPid:")[1].split()[0])
        pids_dir = cgroup_dir(data, "pids")
        for controller in data["cgroup"]["paths"]:
            where = cgroup_dir(data, controller)
            assert pid1 in _members(where), controller
            assert (unshare in _members(where)) == (where != pids_dir), controller
        assert (pids_dir / "pids.max").read_text().strip() == "8"
    finally:
        assert minifs("stop", "member").returncode == 0
        assert minifs("rm", "member").returncode == 0
    no_containers_left(minifs, state)


def test_storage_refused_after_the_fork_leaves_nothing(env: dict[str, str], tmp_path: Path) -> None:
    """The unshare process is forked before the storage opens (its cgroup join
    overlaps the opening): a store refused then is still one line, 125, and
    the record, cgroup and processes made for the container are gone."""
    root = tmp_path / "state"
    local = {**env, "MINIFS_ROOT": str(root), "MINIFS_DRIVER": "vfs"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [MINIFS, *args], capture_output=True, text=True, env=local, timeout=60, check=False
        )

    assert run("clone", "seed").returncode == 0
    for path in root.glob("metadata.db*"):
        path.unlink()
    done = run("run", "--rm", "busybox", "true")
    assert done.returncode == 125, done.stderr
    assert "metadata store" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not list((root / "containers").iterdir())


def test_cpu_limit_holds_a_busy_loop_to_20_percent(minifs: Run) -> None:
    done = minifs(
        "run", "-d", "--rm", "--name", "spin", "--cpus", "0.2",
        "busybox", "sh", "-c", "while :; do :; done",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    try:
        data = inspect(minifs, "spin")
        if "cpuacct" in data["cgroup"]["paths"]:  # v1: its own counter
            counter = cgroup_dir(data, "cpuacct") / "cpuacct.usage"
            read = lambda: int(counter.read_text())  # noqa: E731
        else:  # v2: usage_usec, the first line of cpu.stat
            counter = cgroup_dir(data, "cpu") / "cpu.stat"
            read = lambda: int(counter.read_text().split()[1]) * 1000  # noqa: E731
        time.sleep(0.3)  # past the first period, which starts with a full quota
        t0, u0 = time.monotonic(), read()
        time.sleep(2.0)
        t1, u1 = time.monotonic(), read()
        share = (u1 - u0) / ((t1 - t0) * 1e9)
        assert 0.15 <= share <= 0.25, f"busy loop used {share:.1%} of a core, not 20%"
    finally:
        stopped = minifs("stop", "-t", "0", "spin")
    assert stopped.returncode == 0, stopped.stderr


def test_memory_limit_oom_kills_250M_and_lets_150M_through(minifs: Run, state: Path) -> None:
    # busybox dd mallocs a buffer of bs bytes and reads /dev/zero into it, so
    # every page of it is touched and charged to the container's cgroup.
    ok = minifs(
        "run", "--rm", "--memory", "200M",
        "busybox", "dd", "if=/dev/zero", "of=/dev/null", "bs=150M", "count=1",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "1+0 records out" in ok.stderr
    killed = minifs(
        "run", "--name", "hog", "--memory", "200M",
        "busybox", "dd", "if=/dev/zero", "of=/dev/null", "bs=250M", "count=1",
    )  # fmt: skip
    assert killed.returncode == 137, killed.stderr
    assert "OOM-killed" in killed.stderr
    data = inspect(minifs, "hog")
    assert data["OOMKilled"] is True and data["exit_code"] == 137
    assert minifs("rm", "hog").returncode == 0
    no_containers_left(minifs, state)


def test_pids_limit_stops_a_fork_bomb(minifs: Run, state: Path) -> None:
    # After the bomb PID 1 only runs builtins: a shell that cannot fork exits.
    bomb = (
        "bomb() { bomb | bomb & }; bomb; wait; "
        "i=0; while [ $i -lt 200000 ]; do i=$((i + 1)); done; echo survived"
    )
    done = minifs(
        "run", "-d", "--name", "bomb", "--pids", "32", "--cpus", "0.5", "busybox", "sh", "-c", bomb
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    pids_dir = cgroup_dir(inspect(minifs, "bomb"), "pids")
    refused = 0
    deadline = time.monotonic() + 10
    while refused == 0 and time.monotonic() < deadline:
        try:
            events = (pids_dir / "pids.events").read_text().split()
        except FileNotFoundError:
            break  # the container already ended
        refused = int(events[events.index("max") + 1])
        assert int((pids_dir / "pids.current").read_text()) <= 32
        time.sleep(0.01)
    data = wait_exited(minifs, "bomb")
    log = minifs("logs", "bomb").stdout
    assert refused > 0 or "can't fork" in log
    assert data["exit_code"] == 0 and "survived" in log
    assert minifs("rm", "bomb").returncode == 0
    no_containers_left(minifs, state)


# -- errors: exit 125, one line, nothing left ------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["no-such-image", "true"], 125, "no layer or image named"),
        (["--memory", "1k", "busybox", "true"], 125, "--memory 1k"),
        (["--cpus", "0", "busybox", "true"], 125, "--cpus 0"),
        (["busybox", "no-such-command"], 127, "no-such-command: command not found"),
        (["busybox", "/etc/passwd"], 126, "/etc/passwd: permission denied"),
        (["--net", "none", "--ip", "10.1.1.1", "busybox", "true"], 125, "--ip needs --net"),
        (["--masquerade", "busybox", "true"], 125, "--masquerade needs --net bridge"),
        (["--name", "bad/name", "busybox", "true"], 125, "invalid container name"),
        (["--size", "10G", "busybox", "true"], 125, "overlay2 driver cannot cap"),
        (["--size", "ten", "busybox", "true"], 125, "--size 'ten' is not a size"),
    ],
    ids=[
        "unknown-image",
        "memory-1k",
        "cpus-0",
        "no-command",
        "not-executable",
        "ip-without-bridge",
        "masquerade-without-bridge",
        "bad-name",
        "size",
        "bad-size",
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    minifs: Run, state: Path, args: list[str], code: int, words: str
) -> None:
    """125 for minifs's own errors, 126 for a command that cannot be run, 127 for
    one that is not there (as docker; every such case in tests/test_container_exit.py)."""
    done = minifs("run", "--rm", *args)
    assert done.returncode == code, done.stderr
    assert words in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr
    no_containers_left(minifs, state)


def test_name_in_use_is_125(minifs: Run, state: Path) -> None:
    first = minifs("run", "--name", "taken", "busybox", "true")
    assert first.returncode == 0, first.stderr
    second = minifs("run", "--rm", "--name", "taken", "busybox", "true")
    assert second.returncode == 125
    assert "in use" in second.stderr
    assert minifs("rm", "taken").returncode == 0
    no_containers_left(minifs, state)


def test_help_loads_neither_pyroute2_nor_rich() -> None:
    code = (
        "import sys; from minifs.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('pyroute2', 'rich') if m in sys.modules))"
    )
    done = subprocess.run(
        [str(Path(MINIFS).with_name("python")), "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "[]"


def test_cgroup_version_is_chosen_per_controller(tmp_path: Path) -> None:
    """This machine binds cpu, memory and pids to v1 hierarchies and mounts an
    empty cgroup2 beside them: each goes to v1. A v2 hierarchy that offers
    only memory and pids (written out as its cgroup.controllers) takes those
    two while cpu stays on v1: the choice is made per controller."""
    real = choose(hierarchies(), own_cgroups(), "minifs")
    assert {c: p.version for c, p in real.items() if c in ("cpu", "memory", "pids")} == {
        "cpu": 1, "memory": 1, "pids": 1
    }  # fmt: skip
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("memory pids io\n")
    found = [
        Hierarchy(tmp_path / "cpu", "/", frozenset({"cpu", "cpuacct"}), 1),
        Hierarchy(v2, "/", frozenset(), 2),
    ]
    mixed = choose(found, {"": "/", "cpu": "/", "cpuacct": "/"}, "/minifs")
    assert {c: (p.version, p.parent) for c, p in mixed.items()} == {
        "cpu": (1, tmp_path / "cpu" / "minifs"),
        "cpuacct": (1, tmp_path / "cpu" / "minifs"),
        "memory": (2, v2 / "minifs"),
        "pids": (2, v2 / "minifs"),
    }
