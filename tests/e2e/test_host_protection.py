"""A container attacking its own host, on a real host, with hand-made packets.

One emulated host (node, embedded etcd, dockerd) on a fabric with two more
namespaces of the test's own ("outside" and "other": machines on the same
L2 that are not calicnm hosts).  The host has a VXLAN pool and three
containers on one network in it: ``va`` attacks, ``vb`` and ``vc`` are the
victims.  A busybox httpd listens on the host itself (all addresses).

Frames are made by ``rawpackets.py`` run inside the container's network
namespace (``nsenter --net=/proc/<pid>/ns/net``), so the container needs no
tools; what reaches the host is counted by the same script sniffing in the
host's namespace.  Every attack has a control that shows the same frames or
the same probe do work where they should, so a "nothing happened" is the
host's protection and not a broken probe.

The node runs with the default endpoint-to-host action (drop) first; the
last tests restart it with ``accept``.  Traffic only goes between these
namespaces and containers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from calicnm.endpoint import host_ifname
from calicnm.model import VXLAN_VNI
from lab.cluster import CalicnmHost, wait_until
from lab.fabric import Attachment, Fabric
from lab.images import DEFAULT_IMAGE as IMG
from lab.procs import Process
from tests.e2e.helpers import (
    container_netns,
    endpoint_id,
    etcdctl,
    fetch_from,
    link_mac,
    raw_packets,
    sniffing,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

ROOT = "/calicnm/v1"
POOL = "172.30.0.0/16"
NET = "vx"
HOST_PORT = 8099
GATEWAY = "169.254.1.1"
ACTION = "CALICNM_ENDPOINT_TO_HOST_ACTION"
FAKE_BLOCK = "172.30.200.0/26"
"""A block of the pool held by "fakepeer", a host record the tests write."""
FAKE_SRC = "172.30.200.5"
STRAY_SRC = "172.30.250.9"
"""In the pool, in nobody's block."""
SPOOF_MAC = "66:de:ad:be:ef:01"
HOST_SYSCTLS = {
    "ipv4/conf/{}/rp_filter": "1",
    "ipv4/conf/{}/proxy_arp": "1",
    "ipv4/conf/{}/drop_gratuitous_arp": "1",
    "ipv6/conf/{}/accept_ra": "0",
    "ipv6/conf/{}/disable_ipv6": "1",
}


@dataclass
class Site:
    fabric: Fabric
    host: CalicnmHost
    outside: Attachment
    other: Attachment
    ips: dict[str, str]
    cali: dict[str, str]
    macs: dict[str, str]
    """Container side (eth0) MACs."""
    listener_log: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir: Path = tmp_path_factory.mktemp("protect")
    www = workdir / "www"
    www.mkdir()
    (www / "index.html").write_text("hello\n")
    with Fabric() as fabric:
        att = fabric.add_host()
        with CalicnmHost(
            att.host, att.address, workdir / "host1", "host1", extra_env={ACTION: "drop"}
        ) as host:
            outside = fabric.add_host()
            other = fabric.add_host()
            log = workdir / "listener.log"
            listener: Process = host.netns.process(
                ["busybox", "httpd", "-f", "-v", "-p", str(HOST_PORT), "-h", str(www)], log
            ).start()
            try:
                host.calicnm("pool", "add", POOL, "--vxlan")
                host.create_network(NET, "--subnet", POOL)
                serve = "echo hello > /www/index.html; exec httpd -f -v -p 80 -h /www"
                for name in ("va", "vb", "vc"):
                    host.docker("run", "-d", "--net", NET, "--name", name, IMG, "sh", "-c", serve)
                names = ("va", "vb", "vc")
                ips = {n: host.ip_of(n, NET) for n in names}
                cali = {n: host_ifname(endpoint_id(host, n, NET)) for n in names}
                macs = {
                    n: host.docker(
                        "inspect", "-f", f"{{{{.NetworkSettings.Networks.{NET}.MacAddress}}}}", n
                    )
                    for n in names
                }
                wait_until(lambda: host.links("vxlan.calicnm"), 20, "the VXLAN device")
                wait_until(lambda: fetch_from(host, "vb", ips["vc"]) == "hello", 20, "vb -> vc")
                wait_until(
                    lambda: "hello" in host_fetch(host, f"http://127.0.0.1:{HOST_PORT}/"),
                    10,
                    "the host's own listener",
                )
                yield Site(fabric, host, outside, other, ips, cali, macs, log)
            finally:
                listener.stop()


