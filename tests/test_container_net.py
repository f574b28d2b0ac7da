"""`--net bridge`: the seed's veth pair on a bridge, tested without a packet
leaving the machine: the whole run, "host" side included, happens inside a
network namespace the test makes (`ip netns add`) and deletes afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from minifs.container.network import LEASES_DIR
from minifs.container.records import alive
from tests import leaks
from tests.conftest import MINIFS
from tests.test_run import Run, env, inspect, minifs, no_containers_left, state  # noqa: F401


@pytest.fixture
def netns(scope: Path) -> Iterator[str]:
    name = leaks.netns_prefix(scope) + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def enter(netns: str) -> tuple[str, ...]:
    """The prefix that runs minifs in `netns`. Not `ip netns exec`: that also
    remounts /sys, and with it goes every cgroup hierarchy under /sys/fs/cgroup."""
    return ("nsenter", f"--net=/run/netns/{netns}")


def start_on_bridge(minifs: Run, netns: str, name: str, *flags: str) -> None:  # noqa: F811
    """A detached, self-removing `sleep 60` named `name` on the bridge in `netns`."""
    started = minifs(
        "run", "-d", "--rm", "--net", "bridge", *flags, "--name", name, "busybox", "sleep", "60",
        prefix=enter(netns),
    )  # fmt: skip
    assert started.returncode == 0, started.stderr


def in_netns(netns: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=False
    )


def links(netns: str) -> list[str]:
    out = in_netns(netns, "ip", "-j", "link", "show").stdout
    return sorted(link["ifname"] for link in json.loads(out))


def netns_inode(netns: str) -> str:
    return str(Path(f"/run/netns/{netns}").stat().st_ino)


def test_two_containers_reach_each_other_and_the_gateway(
    minifs: Run,  # noqa: F811
    state: Path,  # noqa: F811
    netns: str,
) -> None:
    inside = enter(netns)
    start_on_bridge(minifs, netns, "server")
    try:
        server = inspect(minifs, "server")
        assert server["ip"] == "172.17.0.2" and server["gateway"] == "172.17.0.1"
        # The seed's ping, container to container and container to the gateway.
        script = (
            "ip -o -4 addr show eth0; ip route show default; "
            "ping -c 1 -W 2 172.17.0.2 && ping -c 1 -W 2 172.17.0.1 && cat /etc/hosts"
        )
        client = minifs(
            "run", "--rm", "--net", "bridge", "--hostname", "client", "busybox", "sh", "-c", script,
            prefix=inside,
        )  # fmt: skip
        assert client.returncode == 0, client.stdout + client.stderr
        assert "eth0" in client.stdout and "inet 172.17.0.3/16" in client.stdout
        assert "default via 172.17.0.1 dev eth0" in client.stdout
        assert client.stdout.count("1 packets received") == 2
        assert "172.17.0.3\tclient" in client.stdout
        # And the "host" side (the test's netns) reaches the server through the bridge.
        ping = in_netns(netns, "busybox", "ping", "-c", "1", "-W", "2", "172.17.0.2")
        assert ping.returncode == 0, ping.stdout + ping.stderr
        veth = server["veth"]
        assert veth in links(netns) and "minifs0" in links(netns)
    finally:
        stopped = minifs("stop", "-t", "0", "server")
    assert stopped.returncode == 0, stopped.stderr
    # Bridge, veths and address leases are gone with the last container.
    assert links(netns) == ["lo"]
    assert not (LEASES_DIR / f"{netns_inode(netns)}-minifs0.json").exists()
    no_containers_left(minifs, state)


def test_taken_address_and_overlapping_subnet_are_125(
    minifs: Run,  # noqa: F811
    state: Path,  # noqa: F811
    netns: str,
) -> None:
    inside = enter(netns)
    start_on_bridge(minifs, netns, "holder", "--ip", "172.17.0.9")
    try:
        taken = minifs(
            "run", "--rm", "--net", "bridge", "--ip", "172.17.0.9", "busybox", "true",
            prefix=inside,
        )  # fmt: skip
        assert taken.returncode == 125
        assert "taken by holder" in taken.stderr
    finally:
        assert minifs("stop", "-t", "0", "holder").returncode == 0
    # A route into the subnet on another interface: minifs must not shadow it.
    for command in (
        ("ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1"),
        ("ip", "addr", "add", "172.17.5.1/24", "dev", "lan0"),
        ("ip", "link", "set", "lan0", "up"),
    ):
        assert in_netns(netns, *command).returncode == 0
    overlap = minifs("run", "--rm", "--net", "bridge", "busybox", "true", prefix=inside)
    assert overlap.returncode == 125
    assert "overlaps the route to 172.17.5.0/24 on lan0" in overlap.stderr
    assert len(overlap.stderr.strip().splitlines()) == 1
    assert links(netns) == ["lan0", "lan1", "lo"]
    no_containers_left(minifs, state)


def nat_table(netns: str) -> str | None:
    """The masquerade rule of minifs0's table in `netns`, or None without the table."""
    listed = in_netns(netns, "nft", "list", "table", "ip", "minifs-minifs0")
    if listed.returncode != 0:
        return None
    return next(line.strip() for line in listed.stdout.splitlines() if "masquerade" in line)


