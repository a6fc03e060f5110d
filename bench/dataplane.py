#!/usr/bin/env python3
"""Data-plane benchmark: qperf TCP bandwidth and latency of container networks.

Reruns the article's qperf comparison of container networks on this machine.  Everything
measured is built here and torn down at the end (even on failure): emulated hosts are
network namespaces on a fabric bridge (``tests/cluster.py``), each with the real calicnm
node and its own dockerd where a case involves them.  Traffic only flows between these
namespaces and containers.

Cases (one qperf server per case, the client in the other end's namespace):

- baselines: loopback, a bare veth pair, host to host over the emulated underlay;
- a hand-built copy of calicnm's same-host path (routing, proxy ARP, no iptables);
- calicnm: same host, across hosts routed (BGP), across hosts encapsulated (VXLAN pool);
- peers: Docker's bridge network, a VXLAN overlay built like Docker overlay/flannel, macvlan.

Measurements: ``qperf tcp_bw tcp_lat`` at 64 KiB messages, several repetitions taken
round-robin over the cases (so slow drift of the machine spreads over all cases instead of
biasing one), reported as median [min-max] and as a ratio to host-to-host from the same
run; then one message-size sweep (1 B .. 64 KiB, doubling) per case for the charts.
qperf's ``tcp_lat`` is one-way latency (half the round trip).  By default qperf's client
and server are pinned to one CPU (``--pin``): on a VM a wake-up across CPUs costs tens of
microseconds, far more than the differences between the paths; the report records it.

Usage (root): .venv/bin/python bench/dataplane.py [--quick] [--out DIR] [--reps N]
Writes DIR/dataplane.md, dataplane.json, bandwidth.png and latency.png (charts need the
``bench`` extra: ``pip install -e '.[bench]'``).  Exit status 1 means some case produced
no numbers (its error is in the report); a figure never fails the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import report  # noqa: E402
from tests.cluster import CalicnmHost, Cluster, fabric_etcd  # noqa: E402
from tests.harness import DEFAULT_IMAGE, Netns, Process  # noqa: E402

# --------------------------------------------------------------------------------------------
# constants

QPERF_PORT = 19765
"""qperf's control port (its default); one server per namespace, so no clashes."""
FIXED_SIZE = "64K"
FIXED_BYTES = 64 * 1024
READY_TIMEOUT = 90.0
"""Bound on waiting for a path to carry qperf's handshake (BGP convergence included)."""

VETH_NET = "10.201.0"
HANDBUILT_NET = "10.202.0"
BRIDGE_SUBNET = "10.203.0.0/24"
OVERLAY_NET = "10.204.0"
MACVLAN_NET = "10.205.0"
VXLAN_POOL = "172.30.0.0/16"
"""calicnm's encapsulated pool, as in tests/e2e/test_multi_host.py."""
CALICNM_GATEWAY = "169.254.1.1"

OVERLAY_VNI = "4242"
OVERLAY_PORT = "8472"
"""flannel's VXLAN port; calicnm's own VXLAN device uses 4789, so the two never meet."""
OVERLAY_MTU = "1450"

OFFLOADS = {
    "tx-checksumming": "tx-csum",
    "rx-checksumming": "rx-csum",
    "tcp-segmentation-offload": "TSO",
    "generic-segmentation-offload": "GSO",
    "generic-receive-offload": "GRO",
}
"""ethtool -k features shown in the report (all of them are kept in the JSON)."""
SYSCTLS = ("net.ipv4.tcp_congestion_control", "net.bridge.bridge-nf-call-iptables")

MICRO_S = "\u00b5s"
_started = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr, stamped with the time since start."""
    print(f"[{time.monotonic() - _started:6.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class Settings:
    """How long and how often each case is measured."""

    reps: int
    fixed_seconds: int
    """qperf -t at 64 KiB (qperf only takes whole seconds)."""
    sweep_seconds: int
    sweep_factor: int
    """Message sizes of the sweep: 1, factor, factor**2, ... up to 64 KiB."""
    quick: bool
    pin: str = "same"
    """CPU placement of qperf's ends: same (both on the last CPU), split or off."""

    @property
    def server_prefix(self) -> list[str]:
        """``taskset`` prefix for the qperf server: the last CPU (empty when not pinned)."""
        return [] if self.pin == "off" else ["taskset", "-c", str(max(_cpus()))]

    @property
    def client_prefix(self) -> list[str]:
        """``taskset`` prefix for the qperf client: the server's CPU, or the first if split."""
        if self.pin == "off":
            return []
        return ["taskset", "-c", str(min(_cpus()) if self.pin == "split" else max(_cpus()))]

    @property
    def sweep_sizes(self) -> list[int]:
        sizes, size = [], 1
        while size <= FIXED_BYTES:
            sizes.append(size)
            size *= self.sweep_factor
        return sizes

    @property
    def sweep_spec(self) -> str:
        return f"msg_size:1:{FIXED_SIZE}:*{self.sweep_factor}"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            base = cls(reps=1, fixed_seconds=1, sweep_seconds=1, sweep_factor=256, quick=True)
        else:
            base = cls(reps=3, fixed_seconds=2, sweep_seconds=1, sweep_factor=2, quick=False)
        reps = args.reps if args.reps is not None else base.reps
        return cls(
            reps, base.fixed_seconds, base.sweep_seconds, base.sweep_factor, base.quick, args.pin
        )


def _cpus() -> set[int]:
    """The CPUs this process may run on."""
    return os.sched_getaffinity(0)


# --------------------------------------------------------------------------------------------
# where commands run