# ---- helpers -------------------------------------------------------------------------------


def host_fetch(host: CalicnmHost, url: str) -> str:
    """GET ``url`` from the host's own namespace (the controls)."""
    got = host.netns.run(["sh", "-c", f"busybox timeout 3 busybox wget -q -O - {url}"], check=False)
    return got.stdout


def sysctls(site: Site, ifname: str) -> dict[str, str]:
    return {
        path.format(ifname): site.host.netns.run(
            ["cat", f"/proc/sys/net/{path.format(ifname)}"]
        ).stdout.strip()
        for path in HOST_SYSCTLS
    }


def wanted_sysctls(ifname: str) -> dict[str, str]:
    return {path.format(ifname): value for path, value in HOST_SYSCTLS.items()}


def neighbours(site: Site) -> set[tuple[str, str, str]]:
    """(ip, dev, lladdr) of every IPv4 neighbour entry that has an address."""
    out = site.host.netns.run(["ip", "-4", "neigh", "show"]).stdout
    found = set()
    for line in out.splitlines():
        words = line.split()
        if "lladdr" in words:
            found.add((words[0], words[words.index("dev") + 1], words[words.index("lladdr") + 1]))
    return found


def ping(site: Site, src: str, ip: str) -> bool:
    out = site.host.docker_run("exec", src, "ping", "-c", "1", "-W", "1", ip)
    return "1 packets received" in out.stdout


def vxlan_args(site: Site, inner_src: str, marker: str, dsts: list[str]) -> dict[str, object]:
    return {
        "inner_src": inner_src,
        "inner_dst": site.ips["vc"],
        "inner_dst_mac": link_mac(site.host.netns, "vxlan.calicnm"),
        "inner_src_mac": "66:00:00:00:00:01",
        "vni": VXLAN_VNI,
        "marker": marker,
        "dsts": dsts,
    }


def crafted_vxlan(site: Site, sender: str, inner_src: str, marker: str) -> dict[str, int]:
    """Send a VXLAN-encapsulated echo from ``inner_src`` to vc from the namespace
    at ``sender`` to the host (its address and the gateway); what arrived on the
    VXLAN device and on vc's interface."""
    host = site.host
    with sniffing(
        str(host.netns.path),
        [site.cali["vc"], "vxlan.calicnm"],
        inner_src,
        site.ips["vc"],
        2.0,
        marker,
    ) as counts:
        sent = raw_packets(
            sender, "vxlan", vxlan_args(site, inner_src, marker, [host.address, GATEWAY])
        )
        assert sent["sent"] > 0
    print(f"crafted VXLAN {marker!r} (inner {inner_src} -> vc), frames seen: {counts}")
    return counts


def ipset_members(site: Site, name: str) -> set[str]:
    out = site.host.netns.run(["ipset", "list", name], check=False).stdout
    return set(out.split("Members:\n", 1)[1].split()) if "Members:" in out else set()


def restart_node(site: Site, action: str) -> None:
    host = site.host
    assert host.stop_node() == 0
    host.extra_env[ACTION] = action
    host.start_node()
    rule = "-A calicnm-INPUT -i cali+ -j ACCEPT" if action == "accept" else None
    if rule:
        wait_until(
            lambda: rule in host.netns.run(["iptables", "-S", "calicnm-INPUT"]).stdout,
            20,
            f"the {action} rule",
        )


# ---- drop (the default) -----------------------------------------------------------------------


def test_host_side_of_each_veth_is_locked_down(site: Site) -> None:
    host = site.host
    assert (
        "local 169.254.1.0/24 dev lo"
        in host.netns.run(["ip", "route", "show", "table", "local"]).stdout
    )
    for name, ifname in site.cali.items():
        assert sysctls(site, ifname) == wanted_sysctls(ifname)
        entry = host.netns.run(["ip", "-4", "neigh", "show", "dev", ifname]).stdout
        assert f"{site.ips[name]} lladdr {site.macs[name]} PERMANENT" in entry, entry


