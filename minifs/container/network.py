"""`--net bridge`: the seed's veth pair, on a bridge so containers reach each other.

The seed links one container to the host with `ip link add h$PID type veth
peer name c$PID`, moves `c$PID` into the container's netns, names it eth0 and
gives it 172.17.0.2/16 beside the host's 172.17.0.1/16. With several
containers the host end goes on a bridge that holds the gateway address
instead, as docker0 does. Everything is done over netlink (pyroute2), never by
parsing `ip`.

Addresses are leased from a small JSON file kept per network namespace and
bridge under /run/minifs/net (a bridge and its addresses belong to a netns, not
to a state dir), under one flock, so two containers never get one address and
the last container to leave removes the bridge.

Containers reach each other and the gateway. Outbound traffic beyond that needs
`--masquerade`, a setting of the bridge as docker's ip-masq is: one nftables
table `ip minifs-<bridge>` whose postrouting chain masquerades the subnet's
packets leaving through any other interface, and IPv4 forwarding switched on in
that network namespace (left on afterwards, as docker leaves it). The table is
made when a container first asks for it and removed with the bridge.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from minifs.container import ContainerError
from minifs.resources import run

BRIDGE_ENV = "MINIFS_BRIDGE"
SUBNET_ENV = "MINIFS_SUBNET"
DEFAULT_BRIDGE = "minifs0"
DEFAULT_SUBNET = "172.17.0.0/16"
"""The seed's network: gateway 172.17.0.1, first container 172.17.0.2."""
LEASES_DIR = Path("/run/minifs/net")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
BRIDGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
"""An interface name that is also a valid part of an nftables table name."""


class Settings(NamedTuple):
    bridge: str
    subnet: ipaddress.IPv4Network

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return next(self.subnet.hosts())

    @classmethod
    def from_env(cls) -> Settings:
        bridge = os.environ.get(BRIDGE_ENV) or DEFAULT_BRIDGE
        text = os.environ.get(SUBNET_ENV) or DEFAULT_SUBNET
        if not BRIDGE_RE.fullmatch(bridge):
            raise ContainerError(
                f"{BRIDGE_ENV}={bridge} is not a valid bridge name; use up to 15 letters, "
                "digits and _.-"
            )
        try:
            subnet = ipaddress.IPv4Network(text)
        except ValueError:
            raise ContainerError(f"{SUBNET_ENV}={text} is not an IPv4 network") from None
        if subnet.prefixlen > 30:
            raise ContainerError(f"{SUBNET_ENV}={text} is too small; give a /30 or larger")
        return cls(bridge, subnet)


def load() -> str:
    """Import pyroute2 (a few hundred ms) once, before the fork, so PID 1
    inherits it instead of importing it again on the critical path."""
    import pyroute2

    return f"import pyroute2 {pyroute2.__version__}"


def veth_names(container_id: str) -> tuple[str, str]:
    """(host end, container end before it is renamed eth0); 15 characters at most."""
    return f"mfs{container_id[:10]}", f"mfc{container_id[:10]}"


def netns_key() -> str:
    """Which network namespace this is: the inode of /proc/self/ns/net."""
    return str(os.stat("/proc/self/ns/net").st_ino)


@contextlib.contextmanager
def _leases(bridge: str, netns: str) -> Iterator[dict[str, Any]]:
    """The lease table of one bridge in one netns, under one lock for all of
    them (a lock file that is never removed, so no waiter ever holds a stale
    one); the table is saved on the way out, or removed when it is empty."""
    LEASES_DIR.mkdir(parents=True, exist_ok=True)
    path = LEASES_DIR / f"{netns}-{bridge}.json"
    fd = os.open(LEASES_DIR / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            table = json.loads(path.read_text())
        except FileNotFoundError:
            table = {"leases": {}}
        yield table
        if table["leases"]:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(table, indent=1))
            os.replace(tmp, path)
        else:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _prune(table: dict[str, Any]) -> None:
    """Drop leases whose container record is gone (removed after a crash)."""
    for ip, lease in list(table["leases"].items()):
        if not (Path(lease["root"]) / "containers" / lease["container"]).exists():
            del table["leases"][ip]


def _pick(table: dict[str, Any], settings: Settings, wanted: str | None) -> str:
    taken = set(table["leases"]) | {str(settings.gateway)}
    if wanted is not None:
        address = ipaddress.IPv4Address(wanted)
        if address not in settings.subnet or address in (
            settings.subnet.network_address,
            settings.subnet.broadcast_address,
        ):
            raise ContainerError(f"--ip {wanted} is not a host address in {settings.subnet}")
        if wanted in taken:
            owner = table["leases"].get(wanted, {}).get("name", "the gateway")
            raise ContainerError(f"--ip {wanted} is taken by {owner}; pick another address")
        return wanted
    for host in settings.subnet.hosts():
        if str(host) not in taken:
            return str(host)
    raise ContainerError(f"no free address left in {settings.subnet}; stop a container")


def _check_overlap(ipr: Any, settings: Settings, bridge_index: int | None) -> None:
    """Refuse a subnet that another interface already routes (docker0, a LAN)."""
    for route in ipr.get_routes(family=2, table=254):
        dst_len = route.get("dst_len")
        if not dst_len or route.get("oif") == bridge_index:
            continue
        network = ipaddress.IPv4Network(f"{route.get('dst')}/{dst_len}", strict=False)
        if network.overlaps(settings.subnet):
            links = ipr.link("get", index=route.get("oif")) if route.get("oif") else []
            dev = links[0].get("ifname") if links else "?"
            raise ContainerError(
                f"subnet {settings.subnet} overlaps the route to {network} on {dev}; "
                f"set {SUBNET_ENV} to a free range"
            )


