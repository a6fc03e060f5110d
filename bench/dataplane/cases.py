"""The cases: each builder returns the pair of ends qperf runs between; :data:`SPECS` names
them for the report, in report order."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

from bench.dataplane.parts import PARTS, Ends, Part
from bench.dataplane.places import Iface, Pair, Place, add_veth, container_ifaces
from bench.dataplane.testbed import VXLAN_POOL, Testbed, host_place
from calicnm.profiles import FORWARD
from lab.netns import Netns

__all__ = ["SPECS", "Spec"]

VETH_NET = "10.201.0"
HANDBUILT_NET = "10.202.0"
BRIDGE_SUBNET = "10.203.0.0/24"
OVERLAY_NET = "10.204.0"
MACVLAN_NET = "10.205.0"
CALICNM_GATEWAY = "169.254.1.1"

OVERLAY_VNI = "4242"
OVERLAY_PORT = "8472"
"""flannel's VXLAN port; calicnm's own VXLAN device uses 4789, so the two never meet."""
OVERLAY_MTU = "1450"


def build_loopback(bed: Testbed) -> Pair:
    """Client and server in one namespace on 127.0.0.1: TCP with no device in the way."""
    ns = Place.of(bed.netns())
    return Pair(ns, ns, "127.0.0.1", (Iface("loopback", ns, "lo"),))


def build_veth(bed: Testbed) -> Pair:
    """Two namespaces joined by one veth pair, on one /24: the cheapest hop between two."""
    a, b = bed.netns(), bed.netns()
    pa, pb = Place.of(a), Place.of(b)
    add_veth(pa, "eth0", b)
    for place, i in ((pa, 1), (pb, 2)):
        place.sh(
            ["ip", "addr", "add", f"{VETH_NET}.{i}/24", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
        )
    return Pair(pa, pb, f"{VETH_NET}.2", (Iface("client eth0", pa, "eth0"),))


def build_host_to_host(bed: Testbed) -> Pair:
    """Host A to host B on their underlay addresses: veth, fabric bridge, veth."""
    a, b = bed.hosts()
    fabric = bed.cluster.fabric
    fab = Place.of(fabric.netns, "fabric")
    port = next(att.fabric_ifname for att in fabric.attachments if att.host is a.netns)
    ifaces = (
        Iface("underlay eth0", host_place(a), "eth0"),
        Iface("fabric bridge", fab, "br0"),
        Iface("fabric port of host A", fab, port),
    )
    return Pair(host_place(a), host_place(b), b.address, ifaces)


def handbuilt_ends(bed: Testbed) -> Ends:
    """calicnm's same-host path by hand, without iptables: per container a veth into a
    "host" namespace that routes (/32 scope link routes, proxy ARP on its side); inside, a
    /32 address, a connected route to 169.254.1.1 and the default route via it.  No
    traffic ever leaves through the uplink: both ends are local /32 routes."""
    host = Place.of(bed.netns(), "hand-built host")
    # Proxy ARP answers for 169.254.1.1 only if the host routes it out of another
    # interface: a real host's default route does that; here an "uplink" veth into an
    # empty namespace does (this kernel has no dummy device).
    add_veth(host, "uplink", bed.netns())
    host.sh(
        ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
        ["ip", "link", "set", "uplink", "up"],
        ["ip", "route", "add", "default", "dev", "uplink"],
    )
    ends: list[Place] = []
    for i in (1, 2):
        ns = bed.netns()
        ip, side = f"{HANDBUILT_NET}.{i}", f"cali{i}"
        add_veth(host, side, ns)
        host.sh(
            ["sysctl", "-q", "-w", f"net.ipv4.conf.{side}.proxy_arp=1"],
            ["sysctl", "-q", "-w", f"net.ipv4.neigh.{side}.proxy_delay=0"],
            ["ip", "link", "set", side, "up"],
            ["ip", "route", "add", f"{ip}/32", "dev", side, "scope", "link"],
        )
        inner = Place.of(ns)
        inner.sh(
            ["ip", "addr", "add", f"{ip}/32", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "route", "add", CALICNM_GATEWAY, "dev", "eth0", "scope", "link"],
            ["ip", "route", "add", "default", "via", CALICNM_GATEWAY, "dev", "eth0"],
        )
        ends.append(inner)
    return Ends(host, ends[0], ends[1])


def handbuilt_pair(ends: Ends) -> Pair:
    ifaces = (Iface("client eth0", ends.client, "eth0"), Iface("host side", ends.host, "cali1"))
    return Pair(ends.client, ends.server, f"{HANDBUILT_NET}.2", ifaces)


def build_handbuilt(bed: Testbed) -> Pair:
    return handbuilt_pair(handbuilt_ends(bed))


def part_builder(part: Part) -> Callable[[Testbed], Pair]:
    """The hand-built path with ``part`` added."""

    def build(bed: Testbed) -> Pair:
        ends = handbuilt_ends(bed)
        part.apply(ends)
        return handbuilt_pair(ends)

    return build


def same_host_builder(prefix: str, iptables_alone: bool = False) -> Callable[[Testbed], Pair]:
    """Two containers (``prefix``1 and 2) on a calicnm network in the default pool, on
    host A's dockerd (the fast path on), or host C's (``iptables_alone``)."""

    def build(bed: Testbed) -> Pair:
        a = bed.iptables_host() if iptables_alone else bed.hosts()[0]
        bed.calicnm_network(a, "bench")
        client, _ = bed.container(a, f"{prefix}1", "bench")
        server, address = bed.container(a, f"{prefix}2", "bench")
        return Pair(client, server, address, tuple(container_ifaces(client, host_place(a))))

    return build


@contextlib.contextmanager
def policy_off(bed: Testbed) -> Iterator[None]:
    """While measuring: host C's node paused (SIGSTOP, so its agent cannot put anything
    back) and calicnm's FORWARD jumps replaced by plain accepts for cali interfaces.
    Connection tracking stays on, as dockerd's nat table keeps it on any Docker host.
    Afterwards the jumps go back to the top and the node resumes; its agent checks its
    jumps twice a second and repairs anything else."""
    a = bed.iptables_host()
    host = host_place(a)
    jumps = [("FORWARD", FORWARD), ("DOCKER-USER", FORWARD)]
    a.send_node_signal(signal.SIGSTOP)
    try:
        for parent, chain in jumps:
            host.run(["iptables", "-D", parent, "-j", chain], check=False)
        for flag in ("-o", "-i"):
            host.run(["iptables", "-I", "FORWARD", "1", flag, "cali+", "-j", "ACCEPT"])
        yield
    finally:
        for flag in ("-o", "-i"):
            host.run(["iptables", "-D", "FORWARD", flag, "cali+", "-j", "ACCEPT"], check=False)
        for parent, chain in jumps:
            host.run(["iptables", "-I", parent, "1", "-j", chain], check=False)
        a.send_node_signal(signal.SIGCONT)


def build_calicnm_routed(bed: Testbed) -> Pair:
    """A container on host A to one on host B, default pool: BGP-learnt block routes."""
    a, b = bed.hosts()
    for host in (a, b):
        bed.calicnm_network(host, "bench")
    client, _ = bed.container(a, "routed1", "bench")
    server, address = bed.container(b, "routed2", "bench")
    ifaces = [*container_ifaces(client, host_place(a)), Iface("underlay", host_place(a), "eth0")]
    return Pair(client, server, address, tuple(ifaces))


def build_calicnm_vxlan(bed: Testbed) -> Pair:
    """As routed, but in a ``--vxlan`` pool: calicnm's VXLAN device between the hosts."""
    a, b = bed.hosts()
    bed.vxlan_pool()
    for host in (a, b):
        bed.calicnm_network(host, "benchvx", "--subnet", VXLAN_POOL)
    client, _ = bed.container(a, "vxlan1", "benchvx")
    server, address = bed.container(b, "vxlan2", "benchvx")
    ifaces = [
        *container_ifaces(client, host_place(a)),
        Iface("VXLAN device", host_place(a), "vxlan.calicnm"),
        Iface("underlay", host_place(a), "eth0"),
    ]
    return Pair(client, server, address, tuple(ifaces))