def test_sysctls_and_neighbours_are_reasserted(site: Site) -> None:
    """Changed by hand (or by anything else on the host): put back by the next full
    pass (a resync every 3 s here)."""
    host = site.host
    ifname = site.cali["vb"]
    for path, value in HOST_SYSCTLS.items():
        flipped = "0" if value == "1" else "1"
        host.netns.run(["sh", "-c", f"echo {flipped} > /proc/sys/net/{path.format(ifname)}"])
    host.netns.run(["ip", "neigh", "del", site.ips["vb"], "dev", ifname])
    assert sysctls(site, ifname) != wanted_sysctls(ifname)
    start = time.monotonic()
    wait_until(lambda: sysctls(site, ifname) == wanted_sysctls(ifname), 10, "sysctls back")
    wait_until(
        lambda: "PERMANENT" in host.netns.run(["ip", "neigh", "show", site.ips["vb"]]).stdout,
        10,
        "the neighbour entry back",
    )
    print(f"re-asserted after {time.monotonic() - start:.1f}s")


def test_container_cannot_reach_its_host_by_default(site: Site) -> None:
    host = site.host
    # Controls: the listener answers on the host's address, and containers talk.
    assert "hello" in host_fetch(host, f"http://{host.address}:{HOST_PORT}/")
    assert fetch_from(host, "va", site.ips["vc"]) == "hello"
    for ip in (host.address, GATEWAY):
        assert fetch_from(host, "va", ip, HOST_PORT) == "", f"va reached the host at {ip}"
    assert site.ips["va"] not in site.listener_log.read_text()


def test_etcd_is_not_reachable_from_containers(site: Site) -> None:
    host = site.host
    assert "etcdserver" in host_fetch(host, "http://127.0.0.1:2379/version"), "control"
    for ip in (host.address, GATEWAY):
        assert fetch_from(host, "va", ip, 2379) == ""
    # 127.0.0.1 put straight into a frame to the host (the container's own
    # routing would keep it): the host never answers a SYN.
    got = raw_packets(container_netns(host, "va"), "syn", syn_args(site, "127.0.0.1", 2379))
    print(f"raw SYN to 127.0.0.1:2379 from va (drop): answer {got['answer']}")
    assert got["answer"] in (None, "RA"), got
    assert got["answer"] != "SA"


def syn_args(site: Site, dst: str, port: int) -> dict[str, object]:
    return {
        "ifname": "eth0",
        "eth_dst": link_mac(site.host.netns, site.cali["va"]),
        "eth_src": site.macs["va"],
        "src": site.ips["va"],
        "dst": dst,
        "dport": port,
        "seconds": 1.5,
    }


def test_spoofed_arp_leaves_the_neighbour_table_alone(site: Site) -> None:
    host = site.host
    ns = container_netns(host, "va")
    host_mac = link_mac(host.netns, site.cali["va"])
    # Control: the host answers va's own ARP for its gateway, with va's veth MAC...
    probe = {"ifname": "eth0", "mac": site.macs["va"], "ip": site.ips["va"], "target": GATEWAY}
    assert raw_packets(ns, "arp_probe", probe)["answer"] == host_mac
    # ...but not when va asks in vb's name (strict reverse-path filtering).
    assert raw_packets(ns, "arp_probe", dict(probe, ip=site.ips["vb"]))["answer"] is None
    before = neighbours(site)
    frames = []
    for claimed in (site.ips["vb"], site.ips["vc"], GATEWAY, host.address):
        bcast = "ff:ff:ff:ff:ff:ff"
        frames += [
            # gratuitous ARP, as a reply and as a request
            {
                "eth_dst": bcast,
                "op": 2,
                "sha": SPOOF_MAC,
                "spa": claimed,
                "tha": bcast,
                "tpa": claimed,
            },
            {
                "eth_dst": bcast,
                "op": 1,
                "sha": SPOOF_MAC,
                "spa": claimed,
                "tha": "00:00:00:00:00:00",
                "tpa": claimed,
            },
            # unicast reply to the host, and a request to it that would teach it the sender
            {
                "eth_dst": host_mac,
                "op": 2,
                "sha": SPOOF_MAC,
                "spa": claimed,
                "tha": host_mac,
                "tpa": GATEWAY,
            },
            {
                "eth_dst": host_mac,
                "op": 1,
                "sha": SPOOF_MAC,
                "spa": claimed,
                "tha": "00:00:00:00:00:00",
                "tpa": GATEWAY,
            },
        ]
    sent = raw_packets(ns, "arp", {"ifname": "eth0", "frames": frames, "repeat": 3})
    print(f"{sent['sent']} spoofed ARP frames sent")
    time.sleep(1)
    after = neighbours(site)
    assert after == before, f"neighbours changed: {after ^ before}"
    assert not [n for n in after if n[2] == SPOOF_MAC]
    assert ping(site, "vb", site.ips["vc"]) and ping(site, "vc", site.ips["vb"])