@dataclass(frozen=True)
class Place:
    """A network namespace; commands run in it through ``nsenter`` (mounts stay the host's,
    so the host's qperf, ip and ethtool binaries are used everywhere, containers included)."""

    label: str
    enter: tuple[str, ...]

    @classmethod
    def of(cls, netns: Netns, label: str | None = None) -> Place:
        return cls(label or netns.name, ("nsenter", f"--net={netns.path}", "--"))

    @classmethod
    def of_pid(cls, pid: str, label: str) -> Place:
        return cls(label, ("nsenter", "-t", pid, "-n", "--"))

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return [*self.enter, *cmd]

    def run(
        self, cmd: Sequence[str], timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` here; raises ``RuntimeError`` with its stderr if ``check`` and it fails."""
        proc = subprocess.run(
            self.argv(cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} in {self.label} exited {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-500:]}"
            )
        return proc

    def sh(self, *cmds: Sequence[str]) -> None:
        """Run each command in turn, stopping at the first failure."""
        for cmd in cmds:
            self.run(cmd)


@dataclass(frozen=True)
class Iface:
    """An interface on a measured path, whose MTU and offloads the report records."""

    role: str
    place: Place
    name: str


@dataclass(frozen=True)
class Pair:
    """The two ends of a case: qperf's client, its server and the address it listens on."""

    client: Place
    server: Place
    address: str
    ifaces: tuple[Iface, ...]


# --------------------------------------------------------------------------------------------
# the lab: namespaces, the cluster, containers


class BenchHost(CalicnmHost):
    """A calicnm host whose node runs with the product's defaults.

    The e2e tests run the node with DEBUG logs and a 3 s full resync so that they finish
    fast; in a benchmark that is CPU noise a real node (INFO, 30 s) does not make.
    """

    def env(self) -> dict[str, str]:
        env = super().env()
        env.pop("CALICNM_RESYNC_INTERVAL", None)
        env["CALICNM_LOG_LEVEL"] = "INFO"
        return env


class BenchCluster(Cluster):
    """A :class:`Cluster` (fabric, fabric etcd, n hosts) made of :class:`BenchHost` s."""

    def start(self) -> BenchCluster:
        self.fabric.create()
        self.etcd = fabric_etcd(self.fabric, self.workdir)
        for i in range(self.n):
            att = self.fabric.add_host()
            host = BenchHost(
                att.host,
                att.address,
                self.workdir / f"host{i + 1}",
                f"host{i + 1}",
                etcd_endpoints=self.etcd_url,
            )
            self.hosts.append(host)
            host.start()
        return self


class Lab:
    """What the cases are built from.  Everything is registered on ``stack``, which tears
    it down in reverse order: qperf servers, then namespaces, then the cluster."""

    def __init__(self, stack: contextlib.ExitStack, workdir: Path) -> None:
        self.stack = stack
        self.workdir = workdir
        self._cluster: BenchCluster | None = None
        self._cluster_error: Exception | None = None
        self._networks: set[tuple[str, str]] = set()
        self._vxlan_pool = False

    def netns(self) -> Netns:
        """A fresh namespace (lo up), deleted at teardown."""
        return self.stack.enter_context(Netns())

    @property
    def cluster(self) -> BenchCluster:
        """Two emulated calicnm hosts, started on first use (once; a failure is sticky)."""
        if self._cluster_error is not None:
            raise RuntimeError(f"the cluster did not start: {self._cluster_error}")
        if self._cluster is None:
            log("starting a 2-host cluster (fabric, etcd, 2 x calicnm node + dockerd)")
            cluster = BenchCluster(self.workdir / "cluster", 2)
            self.stack.callback(cluster.close)
            try:
                self._cluster = cluster.start()
            except Exception as exc:
                self._cluster_error = exc
                raise
        return self._cluster

    @property
    def has_cluster(self) -> bool:
        """Whether the cluster was started (and so can be asked about)."""
        return self._cluster is not None

    def hosts(self) -> tuple[CalicnmHost, CalicnmHost]:
        a, b = self.cluster.hosts
        return a, b

    def calicnm_network(self, host: CalicnmHost, name: str, *args: str) -> None:
        """A calicnm network ``name`` on ``host`` (created once)."""
        if (host.hostname, name) not in self._networks:
            host.create_network(name, *args)
            self._networks.add((host.hostname, name))

    def vxlan_pool(self) -> None:
        """calicnm's VXLAN pool (added once, through host A's CLI)."""
        if not self._vxlan_pool:
            self.hosts()[0].calicnm("pool", "add", VXLAN_POOL, "--vxlan")
            self._vxlan_pool = True

    def container(self, host: CalicnmHost, name: str, network: str) -> tuple[Place, str]:
        """A sleeping busybox container on ``network``: its namespace and address."""
        host.docker("run", "-d", "--net", network, "--name", name, DEFAULT_IMAGE, "sleep", "86400")
        pid = host.docker("inspect", "-f", "{{.State.Pid}}", name)
        return Place.of_pid(pid, f"{host.hostname}/{name}"), host.ip_of(name, network)

    def serve(self, key: str, server: Place, prefix: Sequence[str] = ()) -> None:
        """A qperf server in ``server`` (run under ``prefix``), stopped at teardown."""
        proc = Process(
            server.argv([*prefix, "qperf", "--listen_port", str(QPERF_PORT)]),
            self.workdir / f"qperf-{key}.log",
            name=f"qperf-server[{key}]",
        )
        self.stack.callback(proc.stop)
        proc.start()


def host_place(host: CalicnmHost) -> Place:
    return Place.of(host.netns, host.hostname)


# --------------------------------------------------------------------------------------------
# plumbing helpers


def add_veth(
    owner: Place, name: str, peer_ns: Netns, peer_name: str = "eth0", mtu: str | None = None
) -> None:
    """A veth pair: ``name`` in ``owner``, ``peer_name`` created directly in ``peer_ns``."""
    cmd = ["ip", "link", "add", name]
    if mtu is not None:
        cmd += ["mtu", mtu]
    cmd += ["type", "veth", "peer", "name", peer_name]
    if mtu is not None:
        cmd += ["mtu", mtu]
    owner.run([*cmd, "netns", peer_ns.name])


def ip_link(place: Place, name: str | None = None) -> list[dict[str, Any]]:
    """``ip -j -d link show [dev name]`` in ``place``, parsed."""
    cmd = ["ip", "-j", "-d", "link", "show", *(["dev", name] if name else [])]
    data: list[dict[str, Any]] = json.loads(place.run(cmd).stdout or "[]")
    return data


def veth_peer_name(inner: Place, outer: Place, name: str = "eth0") -> str:
    """The name, in ``outer``, of the other end of veth ``name`` in ``inner``."""
    index = ip_link(inner, name)[0].get("link_index")
    for link in ip_link(outer):
        if link.get("ifindex") == index:
            return str(link["ifname"])
    raise RuntimeError(f"no peer of {inner.label}:{name} in {outer.label}")


def container_ifaces(client: Place, host: Place) -> list[Iface]:
    """A container's eth0 and its host-side veth end."""
    return [
        Iface("client eth0", client, "eth0"),
        Iface("host side of client veth", host, veth_peer_name(client, host)),
    ]


# --------------------------------------------------------------------------------------------
# the cases: each builder returns the pair of ends qperf runs between


def build_loopback(lab: Lab) -> Pair:
    """Client and server in one namespace on 127.0.0.1: TCP with no device in the way."""
    ns = Place.of(lab.netns())
    return Pair(ns, ns, "127.0.0.1", (Iface("loopback", ns, "lo"),))


def build_veth(lab: Lab) -> Pair:
    """Two namespaces joined by one veth pair, on one /24: the cheapest hop between two."""
    a, b = lab.netns(), lab.netns()
    pa, pb = Place.of(a), Place.of(b)
    add_veth(pa, "eth0", b)
    for place, i in ((pa, 1), (pb, 2)):
        place.sh(
            ["ip", "addr", "add", f"{VETH_NET}.{i}/24", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
        )
    return Pair(pa, pb, f"{VETH_NET}.2", (Iface("client eth0", pa, "eth0"),))


def build_host_to_host(lab: Lab) -> Pair:
    """Host A to host B on their underlay addresses: veth, fabric bridge, veth."""
    a, b = lab.hosts()
    fabric = lab.cluster.fabric
    fab = Place.of(fabric.netns, "fabric")
    port = next(att.fabric_ifname for att in fabric.attachments if att.host is a.netns)
    ifaces = (
        Iface("underlay eth0", host_place(a), "eth0"),
        Iface("fabric bridge", fab, "br0"),
        Iface("fabric port of host A", fab, port),
    )
    return Pair(host_place(a), host_place(b), b.address, ifaces)


def build_handbuilt(lab: Lab) -> Pair:
    """calicnm's same-host path by hand, without iptables: per container a veth into a
    "host" namespace that routes (/32 scope link routes, proxy ARP on its side); inside, a
    /32 address, a connected route to 169.254.1.1 and the default route via it.  No
    traffic ever leaves through the uplink: both ends are local /32 routes."""
    host = Place.of(lab.netns(), "hand-built host")
    # Proxy ARP answers for 169.254.1.1 only if the host routes it out of another
    # interface: a real host's default route does that; here an "uplink" veth into an
    # empty namespace does (this kernel has no dummy device).
    add_veth(host, "uplink", lab.netns())
    host.sh(
        ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
        ["ip", "link", "set", "uplink", "up"],
        ["ip", "route", "add", "default", "dev", "uplink"],
    )
    ends: list[Place] = []
    for i in (1, 2):
        ns = lab.netns()
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
    ifaces = (Iface("client eth0", ends[0], "eth0"), Iface("host side", host, "cali1"))
    return Pair(ends[0], ends[1], f"{HANDBUILT_NET}.2", ifaces)


def build_calicnm_same_host(lab: Lab) -> Pair:
    """Two containers on host A's dockerd, on a calicnm network (default pool)."""
    a, _ = lab.hosts()
    lab.calicnm_network(a, "bench")
    client, _ = lab.container(a, "same1", "bench")
    server, address = lab.container(a, "same2", "bench")
    return Pair(client, server, address, tuple(container_ifaces(client, host_place(a))))


def build_calicnm_routed(lab: Lab) -> Pair:
    """A container on host A to one on host B, default pool: BGP-learnt block routes."""
    a, b = lab.hosts()
    for host in (a, b):
        lab.calicnm_network(host, "bench")
    client, _ = lab.container(a, "routed1", "bench")
    server, address = lab.container(b, "routed2", "bench")
    ifaces = [*container_ifaces(client, host_place(a)), Iface("underlay", host_place(a), "eth0")]
    return Pair(client, server, address, tuple(ifaces))


def build_calicnm_vxlan(lab: Lab) -> Pair:
    """As routed, but in a ``--vxlan`` pool: calicnm's VXLAN device between the hosts."""
    a, b = lab.hosts()
    lab.vxlan_pool()
    for host in (a, b):
        lab.calicnm_network(host, "benchvx", "--subnet", VXLAN_POOL)
    client, _ = lab.container(a, "vxlan1", "benchvx")
    server, address = lab.container(b, "vxlan2", "benchvx")
    ifaces = [
        *container_ifaces(client, host_place(a)),
        Iface("VXLAN device", host_place(a), "vxlan.calicnm"),
        Iface("underlay", host_place(a), "eth0"),
    ]
    return Pair(client, server, address, tuple(ifaces))


def build_docker_bridge(lab: Lab) -> Pair:
    """Two containers on a user-defined Docker bridge network on host A."""
    a, _ = lab.hosts()
    net_id = a.docker("network", "create", "-d", "bridge", "--subnet", BRIDGE_SUBNET, "br0x")
    client, _ = lab.container(a, "bridge1", "br0x")
    server, address = lab.container(a, "bridge2", "br0x")
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


def build_overlay(lab: Lab) -> Pair:
    """A VXLAN overlay between hosts A and B, both "containers" in one L2 subnet."""
    a, b = lab.hosts()
    ends: list[Place] = []
    for i, (host, peer) in enumerate(((a, b), (b, a)), start=1):
        ns = lab.netns()
        add_overlay_end(host_place(host), host.address, peer.address, ns, f"{OVERLAY_NET}.{i}/24")
        ends.append(Place.of(ns))
    ifaces = (
        Iface("client eth0", ends[0], "eth0"),
        Iface("overlay bridge", host_place(a), "bovbr"),
        Iface("overlay VXLAN device", host_place(a), "bovvx"),
        Iface("underlay", host_place(a), "eth0"),
    )
    return Pair(ends[0], ends[1], f"{OVERLAY_NET}.2", ifaces)


def build_macvlan(lab: Lab) -> Pair:
    """Two namespaces with macvlan children (bridge mode) of host A's underlay eth0: they
    talk through the macvlan driver's internal switch, never leaving host A."""
    a, _ = lab.hosts()
    host = host_place(a)
    ends: list[Place] = []
    for i in (1, 2):
        ns = lab.netns()
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
    build: Callable[[Lab], Pair]


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
    Spec(
        "calicnm-same",
        "calicnm, same host",
        "calicnm",
        "container - veth - host A (routing, calicnm + Docker iptables) - veth - container",
        build_calicnm_same_host,
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


# --------------------------------------------------------------------------------------------
# qperf


@dataclass(frozen=True)
class Sample:
    """One qperf result: a test at one message size."""

    test: str
    """tcp_bw or tcp_lat."""
    msg_size: int
    value: float
    """Bytes per second for tcp_bw; seconds, one way, for tcp_lat."""
    fields: dict[str, str]
    """Every field qperf printed for it (CPU use, message rate, ...), as printed."""


_RATE = {"bytes/sec": 1.0, "KB/sec": 1e3, "MB/sec": 1e6, "GB/sec": 1e9, "TB/sec": 1e12}
_TIME = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "sec": 1.0}
_SIZE = {"bytes": 1, "KiB": 1024, "MiB": 1024**2}


def _quantity(text: str, units: dict[str, float]) -> float:
    """``"2.41 GB/sec"`` -> 2.41e9 with ``units`` mapping the unit to its multiplier."""
    number, _, unit = text.partition(" ")
    return float(number.replace(",", "")) * units[unit.strip()]


def _msg_size(text: str) -> int:
    """``"64 KiB (65,536)"`` or ``"1 bytes"`` -> bytes."""
    exact = re.search(r"\(([\d,]+)\)", text)
    if exact:
        return int(exact.group(1).replace(",", ""))
    number, _, unit = text.partition(" ")
    return int(float(number) * _SIZE[unit.strip()])


def parse_qperf(output: str) -> list[Sample]:
    """Samples from ``qperf -v`` output: blocks of ``test:`` then ``key = value`` lines."""
    blocks: list[tuple[str, dict[str, str]]] = []
    for line in output.splitlines():
        header = re.fullmatch(r"(\w+):\s*", line)
        pair = re.fullmatch(r"\s+(\w+)\s+=\s+(.*?)\s*", line)
        if header:
            blocks.append((header.group(1), {}))
        elif pair and blocks:
            blocks[-1][1][pair.group(1)] = pair.group(2)
    samples = []
    for test, fields in blocks:
        if test == "tcp_bw" and "bw" in fields:
            value = _quantity(fields["bw"], _RATE)
        elif test == "tcp_lat" and "latency" in fields:
            value = _quantity(fields["latency"], _TIME)
        else:
            continue
        samples.append(Sample(test, _msg_size(fields.get("msg_size", "0 bytes")), value, fields))
    return samples


def run_qperf(
    pair: Pair,
    options: Sequence[str],
    timeout: float,
    prefix: Sequence[str] = (),
    tests: Sequence[str] = ("tcp_bw", "tcp_lat"),
) -> list[Sample]:
    """``qperf -v OPTIONS ADDRESS TESTS`` from the client end (under ``prefix``, e.g.
    taskset); raises ``RuntimeError`` if qperf fails or prints no result."""
    cmd = [*prefix, "qperf", "--listen_port", str(QPERF_PORT), "-v", *options, pair.address]
    proc = pair.client.run([*cmd, *tests], timeout=timeout, check=False)
    samples = parse_qperf(proc.stdout)
    if proc.returncode != 0 or not samples:
        raise RuntimeError(
            f"qperf exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-400:]}"
        )
    return samples


def wait_reachable(pair: Pair) -> None:
    """Poll qperf's ``conf`` exchange until the path carries it (bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT
    cmd = ["qperf", "--listen_port", str(QPERF_PORT), "-to", "3", pair.address, "conf"]
    last = ""
    while time.monotonic() < deadline:
        proc = pair.client.run(cmd, timeout=10, check=False)
        if proc.returncode == 0 and "rem_" in proc.stdout:
            return
        last = (proc.stderr or proc.stdout).strip()[-200:]
        time.sleep(1)
    raise RuntimeError(f"{pair.address} not reachable by qperf in {READY_TIMEOUT:.0f}s: {last}")


# --------------------------------------------------------------------------------------------
# running the cases


@dataclass
class Case:
    """A case's setup and everything measured on it."""

    spec: Spec
    pair: Pair | None = None
    bw: list[float] = field(default_factory=list)
    """tcp_bw at 64 KiB per repetition, bytes/s."""
    lat: list[float] = field(default_factory=list)
    """tcp_lat at 64 KiB per repetition, seconds (one way)."""
    fixed_raw: list[list[Sample]] = field(default_factory=list)
    sweep: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.spec.key

    def sweep_values(self, test: str) -> dict[int, float]:
        return {s.msg_size: s.value for s in self.sweep if s.test == test}


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1500]


def set_up(lab: Lab, spec: Spec, settings: Settings) -> Case:
    """Build a case, start its qperf server and wait until its path works.

    A failure is recorded on the case (the other cases still run)."""
    case = Case(spec)
    log(f"setting up {spec.key}")
    try:
        pair = spec.build(lab)
        lab.serve(spec.key, pair.server, settings.server_prefix)
        wait_reachable(pair)
        case.pair = pair
    except Exception as exc:
        case.errors.append(f"setup: {_short(exc)}")
        log(f"  {spec.key}: setup failed: {_short(exc)[:300]}")
    return case


def measure_fixed(case: Case, settings: Settings) -> None:
    """One repetition at 64 KiB: tcp_bw then tcp_lat, ``fixed_seconds`` each."""
    if case.pair is None:
        return
    opts = ["-m", FIXED_SIZE, "-t", str(settings.fixed_seconds)]
    try:
        timeout = 4 * settings.fixed_seconds + 30
        samples = run_qperf(case.pair, opts, timeout, settings.client_prefix)
        bw = next(s.value for s in samples if s.test == "tcp_bw")
        lat = next(s.value for s in samples if s.test == "tcp_lat")
    except (Exception, StopIteration) as exc:
        case.errors.append(f"64 KiB repetition {len(case.fixed_raw) + 1}: {_short(exc)}")
        log(f"  {case.key}: {_short(exc)[:300]}")
        return
    case.fixed_raw.append(samples)
    case.bw.append(bw)
    case.lat.append(lat)
    log(f"  {case.key:15} {gbit(bw):>7} Gbit/s  {usec(lat):>6} us")


def measure_sweep(case: Case, settings: Settings) -> None:
    """One message-size sweep: tcp_bw at every size, then tcp_lat at every size."""
    if case.pair is None:
        return
    n = len(settings.sweep_sizes)
    opts = ["-oo", settings.sweep_spec, "-t", str(settings.sweep_seconds)]
    try:
        timeout = 2 * n * (settings.sweep_seconds + 2) + 60
        case.sweep = run_qperf(case.pair, opts, timeout, settings.client_prefix)
    except Exception as exc:
        case.errors.append(f"sweep: {_short(exc)}")
        log(f"  {case.key}: sweep failed: {_short(exc)[:300]}")
        return
    missing = set(settings.sweep_sizes) - set(case.sweep_values("tcp_bw"))
    missing |= set(settings.sweep_sizes) - set(case.sweep_values("tcp_lat"))
    if missing:
        case.errors.append(f"sweep: no result for message sizes {sorted(missing)}")
    log(f"  {case.key}: sweep done ({len(case.sweep)} results)")


def measure(cases: list[Case], settings: Settings) -> None:
    """All 64 KiB repetitions round-robin over the cases, then one sweep per case."""
    for rep in range(settings.reps):
        log(f"64 KiB, repetition {rep + 1}/{settings.reps}")
        for case in cases:
            measure_fixed(case, settings)
    log(f"message-size sweep {settings.sweep_spec}")
    for case in cases:
        measure_sweep(case, settings)


# --------------------------------------------------------------------------------------------
# what the paths ran with: MTU, offloads, a few sysctls


def ethtool_features(place: Place, name: str) -> dict[str, str]:
    """``ethtool -k`` as ``{feature: "on" | "off" | "off [fixed]" ...}`` (empty if absent)."""
    if shutil.which("ethtool") is None:
        return {}
    proc = place.run(["ethtool", "-k", name], check=False)
    found = re.findall(r"^([\w-]+): (\w+(?: \[[\w ]+\])?)\s*$", proc.stdout, re.M)
    return dict(found)


def iface_settings(case: Case, iface: Iface) -> dict[str, Any]:
    """MTU, kind and offloads of one interface of one case."""
    entry: dict[str, Any] = {"case": case.key, "role": iface.role}
    entry |= {"place": iface.place.label, "ifname": iface.name}
    try:
        link = ip_link(iface.place, iface.name)[0]
        entry["mtu"] = link.get("mtu")
        entry["kind"] = link.get("linkinfo", {}).get("info_kind", "loopback")
        entry["offloads"] = ethtool_features(iface.place, iface.name)
    except Exception as exc:
        entry["error"] = _short(exc)
    return entry


def collect_interfaces(cases: list[Case]) -> list[dict[str, Any]]:
    return [
        iface_settings(case, iface)
        for case in cases
        if case.pair is not None
        for iface in case.pair.ifaces
    ]


def collect_sysctls(lab: Lab) -> dict[str, dict[str, str]]:
    """A few per-namespace settings that change a path's cost, where they apply."""
    places: list[Place] = []
    if lab.has_cluster:
        places = [Place.of(lab.cluster.fabric.netns, "fabric"), host_place(lab.hosts()[0])]
    out: dict[str, dict[str, str]] = {}
    for place in places:
        values = {}
        for key in SYSCTLS:
            proc = place.run(["sysctl", "-n", key], check=False)
            values[key] = proc.stdout.strip() if proc.returncode == 0 else "(absent)"
        out[place.label] = values
    return out


def versions(lab: Lab) -> dict[str, str]:
    """qperf, dockerd and calicnm versions, and the repository's commit."""
    out: dict[str, str] = {}
    proc = subprocess.run(["qperf", "--version"], capture_output=True, text=True, check=False)
    out["qperf"] = (proc.stdout or proc.stderr).strip()
    if lab.has_cluster:
        server = lab.hosts()[0].docker("version", "-f", "{{.Server.Version}}", check=False)
        out["dockerd"] = server
    git = ["git", "-C", str(REPO), "describe", "--always", "--dirty"]
    out["calicnm commit"] = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    return out


# --------------------------------------------------------------------------------------------
# units


def gbit(bytes_per_s: float) -> str:
    """Bytes/s as Gbit/s, three significant figures."""
    return f"{bytes_per_s * 8 / 1e9:.3g}"


def usec(seconds: float) -> str:
    """Seconds as microseconds, one decimal."""
    return f"{seconds * 1e6:.1f}"


def size_label(n: int) -> str:
    """Message size for humans: 1, 512, 1K, 64K."""
    return f"{n // 1024}K" if n >= 1024 else str(n)


# --------------------------------------------------------------------------------------------
# goals: where calicnm stands, from the medians of this run


@dataclass(frozen=True)
class Verdict:
    goal: str
    status: str
    """met, missed or not measured."""
    detail: str


def _median(values: list[float]) -> float:
    return report.median_spread(values)[0]


def _spread_note(low: float, high: float, limit: float, reps: int) -> str:
    """Says so when the goal's limit lies within what the run-to-run spread allows."""
    if reps > 1 and low <= limit <= high:
        return (
            f" The limit lies inside the ratio's range over the repetitions "
            f"({low:.3f}-{high:.3f}), so the verdict is not firm."
        )
    return ""


def _reference_note(reference: Case | None, base: Case, values: str) -> str:
    """How a reference case does against the same base, e.g. the hand-built path."""
    if reference is None:
        return ""
    ref, base_values = getattr(reference, values), getattr(base, values)
    if not ref or not base_values:
        return ""
    r = _median(ref) / _median(base_values)
    return f" For reference, the {reference.spec.title} is at {r:.3f}x."


def bandwidth_goal(
    goal: str, case: Case, base: Case, limit: float, reference: Case | None = None
) -> Verdict:
    """``case`` has at least ``limit`` times ``base``'s bandwidth at 64 KiB."""
    if not case.bw or not base.bw:
        return Verdict(goal, "not measured", "a case produced no 64 KiB figures")
    got, ref = _median(case.bw), _median(base.bw)
    r = got / ref
    detail = f"{r:.3f}x: {gbit(got)} vs {gbit(ref)} Gbit/s ({base.spec.title})." + _spread_note(
        min(case.bw) / max(base.bw), max(case.bw) / min(base.bw), limit, len(case.bw)
    )
    detail += _reference_note(reference, base, "bw")
    if r >= limit:
        return Verdict(goal, "met", detail)
    need = limit * ref
    return Verdict(
        goal,
        "missed",
        f"missed by {limit - r:.3f} ({(need / got - 1) * 100:.1f}% more bandwidth needed, "
        f"{gbit(need - got)} Gbit/s short of {gbit(need)}); " + detail,
    )


def latency_ratio_goal(
    goal: str, case: Case, base: Case, limit: float, reference: Case | None = None
) -> Verdict:
    """``case``'s latency at 64 KiB is at most ``limit`` times ``base``'s."""
    if not case.lat or not base.lat:
        return Verdict(goal, "not measured", "a case produced no 64 KiB figures")
    got, ref = _median(case.lat), _median(base.lat)
    r = got / ref
    detail = f"{r:.3f}x: {usec(got)} vs {usec(ref)} {MICRO_S} ({base.spec.title})." + _spread_note(
        min(case.lat) / max(base.lat), max(case.lat) / min(base.lat), limit, len(case.lat)
    )
    detail += _reference_note(reference, base, "lat")
    if r <= limit:
        return Verdict(goal, "met", detail)
    return Verdict(
        goal,
        "missed",
        f"missed by {r - limit:.3f}x ({usec(got - limit * ref)} {MICRO_S} over "
        f"{usec(limit * ref)} {MICRO_S}); " + detail,
    )


def latency_offset_goal(goal: str, case: Case, base: Case, limit_us: float) -> Verdict:
    """``case``'s latency at 64 KiB is at most ``base``'s plus ``limit_us``."""
    if not case.lat or not base.lat:
        return Verdict(goal, "not measured", "a case produced no 64 KiB figures")
    got, ref = _median(case.lat), _median(base.lat)
    extra_us = (got - ref) * 1e6
    detail = f"+{extra_us:.1f} {MICRO_S}: {usec(got)} vs {usec(ref)} {MICRO_S} ({base.spec.title})."
    if len(case.lat) > 1:
        low = (min(case.lat) - max(base.lat)) * 1e6
        high = (max(case.lat) - min(base.lat)) * 1e6
        if low <= limit_us <= high:
            detail += (
                f" The limit lies inside the difference's range over the repetitions "
                f"({low:+.1f} to {high:+.1f} {MICRO_S}), so the verdict is not firm."
            )
    if extra_us <= limit_us:
        return Verdict(goal, "met", detail)
    return Verdict(goal, "missed", f"missed by {extra_us - limit_us:.1f} {MICRO_S}; " + detail)


def evaluate_goals(cases: dict[str, Case]) -> list[Verdict]:
    """calicnm's goals, each against the case it is defined relative to."""
    same, routed, vxlan = cases["calicnm-same"], cases["calicnm-routed"], cases["calicnm-vxlan"]
    veth, hand = cases["veth"], cases["handbuilt"]
    return [
        bandwidth_goal("same-host bandwidth >= 0.97x the hand-built path", same, hand, 0.97),
        # Against a bare veth, the hand-built path shows what the routed design itself costs.
        bandwidth_goal("same-host bandwidth >= 0.90x a bare veth", same, veth, 0.90, hand),
        latency_ratio_goal("same-host latency <= 1.15x a bare veth", same, veth, 1.15, hand),
        bandwidth_goal("routed bandwidth >= 0.95x host to host", routed, cases["host"], 0.95),
        latency_offset_goal(
            f"routed latency <= host to host + 15 {MICRO_S}", routed, cases["host"], 15.0
        ),
        bandwidth_goal("VXLAN bandwidth >= 0.85x routed", vxlan, routed, 0.85),
    ]


# --------------------------------------------------------------------------------------------
# charts


def plot(cases: list[Case], test: str, path: Path) -> bool:
    """One line per case against message size (log x), like the article's charts.

    Returns False (and draws nothing) if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    styles = {"baseline": ("--", 1.4), "calicnm": ("-", 2.4), "peer": (":", 1.8)}
    fig, ax = plt.subplots(figsize=(10, 6))
    sizes: set[int] = set()
    for i, case in enumerate(cases):
        points = sorted(case.sweep_values(test).items())
        if not points:
            continue
        xs = [x for x, _ in points]
        ys = [v * 8 / 1e9 if test == "tcp_bw" else v * 1e6 for _, v in points]
        sizes.update(xs)
        style, width = styles[case.spec.group]
        ax.plot(xs, ys, style, lw=width, marker="o", ms=3.5, color=f"C{i}", label=case.spec.title)
    ax.set_xscale("log", base=2)
    ticks = sorted(sizes)
    ax.set_xticks(ticks, [size_label(t) for t in ticks])
    ax.set_xlabel("message size (bytes)")
    if test == "tcp_bw":
        ax.set_ylabel("bandwidth (Gbit/s)")
        ax.set_title("qperf tcp_bw: bandwidth vs message size")
    else:
        ax.set_ylabel(f"one-way latency ({MICRO_S})")
        ax.set_title("qperf tcp_lat: one-way latency vs message size")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# the report


@dataclass
class Run:
    """One whole run: what was measured, on what, and how long it took."""

    settings: Settings
    cases: list[Case]
    system: dict[str, Any]
    interfaces: list[dict[str, Any]] = field(default_factory=list)
    sysctls: dict[str, dict[str, str]] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    measured_at: float = 0.0
    """``time.monotonic()`` when measuring ended and teardown began."""
    errors: list[str] = field(default_factory=list)

    def by_key(self) -> dict[str, Case]:
        return {case.key: case for case in self.cases}


def results_table(run: Run) -> str:
    """Case, bandwidth and latency at 64 KiB: median [min-max] and ratio to host to host."""
    base = run.by_key()["host"]
    base_bw = _median(base.bw) if base.bw else None
    base_lat = _median(base.lat) if base.lat else None
    rows = []
    for case in run.cases:
        bw = _median(case.bw) if case.bw else None
        lat = _median(case.lat) if case.lat else None
        rows.append(
            [
                case.spec.title,
                case.spec.group,
                report.format_spread(case.bw, gbit),
                report.format_ratio(report.ratio(bw, base_bw)),
                report.format_spread(case.lat, usec),
                report.format_ratio(report.ratio(lat, base_lat)),
            ]
        )
    header = [
        "case",
        "kind",
        "bandwidth Gbit/s",
        "bw / host",
        f"latency {MICRO_S} (one way)",
        "lat / host",
    ]
    return report.markdown_table(header, rows, align="llrrrr")


def sweep_table(run: Run, test: str, fmt: Callable[[float], str]) -> str:
    """One row per case at a handful of message sizes (all of them are in the JSON)."""
    shown = [s for s in (1, 16, 256, 4096, FIXED_BYTES) if s in run.settings.sweep_sizes]
    rows = []
    for case in run.cases:
        values = case.sweep_values(test)
        cells = [fmt(values[s]) if s in values else report.EN_DASH for s in shown]
        rows.append([case.spec.title, *cells])
    return report.markdown_table(["case", *[size_label(s) for s in shown]], rows)


def interfaces_table(run: Run) -> str:
    """MTU and offloads of every interface on a measured path (each interface once)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in run.interfaces:
        key = (entry["place"], entry["ifname"])
        merged.setdefault(key, {**entry, "cases": []})["cases"].append(entry["case"])
    rows = []
    for entry in merged.values():
        offloads = entry.get("offloads", {})
        rows.append(
            [
                f"{entry['place']} {entry['ifname']}",
                entry["role"],
                str(entry.get("kind", entry.get("error", "?"))),
                str(entry.get("mtu", "?")),
                *[offloads.get(feature, "?") for feature in OFFLOADS],
                ", ".join(entry["cases"]),
            ]
        )
    header = ["interface", "role", "kind", "MTU", *OFFLOADS.values(), "cases"]
    return report.markdown_table(header, rows, align="lllr" + "l" * len(OFFLOADS) + "l")


def goals_text(verdicts: list[Verdict]) -> str:
    rows = [
        [v.goal, v.status.upper() if v.status == "missed" else v.status, v.detail] for v in verdicts
    ]
    return report.markdown_table(["goal", "verdict", "figures (medians at 64 KiB)"], rows, "lll")


def method_text(run: Run) -> str:
    s = run.settings
    mode = "quick (one short iteration per case)" if s.quick else "default"
    return f"""
- Mode: {mode}.  64 KiB: `qperf -v -m 64K -t {s.fixed_seconds} ADDRESS tcp_bw tcp_lat`,
  {s.reps} repetition(s), taken round-robin over the cases; figures are the median with
  [min-max] over the repetitions.  Sweep: `qperf -v -oo {s.sweep_spec} -t {s.sweep_seconds}
  ADDRESS tcp_bw tcp_lat`, once per case.
- Ratios are to *host to host* measured in the same run (bandwidth: higher is better;
  latency: lower is better).
- qperf's `tcp_lat` is **one-way** latency: half the measured round trip.
- Every "host" is a network namespace on one machine: the underlay is veth - bridge - veth
  in software, and client and server share its {run.system.get("cores")} cores, so the
  figures compare the paths' CPU cost rather than any wire.
- {pin_text(s)}
- The calicnm nodes run with the product's defaults (INFO logs, 30 s resync); each emulated
  host also runs dockerd, and the fabric namespace runs etcd.
""".strip()


def pin_text(settings: Settings) -> str:
    if settings.pin == "off":
        return "qperf's client and server are not pinned: the scheduler places them."
    server, client = settings.server_prefix[-1], settings.client_prefix[-1]
    why = (
        "one CPU does all of a path's work, so the figures are the path's CPU cost, free of "
        "cross-CPU wake-ups (see the calibration under System)"
        if settings.pin == "same"
        else "every message wakes the other end on another CPU"
    )
    return f"qperf's server runs on CPU {server} and its client on CPU {client} (taskset): {why}."


def paths_text(run: Run) -> str:
    rows = [[c.spec.title, c.spec.path, c.pair.address if c.pair else "-"] for c in run.cases]
    return report.markdown_table(["case", "path", "server address"], rows, "lll")


def system_text(run: Run) -> str:
    lines = [report.system_info_markdown(run.system)]
    for place, values in run.sysctls.items():
        pairs = ", ".join(f"`{k}` = {v}" for k, v in values.items())
        lines.append(f"- **sysctls in {place}**: {pairs}")
    return "\n".join(lines)


def timing_text(run: Run) -> str:
    return "\n".join(f"- {name}: {seconds:.0f} s" for name, seconds in run.timing.items())


def errors_text(run: Run) -> str:
    lines = [f"- {case.spec.title}: {err}" for case in run.cases for err in case.errors]
    lines += [f"- run: {err}" for err in run.errors]
    return "\n".join(lines)


def write_report(run: Run, out: Path) -> None:
    """dataplane.md, dataplane.json and the two charts in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    charts = [plot(run.cases, t, out / f"{n}.png") for t, n in TESTS]
    verdicts = evaluate_goals(run.by_key())
    sections = [
        ("How it was measured", method_text(run)),
        ("System", system_text(run)),
        ("Results at 64 KiB messages", results_table(run)),
        ("calicnm against its goals", goals_text(verdicts)),
    ]
    if all(charts):
        sections.append(
            ("Message-size sweep", "![bandwidth](bandwidth.png)\n\n![latency](latency.png)")
        )
    else:
        sections.append(("Message-size sweep", "No charts: matplotlib is not installed."))
    sections += [
        ("Sweep: bandwidth (Gbit/s)", sweep_table(run, "tcp_bw", gbit)),
        (f"Sweep: one-way latency ({MICRO_S})", sweep_table(run, "tcp_lat", usec)),
        ("Paths measured", paths_text(run)),
        ("Interfaces: MTU and offloads (ethtool -k)", interfaces_table(run)),
        ("Run time", timing_text(run)),
    ]
    if errors_text(run):
        sections.append(("Errors", errors_text(run)))
    report.write_markdown(out / "dataplane.md", sections, title="calicnm data-plane benchmark")
    report.write_json(out / "dataplane.json", run_json(run, verdicts))


TESTS = (("tcp_bw", "bandwidth"), ("tcp_lat", "latency"))


def _sample_json(sample: Sample) -> dict[str, Any]:
    return {
        "test": sample.test,
        "msg_size": sample.msg_size,
        "value": sample.value,
        "fields": sample.fields,
    }


def case_json(case: Case) -> dict[str, Any]:
    """A case's raw numbers: bandwidth in bytes/s, latency in seconds (one way)."""
    summary = {}
    for name, values in (("bw_bytes_per_s", case.bw), ("lat_s", case.lat)):
        if values:
            median, low, high = report.median_spread(values)
            summary[name] = {"median": median, "min": low, "max": high}
    return {
        "key": case.key,
        "title": case.spec.title,
        "group": case.spec.group,
        "path": case.spec.path,
        "address": case.pair.address if case.pair else None,
        "client": case.pair.client.label if case.pair else None,
        "server": case.pair.server.label if case.pair else None,
        "fixed": {
            "msg_size": FIXED_BYTES,
            "bw_bytes_per_s": case.bw,
            "lat_s": case.lat,
            "summary": summary,
            "raw": [[_sample_json(s) for s in rep] for rep in case.fixed_raw],
        },
        "sweep": [_sample_json(s) for s in case.sweep],
        "errors": case.errors,
    }


def run_json(run: Run, verdicts: list[Verdict]) -> dict[str, Any]:
    s = run.settings
    return {
        "settings": {
            "reps": s.reps,
            "fixed_msg_size": FIXED_BYTES,
            "fixed_seconds": s.fixed_seconds,
            "sweep_spec": s.sweep_spec,
            "sweep_sizes": s.sweep_sizes,
            "sweep_seconds": s.sweep_seconds,
            "quick": s.quick,
            "pin": s.pin,
            "server_prefix": s.server_prefix,
            "client_prefix": s.client_prefix,
        },
        "units": {"bandwidth": "bytes/s", "latency": "seconds, one way (qperf tcp_lat)"},
        "system": run.system,
        "sysctls": run.sysctls,
        "interfaces": run.interfaces,
        "cases": [case_json(case) for case in run.cases],
        "goals": [v.__dict__ for v in verdicts],
        "timing_s": run.timing,
        "errors": run.errors,
    }


# --------------------------------------------------------------------------------------------
# main


def preflight() -> str | None:
    """Why the benchmark cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, dockerd)"
    for tool in ("qperf", "dockerd", "etcd", "nsenter", "taskset", "ip", "iptables", "bridge"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; run 'sh scripts/install-deps.sh'"
    if not (REPO / ".venv" / "bin" / "calicnm").exists():
        return "the venv has no calicnm; run 'make deps'"
    return None


def wakeup_calibration(lab: Lab) -> dict[str, str]:
    """Loopback 1 B one-way latency with qperf's ends on one CPU and on two CPUs.

    The difference is what a wake-up across CPUs costs on this machine (in a VM: an IPI
    and a vCPU wake-up through the hypervisor), which explains the pinning choice."""
    if len(_cpus()) < 2:
        return {}
    ns = Place.of(lab.netns(), "calibration")
    last, first = str(max(_cpus())), str(min(_cpus()))
    lab.serve("calibration", ns, ["taskset", "-c", last])
    pair = Pair(ns, ns, "127.0.0.1", ())
    out: dict[str, str] = {}
    try:
        wait_reachable(pair)
        for label, cpu in (("same CPU", last), ("across CPUs", first)):
            samples = run_qperf(
                pair, ["-m", "1", "-t", "1"], 30, ["taskset", "-c", cpu], ("tcp_lat",)
            )
            out[f"loopback 1 B one-way latency, {label}"] = f"{usec(samples[0].value)} {MICRO_S}"
    except Exception as exc:
        out["wake-up calibration"] = f"failed: {_short(exc)}"
    return out


def execute(settings: Settings, workdir: Path, stack: contextlib.ExitStack) -> Run:
    """Build every case, measure them, and record what they ran on."""
    lab = Lab(stack, workdir)
    run = Run(settings, [], report.system_info())
    t0 = time.monotonic()
    run.cases = [set_up(lab, spec, settings) for spec in SPECS]
    run.system |= wakeup_calibration(lab)
    run.interfaces = collect_interfaces(run.cases)
    run.sysctls = collect_sysctls(lab)
    run.system |= versions(lab)
    t1 = time.monotonic()
    measure(run.cases, settings)
    run.timing = {"setup": t1 - t0, "measurement": time.monotonic() - t1}
    run.measured_at = time.monotonic()
    return run


def _sigterm(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so everything built is torn down."""
    raise SystemExit(128 + signum)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="one short iteration per case")
    parser.add_argument("--out", type=Path, help="report directory (bench/results/<UTC time>/)")
    parser.add_argument("--reps", type=int, help="64 KiB repetitions per case (default 3)")
    parser.add_argument(
        "--pin",
        choices=("same", "split", "off"),
        default="same",
        help="CPU placement of qperf's client and server: both on the last CPU (default; "
        "stable on VMs, where a cross-CPU wake-up is costly), on two CPUs, or unpinned",
    )
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.pin == "split" and len(_cpus()) < 2:
        parser.error("--pin split needs two CPUs")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.from_args(args)
    out: Path = args.out or REPO / "bench" / "results" / report.utc_stamp()
    problem = preflight()
    if problem:
        print(f"dataplane: {problem}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.monotonic()
    run: Run | None = None
    try:
        with (
            tempfile.TemporaryDirectory(prefix="cnmt-bench-", ignore_cleanup_errors=True) as tmp,
            contextlib.ExitStack() as stack,
        ):
            run = execute(settings, Path(tmp), stack)
            log("tearing down")
    except Exception as exc:
        if run is None:
            raise
        run.errors.append(f"teardown: {_short(exc)}")
    run.timing["teardown"] = time.monotonic() - run.measured_at
    run.timing["total"] = time.monotonic() - started
    write_report(run, out)
    log(f"report in {out}")
    failed = [c.key for c in run.cases if not c.bw or not c.sweep or c.errors]
    if failed or run.errors:
        log(f"incomplete: {', '.join(failed) or 'teardown'}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