def _ensure_bridge(ipr: Any, settings: Settings) -> tuple[int, bool]:
    """The bridge's index, and whether it was made just now."""
    found = ipr.link_lookup(ifname=settings.bridge)
    _check_overlap(ipr, settings, found[0] if found else None)
    if found:
        index = found[0]
        have = {a.get("address") for a in ipr.get_addr(family=2, index=index)}
        if str(settings.gateway) not in have:
            raise ContainerError(
                f"bridge {settings.bridge} exists without gateway {settings.gateway}; "
                f"set {BRIDGE_ENV} to another name or {SUBNET_ENV} to its network"
            )
        return index, False
    ipr.link("add", ifname=settings.bridge, kind="bridge")
    index = ipr.link_lookup(ifname=settings.bridge)[0]
    try:
        gateway, prefix = str(settings.gateway), settings.subnet.prefixlen
        ipr.addr("add", index=index, address=gateway, prefixlen=prefix)
        ipr.link("set", index=index, state="up")
    except BaseException:
        ipr.link("del", index=index)
        raise
    return index, True


def _nat_table(bridge: str) -> str:
    return f"minifs-{bridge}"


def _masquerade(settings: Settings) -> str:
    """Forward IPv4 and masquerade the subnet's outbound packets; replaces the
    table in one nft transaction, so it is safe to repeat. Returns the commands."""
    if IP_FORWARD.read_text().strip() != "1":
        IP_FORWARD.write_text("1\n")
    table = _nat_table(settings.bridge)
    script = (
        f"add table ip {table}; delete table ip {table}; add table ip {table}; "
        f"add chain ip {table} postrouting "
        "{ type nat hook postrouting priority srcnat; policy accept; }; "
        f"add rule ip {table} postrouting ip saddr {settings.subnet} "
        f'oifname != "{settings.bridge}" masquerade'
    )
    run(["nft", script], f"nft masquerade for {settings.bridge}")
    return f"sysctl net.ipv4.ip_forward=1; nft '{script}'"


def _drop_masquerade(bridge: str) -> None:
    table = _nat_table(bridge)
    run(["nft", f"add table ip {table}; delete table ip {table}"], f"nft remove {table}")


class Lease(NamedTuple):
    bridge: str
    netns: str
    ip: str
    prefix: int
    gateway: str
    veth: str
    peer: str
    masquerade: str = ""
    """What was done to masquerade, for --trace; empty when nothing was."""


def attach(
    root: str, container_id: str, name: str, pid: int, wanted: str | None, masquerade: bool
) -> Lease:
    """Host side: lease an address, make sure the bridge is up (masquerading
    if asked), and plug a veth pair into it whose other end is moved into the
    netns of `pid`."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    settings = Settings.from_env()
    veth, peer = veth_names(container_id)
    nat = ""
    with _leases(settings.bridge, netns_key()) as table, IPRoute() as ipr:
        _prune(table)
        ip = _pick(table, settings, wanted)
        created = False
        try:
            bridge, created = _ensure_bridge(ipr, settings)
            if masquerade:
                nat = _masquerade(settings)
                table["masquerade"] = True
            table["leases"][ip] = {"container": container_id, "name": name, "root": root}
            ipr.link("add", ifname=veth, kind="veth", peer={"ifname": peer, "net_ns_pid": pid})
            index = ipr.link_lookup(ifname=veth)[0]
            ipr.link("set", index=index, master=bridge, state="up")
        except BaseException as exc:
            table["leases"].pop(ip, None)
            _drop_link(ipr, veth)
            if created:
                _drop_link(ipr, settings.bridge)
                if table.pop("masquerade", False):
                    _drop_masquerade(settings.bridge)
            if isinstance(exc, NetlinkError):
                raise ContainerError(
                    f"cannot plug {veth} into bridge {settings.bridge}: {exc.args[-1]}"
                ) from None
            raise
    return Lease(
        settings.bridge,
        netns_key(),
        ip,
        settings.subnet.prefixlen,
        str(settings.gateway),
        veth,
        peer,
        nat,
    )


def configure_inside(lease: Lease) -> None:
    """Container side, run inside its netns: the seed's `ip link set dev lo up;
    ip link set c$PID name eth0 up; ip addr add ...; ip route add default via ...`."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        index = ipr.link_lookup(ifname=lease.peer)[0]
        ipr.link("set", index=index, ifname="eth0")
        ipr.addr("add", index=index, address=lease.ip, prefixlen=lease.prefix)
        ipr.link("set", index=index, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=lease.gateway)


def _drop_link(ipr: Any, name: str) -> None:
    """Delete a link if it is there. A veth also goes when the kernel tears
    down the container's netns, which it does asynchronously: the link can
    vanish between the lookup and the delete."""
    from pyroute2.netlink.exceptions import NetlinkError

    found = ipr.link_lookup(ifname=name)
    if found:
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise


def detach(container_id: str, bridge: str, netns: str) -> None:
    """Give the address back, remove the host end if the netns did not take it
    along, and the bridge (with its masquerade table) with the last lease. Safe
    to repeat, and a no-op for a container that never got its lease (it failed
    before, or `attach` undid its own work). Links and tables are only touched
    from the netns they were made in; from elsewhere (a crashed container
    reclaimed later) only the lease goes."""
    veth, _ = veth_names(container_id)
    with _leases(bridge, netns) as table:
        mine = [ip for ip, lease in table["leases"].items() if lease["container"] == container_id]
        if not mine:
            return
        for ip in mine:
            del table["leases"][ip]
        if netns == netns_key():
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                _drop_link(ipr, veth)
                if not table["leases"]:
                    _drop_link(ipr, bridge)
                    if table.pop("masquerade", False):
                        _drop_masquerade(bridge)
