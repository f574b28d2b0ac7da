"""`--net bridge`: the seed's veth pair on a bridge, tested without a packet
leaving the machine: the whole run, "host" side included, happens inside a
network namespace the test makes (`ip netns add`) and deletes afterwards.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from minifs.container.network import LEASES_DIR
from tests import leaks
from tests.test_run import Run, env, inspect, minifs, no_containers_left, state  # noqa: F401


@pytest.fixture
def netns(scope: Path) -> Iterator[str]:
    name = leaks.netns_prefix(scope) + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


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
    inside = ("ip", "netns", "exec", netns)
    started = minifs(
        "run", "-d", "--rm", "--net", "bridge", "--name", "server", "busybox", "sleep", "60",
        prefix=inside,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
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
    inside = ("ip", "netns", "exec", netns)
    started = minifs(
        "run", "-d", "--rm", "--net", "bridge", "--ip", "172.17.0.9", "--name", "holder",
        "busybox", "sleep", "60", prefix=inside,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
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