def test_router_advertisements_configure_nothing(site: Site) -> None:
    host = site.host
    ifname = site.cali["va"]
    ra = {"ifname": "eth0", "src_mac": site.macs["va"], "prefix": "2001:db8:77::", "repeat": 3}

    def v6() -> tuple[str, str]:
        addrs = host.netns.run(["ip", "-6", "addr", "show", "dev", ifname]).stdout
        routes = host.netns.run(["ip", "-6", "route", "show", "dev", ifname]).stdout
        return addrs.strip(), routes.strip()

    routes_before = host.netns.run(["ip", "-6", "route"]).stdout
    raw_packets(container_netns(host, "va"), "ra", ra)
    time.sleep(1)
    assert v6() == ("", ""), v6()
    assert host.netns.run(["ip", "-6", "route"]).stdout == routes_before
    assert sysctls(site, ifname) == wanted_sysctls(ifname)
    # Control: with IPv6 and RAs turned on by hand, the same advertisement does
    # configure the interface; the agent's next full pass takes it away again.
    took = None
    for _ in range(10):  # the agent may re-assert between the writes and the RA
        for path, value in (("disable_ipv6", "0"), ("accept_ra", "2")):
            host.netns.run(["sh", "-c", f"echo {value} > /proc/sys/net/ipv6/conf/{ifname}/{path}"])
        raw_packets(container_netns(host, "va"), "ra", ra)
        start = time.monotonic()
        if poll(lambda: "2001:db8:77:" in v6()[0], 2.0):
            wait_until(lambda: v6() == ("", ""), 10, "the RA's address taken away")
            took = time.monotonic() - start
            break
    assert took is not None, "control: the RA never configured the interface even unprotected"
    print(f"hand-enabled IPv6 taken away again after {took:.1f}s")
    assert sysctls(site, ifname) == wanted_sysctls(ifname)
    wait_until(
        lambda: host.netns.run(["ip", "-6", "route"]).stdout == routes_before,
        10,
        "the RA's routes gone",
    )