def build_docker_bridge(bed: Testbed) -> Pair:
    """Two containers on a user-defined Docker bridge network on host A."""
    a, _ = bed.hosts()
    net_id = a.docker("network", "create", "-d", "bridge", "--subnet", BRIDGE_SUBNET, "br0x")
    client, _ = bed.container(a, "bridge1", "br0x")
    server, address = bed.container(a, "bridge2", "br0x")
    ifaces = [
        *container_ifaces(client, host_place(a)),
        Iface("Docker bridge", host_place(a), f"br-{net_id[:12]}"),
    ]
    return Pair(client, server, address, tuple(ifaces))


def add_overlay_end(host: Place, local: str, remote: str, ns: Netns, cidr: str) -> None:
    """One host's half of a Docker-overlay/flannel-style L2 overlay: a Linux bridge, a
    VXLAN device on it (learning off, a static all-zeros fdb entry sending everything
    unknown to ``remote``), and a "container" namespace with a veth on the bridge."""
    vxlan = ["type", "vxlan", "id", OVERLAY_VNI, "dstport", OVERLAY_PORT, "nolearning"]
    host.sh(
        ["ip", "link", "add", "bovbr", "type", "bridge"],
        ["ip", "link", "set", "bovbr", "up"],
        ["ip", "link", "add", "bovvx", *vxlan, "local", local, "dev", "eth0"],
        ["ip", "link", "set", "bovvx", "master", "bovbr", "up"],
        ["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "bovvx", "dst", remote],
        # Docker does the same for its bridges: frames between ports of this bridge are
        # accepted even when the host's FORWARD policy (set by dockerd) is DROP.
        ["iptables", "-I", "FORWARD", "-i", "bovbr", "-o", "bovbr", "-j", "ACCEPT"],
    )
    add_veth(host, "bovh", ns, mtu=OVERLAY_MTU)
    host.run(["ip", "link", "set", "bovh", "master", "bovbr", "up"])
    Place.of(ns).sh(["ip", "addr", "add", cidr, "dev", "eth0"], ["ip", "link", "set", "eth0", "up"])


def build_overlay(bed: Testbed) -> Pair:
    """A VXLAN overlay between hosts A and B, both "containers" in one L2 subnet."""
    a, b = bed.hosts()
    ends: list[Place] = []
    for i, (host, peer) in enumerate(((a, b), (b, a)), start=1):
        ns = bed.netns()
        add_overlay_end(host_place(host), host.address, peer.address, ns, f"{OVERLAY_NET}.{i}/24")
        ends.append(Place.of(ns))
    ifaces = (
        Iface("client eth0", ends[0], "eth0"),
        Iface("overlay bridge", host_place(a), "bovbr"),
        Iface("overlay VXLAN device", host_place(a), "bovvx"),
        Iface("underlay", host_place(a), "eth0"),
    )
    return Pair(ends[0], ends[1], f"{OVERLAY_NET}.2", ifaces)


def build_macvlan(bed: Testbed) -> Pair:
    """Two namespaces with macvlan children (bridge mode) of host A's underlay eth0: they
    talk through the macvlan driver's internal switch, never leaving host A."""
    a, _ = bed.hosts()
    host = host_place(a)
    ends: list[Place] = []
    for i in (1, 2):
        ns = bed.netns()
        child = f"bmv{i}"
        host.sh(
            ["ip", "link", "add", child, "link", "eth0", "type", "macvlan", "mode", "bridge"],
            ["ip", "link", "set", child, "netns", ns.name],
        )
        inner = Place.of(ns)
        inner.sh(
            ["ip", "link", "set", child, "name", "eth0"],
            ["ip", "addr", "add", f"{MACVLAN_NET}.{i}/24", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
        )
        ends.append(inner)
    ifaces = (Iface("client eth0 (macvlan)", ends[0], "eth0"), Iface("parent", host, "eth0"))
    return Pair(ends[0], ends[1], f"{MACVLAN_NET}.2", ifaces)


@dataclass(frozen=True)
class Spec:
    """A case as the report names it, and how to build it."""

    key: str
    title: str
    group: str
    """baseline, calicnm or peer."""
    path: str
    """What the packets cross, for the report."""
    build: Callable[[Testbed], Pair]
    around: Callable[[Testbed], AbstractContextManager[None]] | None = None
    """What to hold while the case is measured (and only then), e.g. policy switched off."""
    sweep: bool = True
    """Whether the case gets a message-size sweep (the breakdown's parts do not)."""


SPECS: tuple[Spec, ...] = (
    Spec("loopback", "loopback", "baseline", "one namespace, 127.0.0.1", build_loopback),
    Spec("veth", "bare veth pair", "baseline", "ns - veth - ns", build_veth),
    Spec(
        "host",
        "host to host",
        "baseline",
        "host A eth0 - veth - fabric bridge - veth - host B eth0 (the ratio baseline)",
        build_host_to_host,
    ),
    Spec(
        "handbuilt",
        "hand-built calicnm path",
        "baseline",
        "ns - veth - routing host ns (/32 routes, proxy ARP, no iptables) - veth - ns",
        build_handbuilt,
    ),
    *(
        Spec(
            f"part-{part.key}",
            f"hand-built {part.title}",
            "breakdown",
            part.what,
            part_builder(part),
            sweep=False,
        )
        for part in PARTS
    ),
    Spec(
        "calicnm-same",
        "calicnm, same host",
        "calicnm",
        "container - veth - host A's tc fast path (open pair) - veth - container",
        same_host_builder("same"),
    ),
    Spec(
        "calicnm-same-iptables",
        "calicnm, same host, iptables alone",
        "calicnm",
        "as calicnm, same host, on a node with CALICNM_DATAPATH=iptables (no fast path)",
        same_host_builder("ipt", iptables_alone=True),
    ),
    Spec(
        "calicnm-same-nopolicy",
        "calicnm, same host, iptables alone, policy off",
        "calicnm",
        "as iptables alone, with calicnm's chains unhooked while measuring",
        same_host_builder("off", iptables_alone=True),
        around=policy_off,
    ),
    Spec(
        "calicnm-routed",
        "calicnm, across hosts, routed",
        "calicnm",
        "container - veth - host A routing - underlay - host B routing - veth - container",
        build_calicnm_routed,
    ),
    Spec(
        "calicnm-vxlan",
        "calicnm, across hosts, VXLAN",
        "calicnm",
        "as routed, encapsulated by vxlan.calicnm on each host",
        build_calicnm_vxlan,
    ),
    Spec(
        "docker-bridge",
        "Docker bridge",
        "peer",
        "container - veth - Linux bridge (Docker's iptables) - veth - container, one host",
        build_docker_bridge,
    ),
    Spec(
        "overlay",
        "VXLAN overlay (Docker overlay / flannel style)",
        "peer",
        "ns - veth - bridge - VXLAN - underlay - VXLAN - bridge - veth - ns, one L2 subnet",
        build_overlay,
    ),
    Spec(
        "macvlan",
        "macvlan (bridge mode)",
        "peer",
        "ns - macvlan - macvlan - ns, children of one host's eth0",
        build_macvlan,
    ),
)