def test_masquerade_is_a_bridge_setting_made_and_removed_with_it(
    minifs: Run,  # noqa: F811
    state: Path,  # noqa: F811
    netns: str,
) -> None:
    """Only the nft table is looked at: no packet is sent anywhere."""
    assert nat_table(netns) is None
    start_on_bridge(minifs, netns, "plain")
    start_on_bridge(minifs, netns, "natted", "--masquerade")
    try:
        rule = nat_table(netns)
        assert rule == 'ip saddr 172.17.0.0/16 oifname != "minifs0" masquerade'
        assert in_netns(netns, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
        # The bridge keeps it while any container is on it, whoever asked.
        assert minifs("stop", "-t", "0", "natted").returncode == 0
        assert nat_table(netns) == rule
    finally:
        stopped = minifs("stop", "-t", "0", "plain")
    assert stopped.returncode == 0, stopped.stderr
    assert nat_table(netns) is None
    assert links(netns) == ["lo"]
    no_containers_left(minifs, state)


def test_killed_foreground_run_is_reclaimed_by_gc(
    minifs: Run,  # noqa: F811
    state: Path,  # noqa: F811
    env: dict[str, str],  # noqa: F811
    netns: str,
) -> None:
    """SIGKILL to `minifs run` itself: its children die with it, and the
    cgroup, clone, record, lease, bridge and nft table it held go at the
    next `minifs gc`."""
    proc = subprocess.Popen(
        [*enter(netns), MINIFS, "run", "--rm", "--net", "bridge",
         "--masquerade", "--memory", "64M", "--name", "doomed",
         "busybox", "sh", "-c", "echo ready; exec sleep 60"],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        data = inspect(minifs, "doomed")
        assert data["monitor_pid"] == proc.pid  # nsenter execs minifs
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
    deadline = time.monotonic() + 10
    while alive(data["pid"], data["pid_start"]):
        assert time.monotonic() < deadline, "PID 1 outlived minifs run"
        time.sleep(0.02)
    assert all(Path(p).exists() for p in data["cgroup"]["paths"].values())
    assert "minifs0" in links(netns) and nat_table(netns) is not None
    gc = minifs("gc", prefix=enter(netns))
    assert gc.returncode == 0, gc.stderr
    assert not any(Path(p).exists() for p in data["cgroup"]["paths"].values())
    assert links(netns) == ["lo"] and nat_table(netns) is None
    assert not (LEASES_DIR / f"{netns_inode(netns)}-minifs0.json").exists()
    no_containers_left(minifs, state)