def poll(check: Callable[[], bool], timeout: float) -> bool:
    """Does ``check()`` hold within ``timeout`` seconds?"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_crafted_vxlan_from_a_container_is_not_delivered(site: Site) -> None:
    host = site.host
    # Control: the sniffer sees what the host's stack hands to vc.  (vb's own
    # traffic to vc takes the same-host fast path, which never crosses vc's host
    # side, so a packet from the host itself stands in for it.)
    with sniffing(
        str(host.netns.path), [site.cali["vc"]], host.address, site.ips["vc"], 2.0
    ) as seen:
        ping_from = ["busybox", "ping", "-c", "1", "-W", "1", "-I", host.address]
        host.netns.run([*ping_from, site.ips["vc"]], check=False)
    assert seen[site.cali["vc"]] >= 1, seen
    assert ping(site, "vb", site.ips["vc"])
    got = crafted_vxlan(site, container_netns(host, "va"), site.ips["vb"], "from-va-drop")
    assert got == {site.cali["vc"]: 0, "vxlan.calicnm": 0}, got


def test_vxlan_only_from_registered_hosts_and_their_own_sources(site: Site) -> None:
    """From "outside", a machine on the fabric: decapsulated only once it is a
    registered host, and then only inner sources in its blocks reach vc."""
    host = site.host
    meta = f"{ROOT}/hosts/fakepeer/meta"
    affinity = f"{ROOT}/ipam/v4/affinity/fakepeer/{FAKE_BLOCK.replace('/', '-')}"
    sender = str(site.outside.host.path)
    rule = ["profile", NET, "rule", "add", "inbound", "allow", "icmp", "from", "cidr", POOL]
    host.calicnm(*rule)  # so that only the tunnel checks can stop these echoes
    try:
        etcdctl(host, "put", affinity, "")
        etcdctl(host, "put", meta, fake_host(site.other.address))
        wait_until(
            lambda: (
                site.other.address in ipset_members(site, "calicnm-peer-hosts")
                and FAKE_BLOCK in ipset_members(site, "calicnm-tunnel-srcs")
            ),
            20,
            "fakepeer at the other address",
        )
        # Not a registered host's address: dropped before decapsulation.
        got = crafted_vxlan(site, sender, FAKE_SRC, "unregistered")
        assert got == {site.cali["vc"]: 0, "vxlan.calicnm": 0}, got
        etcdctl(host, "put", meta, fake_host(site.outside.address))
        wait_until(
            lambda: site.outside.address in ipset_members(site, "calicnm-peer-hosts"),
            20,
            "fakepeer at the outside address",
        )
        # Control: a registered host, an inner source in its own block: delivered.
        got = crafted_vxlan(site, sender, FAKE_SRC, "registered")
        assert got[site.cali["vc"]] >= 1 and got["vxlan.calicnm"] >= 1, got
        # A local container's address from the tunnel: decapsulated, not delivered.
        got = crafted_vxlan(site, sender, site.ips["vb"], "local-src")
        assert got[site.cali["vc"]] == 0 and got["vxlan.calicnm"] >= 1, got
        # An address in the pool but in no host's block: not delivered.
        got = crafted_vxlan(site, sender, STRAY_SRC, "stray-src")
        assert got[site.cali["vc"]] == 0 and got["vxlan.calicnm"] >= 1, got
    finally:
        etcdctl(host, "del", meta, check=False)
        etcdctl(host, "del", affinity, check=False)
        host.calicnm(*[w if w != "add" else "remove" for w in rule], check=False)
    wait_until(lambda: not ipset_members(site, "calicnm-peer-hosts"), 20, "fakepeer forgotten")


def fake_host(ip: str) -> str:
    return json.dumps({"name": "fakepeer", "ip": ip, "as_num": None})


# ---- accept -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def accepting(site: Site) -> Iterator[Site]:
    restart_node(site, "accept")
    yield site


def test_accept_lets_containers_reach_their_host(accepting: Site) -> None:
    site = accepting
    host = site.host
    for ip in (host.address, GATEWAY):
        assert wait_until(
            lambda ip=ip: fetch_from(host, "va", ip, HOST_PORT) == "hello", 10, f"va -> {ip}"
        )
    assert f"[::ffff:{site.ips['va']}]" in site.listener_log.read_text()


def test_etcd_stays_unreachable_with_accept(accepting: Site) -> None:
    site = accepting
    host = site.host
    for ip in (host.address, GATEWAY):
        assert fetch_from(host, "va", ip, 2379) == "", f"va reached etcd at {ip}"
        got = raw_packets(container_netns(host, "va"), "syn", syn_args(site, ip, 2379))
        assert got["answer"] == "RA", f"{ip}:2379 should refuse (nothing listens there): {got}"
    got = raw_packets(container_netns(host, "va"), "syn", syn_args(site, "127.0.0.1", 2379))
    print(f"raw SYN to 127.0.0.1:2379 from va (accept): answer {got['answer']}")
    assert got["answer"] != "SA", got
    # Control: the same raw SYN to the listener is answered.
    got = raw_packets(container_netns(host, "va"), "syn", syn_args(site, host.address, HOST_PORT))
    assert got["answer"] == "SA", got


def test_crafted_vxlan_from_a_container_is_not_delivered_with_accept(accepting: Site) -> None:
    site = accepting
    got = crafted_vxlan(site, container_netns(site.host, "va"), site.ips["vb"], "from-va-accept")
    assert got == {site.cali["vc"]: 0, "vxlan.calicnm": 0}, got


def test_return_hands_the_verdict_to_the_hosts_input_chain(accepting: Site) -> None:
    """``return``: once the container's own policy allowed it, the host's INPUT
    rules decide (here: its policy ACCEPT, then an operator's REJECT)."""
    site = accepting
    host = site.host
    restart_node(site, "return")
    assert wait_until(
        lambda: fetch_from(host, "va", host.address, HOST_PORT) == "hello", 10, "va -> host"
    )
    inputs = host.netns.run(["iptables", "-S", "calicnm-INPUT"]).stdout
    assert "-i cali+ -j ACCEPT" not in inputs and "-i cali+ -j DROP" not in inputs, inputs
    reject = ["INPUT", "-i", "cali+", "-p", "tcp", "--dport", str(HOST_PORT), "-j", "REJECT"]
    host.netns.run(["iptables", "-w", "-A", *reject])
    try:
        assert fetch_from(host, "va", host.address, HOST_PORT) == ""
        assert fetch_from(host, "va", GATEWAY, HOST_PORT) == ""
    finally:
        host.netns.run(["iptables", "-w", "-D", *reject])
    assert fetch_from(host, "va", GATEWAY, HOST_PORT) == "hello"
