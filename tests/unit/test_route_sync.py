"""The agent's routing hooks over a snapshot read from MemoryStore:
``BgpSync`` with a fake BIRD, ``EncapSync`` with fake tunnels."""

from __future__ import annotations

import ipaddress
import os

import pytest

from calicnm.endpoint import derive_mac
from calicnm.model import VXLAN_DEVICE, VXLAN_VNI, BgpConfig, Endpoint, Host, Peer, Pool
from calicnm.routing.encap import IPIP_DEVICE, vtep_mac
from calicnm.routing.route_sync import BgpSync, EncapSync
from calicnm.store import keys
from calicnm.store.records import read_snapshot
from tests.fakes import FakeBird, FakeTunnels, MemoryStore

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
ROUTED = Pool(N("10.0.0.0/16"))
VXLAN = Pool(N("172.30.0.0/16"), vxlan=True)
IPIP = Pool(N("172.31.0.0/16"), ipip=True)
HOSTS = [Host("a", "198.18.0.2"), Host("b", "198.18.0.3", as_num=64600), Host("c", "198.18.0.4")]


def put_endpoint(store: MemoryStore, host: str, eid: str, *ips: str) -> None:
    ep = Endpoint(
        eid,
        host,
        "n" * 64,
        f"cali{eid[:11]}",
        f"tmp{eid[:11]}",
        derive_mac(eid),
        tuple(A(ip) for ip in ips),
    )
    store.put(keys.endpoint(host, eid), ep.to_json())


@pytest.fixture
def store() -> MemoryStore:
    store = MemoryStore()
    for host in HOSTS:
        store.put(keys.host_meta(host.name), host.to_json())
    for pool in (ROUTED, VXLAN):
        store.put(keys.pool(pool.cidr), pool.to_json())
    for host, block in [
        ("a", "10.0.1.0/26"),
        ("a", "172.30.0.0/26"),
        ("b", "10.0.2.0/26"),
        ("b", "172.30.1.0/26"),
    ]:
        store.put(keys.affinity(host, block), "")
    put_endpoint(store, "a", "1" * 64, "10.0.1.5", "10.0.9.9")
    put_endpoint(store, "b", "2" * 64, "172.30.5.5")
    return store


# ---- BgpSync -------------------------------------------------------------------------


def test_bird_config_follows_the_snapshot(store, tmp_path):
    bird = FakeBird(log=str(tmp_path / "bird.log"))
    assert BgpSync(bird, "a")(read_snapshot(store)) is False
    conf = bird.config or ""
    assert "router id 198.18.0.2;" in conf
    assert f'log "{tmp_path / "bird.log"}"' in conf
    assert "route 10.0.1.0/26 blackhole;" in conf
    assert "route 10.0.9.9/32 unreachable;" in conf, "borrowed from outside its blocks"
    assert "10.0.1.5/32" not in conf, "inside its own block: the aggregate covers it"
    assert "172.30.0.0/26" not in conf, "an encapsulated pool's block is not BGP's"
    assert "neighbor 198.18.0.3 as 64600;" in conf
    assert "neighbor 198.18.0.4 as 64511;" in conf

    store.put(keys.affinity("a", "10.0.3.0/26"), "")
    store.put(keys.host_meta("d"), Host("d", "198.18.0.5").to_json())
    BgpSync(bird, "a")(read_snapshot(store))
    assert "route 10.0.3.0/26 blackhole;" in (bird.config or "")
    assert "neighbor 198.18.0.5 as 64511;" in (bird.config or "")


def test_mesh_off_leaves_the_configured_peers_only(store):
    store.put(keys.BGP_CONFIG, BgpConfig(node_mesh=False).to_json())
    store.put(keys.global_peer("198.18.0.100"), Peer("198.18.0.100", 64511).to_json())
    store.put(keys.node_peer("a", "198.18.0.101"), Peer("198.18.0.101", 65000).to_json())
    store.put(keys.node_peer("b", "198.18.0.102"), Peer("198.18.0.102", 65000).to_json())
    bird = FakeBird()
    BgpSync(bird, "a")(read_snapshot(store))
    conf = bird.config or ""
    assert "Mesh_" not in conf
    assert "protocol bgp Global_198_18_0_100" in conf
    assert "protocol bgp Node_198_18_0_101" in conf
    assert "198.18.0.102" not in conf, "another host's own peer"


