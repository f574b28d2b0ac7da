"""A default `minifs run` container cannot reach the host: Docker's 14
capabilities, read-only and masked /proc, only the default device nodes, the
default seccomp profile; and the docker-style flags that loosen or tighten it.
Everything is checked from inside real containers, as root, on every driver.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from minifs.container.capabilities import DEFAULT, NAMES
from tests.conftest import driver_params, refused
from tests.test_container_net import enter, netns  # noqa: F401
from tests.test_run import Run, env, inspect, minifs, no_containers_left, state  # noqa: F401

MARKER = "minifs-host-disk-marker-5a1e"


def mask(names: list[str] | tuple[str, ...]) -> int:
    bits = 0
    for name in names:
        bits |= 1 << NAMES.index(name)
    return bits


def cap_sets(output: str) -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd, CapAmb from /proc/self/status lines."""
    found = {}
    for line in output.splitlines():
        key, _, value = line.partition(":")
        if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            found[key] = int(value.strip(), 16)
    return found


def host_bounding() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return cap_sets(f.read())["CapBnd"]


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A loop device holding a marker: the host disk a container must not read.
    Returns its (major, minor); detached afterwards."""
    image = tmp_path / "disk.img"
    image.write_bytes(MARKER.encode() + b"\0" * (1 << 20))
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        st = os.stat(dev)
        yield os.major(st.st_rdev), os.minor(st.st_rdev)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


CONFINED_SCRIPT = r"""
grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)|^Seccomp:|^NoNewPrivs' /proc/self/status
echo x > /proc/sys/kernel/hostname 2>/dev/null && echo "sysctl written"
echo h > /proc/sysrq-trigger 2>/dev/null && echo "sysrq written"
echo "keys $(cat /proc/keys | wc -c) timer_list $(cat /proc/timer_list | wc -c)"
echo "firmware $(ls /sys/firmware | wc -l)"
mount -t tmpfs none /tmp 2>&1 | sed 's/^/mount: /'
unshare -U true 2>&1 | sed 's/^/unshare: /'
mknod /disk b $MAJOR $MINOR && echo "mknod made"
head -c 64 /disk 2>&1 | sed 's/^/disk: /'
echo
chown 1234:1234 /etc/hostname && echo "chown ok"
echo data > /written && echo "write ok"
httpd -p 80 -h / && echo "port 80 bound"
"""


@pytest.mark.parametrize("driver", driver_params())
def test_default_container_cannot_reach_the_host(
    driver: str,
    minifs: Run,  # noqa: F811
    state: Path,  # noqa: F811
    loop_disk: tuple[int, int],
) -> None:
    major, minor = loop_disk
    assert Path("/proc/keys").exists() and Path("/proc/timer_list").read_text()
    done = minifs(
        "run", "--rm", "--driver", driver, "-e", f"MAJOR={major}", "-e", f"MINOR={minor}",
        "busybox", "sh", "-c", CONFINED_SCRIPT,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    sets = cap_sets(out)
    default = mask(DEFAULT)
    assert sets == {"CapInh": default, "CapPrm": default, "CapEff": default, "CapBnd": default,
                    "CapAmb": 0}, out  # fmt: skip
    assert "Seccomp:\t2" in out and "NoNewPrivs:\t0" in out
    assert "sysctl written" not in out and "sysrq written" not in out
    assert "keys 0 timer_list 0" in out and "firmware 0" in out
    assert "mount: mount: permission denied" in out, out
    assert "unshare: unshare: unshare(0x10000000): Operation not permitted" in out, out
    assert "mknod made" in out  # CAP_MKNOD is Docker's too: it is the open that is refused
    assert "disk: head: /disk: Operation not permitted" in out, out
    assert MARKER not in out
    assert "chown ok" in out and "write ok" in out and "port 80 bound" in out
    no_containers_left(minifs, state)


def test_privileged_lifts_it_all(minifs: Run, loop_disk: tuple[int, int]) -> None:  # noqa: F811
    """The same checks pass the other way under --privileged: what the default
    test sees refused is refused by the confinement, not by something else."""
    major, minor = loop_disk
    done = minifs(
        "run", "--rm", "--privileged", "-e", f"MAJOR={major}", "-e", f"MINOR={minor}",
        "busybox", "sh", "-c", CONFINED_SCRIPT,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert cap_sets(out)["CapEff"] == host_bounding()
    assert "Seccomp:\t0" in out and "sysctl written" in out
    assert MARKER in out


def run_caps(minifs: Run, *flags: str) -> dict[str, int]:  # noqa: F811
    done = minifs("run", "--rm", *flags, "busybox", "grep", "^Cap", "/proc/self/status")
    assert done.returncode == 0, done.stderr
    return cap_sets(done.stdout)


def test_cap_add_and_drop_change_every_set(minifs: Run) -> None:  # noqa: F811
    only = run_caps(minifs, "--cap-drop", "ALL", "--cap-add", "net_admin")
    assert only == {"CapInh": mask(["NET_ADMIN"]), "CapPrm": mask(["NET_ADMIN"]),
                    "CapEff": mask(["NET_ADMIN"]), "CapBnd": mask(["NET_ADMIN"]),
                    "CapAmb": 0}  # fmt: skip
    fewer = run_caps(minifs, "--cap-drop", "CAP_CHOWN", "--cap-add", "SYS_PTRACE")
    expected = mask([*(c for c in DEFAULT if c != "CHOWN"), "SYS_PTRACE"])
    assert fewer["CapEff"] == fewer["CapBnd"] == expected
    chown = minifs("run", "--rm", "--cap-drop", "chown", "busybox", "chown", "1:1", "/etc/hostname")
    assert chown.returncode == 1 and "Operation not permitted" in chown.stderr


def test_seccomp_profile_as_data(minifs: Run, tmp_path: Path) -> None:  # noqa: F811
    """A user's profile in Docker's format is what filters; unconfined lifts
    seccomp alone (unshare -U then works: only the profile refused it)."""
    profile = tmp_path / "no-mkdir.json"
    profile.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}
                ],
            }
        )
    )
    done = minifs(
        "run", "--rm", "--security-opt", f"seccomp={profile}", "busybox", "sh", "-c",
        "mkdir /d; grep Seccomp: /proc/self/status; unshare -U true && echo unshared",
    )  # fmt: skip
    assert "mkdir: can't create directory '/d': Permission denied" in done.stderr, done.stderr
    assert "Seccomp:\t2" in done.stdout and "unshared" in done.stdout
    free = minifs(
        "run", "--rm", "--security-opt", "seccomp=unconfined", "busybox", "sh", "-c",
        "grep Seccomp: /proc/self/status; unshare -U true && echo unshared; "
        "mount -t tmpfs none /tmp || echo still no mount",
    )  # fmt: skip
    assert "Seccomp:\t0" in free.stdout and "unshared" in free.stdout
    assert "still no mount" in free.stdout  # no CAP_SYS_ADMIN either


def test_no_new_privileges_read_only_and_user(minifs: Run) -> None:  # noqa: F811
    script = (
        "id; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; "
        "touch /x || echo root read-only; touch /tmp/x && echo tmp writable"
    )
    done = minifs(
        "run", "--rm", "--security-opt", "no-new-privileges", "--read-only", "--tmpfs", "/tmp",
        "--user", "1000:1001", "busybox", "sh", "-c", script,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "uid=1000 gid=1001" in out and "NoNewPrivs:\t1" in out
    sets = cap_sets(out)
    assert sets["CapEff"] == 0 and sets["CapBnd"] == mask(DEFAULT)
    assert "root read-only" in out and "tmp writable" in out


def test_exec_inspect_and_trace_show_the_same_confinement(minifs: Run) -> None:  # noqa: F811
    started = minifs("run", "-d", "--rm", "--name", "sec", "--cap-add", "SYS_NICE", "busybox",
                     "sleep", "60")  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        security = inspect(minifs, "sec")["security"]
        assert security["capabilities"] == [n for n in NAMES if n in {*DEFAULT, "SYS_NICE"}]
        assert security["seccomp"] == "default" and security["devices"] == "default"
        assert "/proc/keys" in security["masked_paths"]
        assert "/proc/sys" in security["read_only_paths"]
        done = minifs("exec", "sec", "sh", "-c", "grep -E '^(CapEff|Seccomp:)' /proc/self/status")
        assert done.returncode == 0, done.stderr
        assert cap_sets(done.stdout)["CapEff"] == mask([*DEFAULT, "SYS_NICE"])
        assert "Seccomp:\t2" in done.stdout
    finally:
        minifs("stop", "-t", "0", "sec")
    traced = minifs("run", "--rm", "--trace", "busybox", "true")
    steps = [
        line.split()[2] for line in traced.stderr.splitlines() if line.startswith("minifs trace")
    ]
    for step in ("devices", "mask", "capabilities", "seccomp"):
        assert step in steps, traced.stderr
    assert steps.index("exec") - 1 == len(steps) - 1 - steps[::-1].index("seccomp")  # last
    assert "cached in" in traced.stderr  # compiled by an earlier container of this state dir


def test_ping_on_the_bridge_still_works(
    minifs: Run,  # noqa: F811
    netns: str,  # noqa: F811
) -> None:
    done = minifs(
        "run", "--rm", "--net", "bridge", "busybox", "sh", "-c",
        "ping -c 1 -W 2 $(ip route | awk '/^default/ {print $3}')",
        prefix=enter(netns),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 packets received" in done.stdout


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--cap-add", "NOPE"], ["--cap-add NOPE", "unknown capability"]),
        (["--cap-drop", "CAP_FLY"], ["--cap-drop CAP_FLY", "unknown capability"]),
        (["--security-opt", "apparmor=x"], ["apparmor=x", "unknown security option"]),
        (["--security-opt", "seccomp=/no/such.json"], ["/no/such.json", "cannot read"]),
        (["--security-opt", "seccomp=BAD"], ["not JSON"]),
        (["--security-opt", "seccomp=ACTION"], ["SCMP_ACT_NOPE", "not a seccomp action"]),
        (["--user", "a:b:c"], ["--user", "UID[:GID]"]),
        (["--tmpfs", "tmp"], ["--tmpfs tmp", "absolute"]),
    ],
)
def test_bad_security_input_is_one_line_125(
    flags: list[str],
    words: list[str],
    minifs: Run,  # noqa: F811
    state: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    action = tmp_path / "action.json"
    action.write_text(json.dumps({"defaultAction": "SCMP_ACT_NOPE"}))
    flags = [f"seccomp={bad}" if f == "seccomp=BAD" else f for f in flags]
    flags = [f"seccomp={action}" if f == "seccomp=ACTION" else f for f in flags]
    done = minifs("run", "--rm", *flags, "busybox", "true")
    refused(done, *words, code=125)
    no_containers_left(minifs, state)


def test_the_monitor_reads_the_capabilities_the_kernel_reports() -> None:
    """`--cap-add` is checked against /proc/self/status (no ctypes in the
    monitor); it must say what capget(2) says, for a full and a reduced set."""
    from minifs import linux
    from minifs.container import capabilities

    assert capabilities.held() == linux.capget()[0]
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # drop one capability from the permitted set, then compare again
        permitted, inheritable = linux.capget()
        linux.capset(permitted & ~1, permitted & ~1, inheritable & ~1)
        os.write(w, b"1" if capabilities.held() == linux.capget()[0] == permitted & ~1 else b"0")
        os._exit(0)
    os.close(w)
    said = os.read(r, 1)
    os.close(r)
    os.waitpid(child, 0)
    assert said == b"1"