def test_an_unregistered_host_leaves_bird_alone_and_waits(store):
    bird = FakeBird()
    assert BgpSync(bird, "nobody")(read_snapshot(store)) is True
    assert bird.config is None


# ---- EncapSync ------------------------------------------------------------------------


def encap(
    tmp_path, addresses: dict[str, str] | None = None, supported=("vxlan", "ipip")
) -> tuple[EncapSync, FakeTunnels, str]:
    tunnels = FakeTunnels({"eth0": "198.18.0.2"} if addresses is None else addresses, supported)
    problems = str(tmp_path / "problems")
    return EncapSync("a", problems, tunnels), tunnels, problems


def read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def test_vxlan_device_forwarding_entries_and_routes_to_other_hosts(store, tmp_path):
    sync, tunnels, _ = encap(tmp_path)
    assert sync(read_snapshot(store)) is False
    device = tunnels.links[VXLAN_DEVICE]
    assert (device.vni, device.local, device.underlay) == (VXLAN_VNI, "198.18.0.2", "eth0")
    assert device.mac == vtep_mac("a")
    assert device.mtu == 1450
    assert device.routes == {
        ("172.30.1.0/26", "198.18.0.3"),
        ("172.30.5.5/32", "198.18.0.3"),
    }
    assert device.fdb == {(vtep_mac("b"), "198.18.0.3"), (vtep_mac("c"), "198.18.0.4")}
    assert device.neighbours == {"198.18.0.3": vtep_mac("b"), "198.18.0.4": vtep_mac("c")}
    assert tunnels.links[IPIP_DEVICE].routes == set(), "no ipip pool"

    store.delete(keys.host_meta("c"))
    store.delete(keys.affinity("b", "172.30.1.0/26"))
    sync(read_snapshot(store))
    assert device.routes == {("172.30.5.5/32", "198.18.0.3")}
    assert device.fdb == {(vtep_mac("b"), "198.18.0.3")}


def test_the_vxlan_device_goes_when_no_vxlan_pool_is_left(store, tmp_path):
    sync, tunnels, _ = encap(tmp_path)
    sync(read_snapshot(store))
    assert VXLAN_DEVICE in tunnels.links
    store.delete(keys.pool(VXLAN.cidr))
    sync(read_snapshot(store))
    assert VXLAN_DEVICE not in tunnels.links
    assert "eth0" in tunnels.links


def test_ipip_routes_go_through_tunl0(store, tmp_path):
    store.put(keys.pool(IPIP.cidr), IPIP.to_json())
    store.put(keys.affinity("c", "172.31.4.0/26"), "")
    sync, tunnels, _ = encap(tmp_path)
    sync(read_snapshot(store))
    assert tunnels.links[IPIP_DEVICE].routes == {("172.31.4.0/26", "198.18.0.4")}


def test_a_mode_the_kernel_lacks_is_reported_in_the_problems_file(store, tmp_path):
    store.put(keys.pool(IPIP.cidr), IPIP.to_json())
    sync, tunnels, problems = encap(tmp_path, supported=("vxlan",))
    assert sync(read_snapshot(store)) is False
    assert read(problems) == (
        "pool(s) 172.31.0.0/16 use ipip, which this kernel does not have; "
        "their addresses are not routed between hosts\n"
    )
    assert IPIP_DEVICE not in tunnels.links
    assert VXLAN_DEVICE in tunnels.links, "the other pools are still served"

    store.delete(keys.pool(IPIP.cidr))
    sync(read_snapshot(store))
    assert read(problems) == ""


def test_no_interface_with_the_hosts_address_is_a_problem_not_a_failure(store, tmp_path):
    sync, tunnels, problems = encap(tmp_path, addresses={"eth0": "198.18.0.99"})
    assert sync(read_snapshot(store)) is False
    assert read(problems) == "no interface holds this host's address 198.18.0.2\n"
    assert VXLAN_DEVICE not in tunnels.links


def test_an_unregistered_host_programs_nothing_and_waits(store, tmp_path):
    sync, tunnels, problems = encap(tmp_path)
    store.delete(keys.host_meta("a"))
    assert sync(read_snapshot(store)) is True
    assert VXLAN_DEVICE not in tunnels.links
    assert not os.path.exists(problems)
