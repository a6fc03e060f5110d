"""BIRD configuration and tunnel route planning, as pure functions."""

from __future__ import annotations

import ipaddress

import pytest

from calicnm.errors import InvalidRequest
from calicnm.model import BgpConfig, Endpoint, Host, Peer, Pool
from calicnm.routing import encap
from calicnm.routing.bgp import BirdInput, parse_protocols, render_bird, render_route_reflector

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
HOSTS = [Host("a", "198.18.0.2"), Host("b", "198.18.0.3", as_num=64600), Host("c", "198.18.0.4")]
POOLS = [Pool(N("10.0.0.0/16")), Pool(N("172.30.0.0/16"), vxlan=True)]


def bird(**kw):
    data = {
        "me": HOSTS[0],
        "hosts": HOSTS,
        "config": BgpConfig(),
        "pools": POOLS,
        "blocks": [N("10.0.1.0/26")],
        **kw,
    }
    return render_bird(BirdInput(**data))


def test_mesh_peers_everyone_else_with_their_as():
    conf = bird()
    assert "router id 198.18.0.2;" in conf
    assert "local 198.18.0.2 as 64511;" in conf
    assert (
        "protocol bgp Mesh_198_18_0_3 from calicnm_peer {\n  neighbor 198.18.0.3 as 64600;" in conf
    )
    assert "neighbor 198.18.0.4 as 64511;" in conf
    assert "198.18.0.2 as" not in conf.split("template bgp")[1].split("}")[-1]


def test_blocks_are_aggregated_and_blackholed_borrowed_addresses_exported():
    conf = bird(borrowed=[A("10.0.9.9")])
    assert "if net = 10.0.1.0/26 then accept;\n  if net ~ 10.0.1.0/26 then reject;" in conf
    assert "route 10.0.1.0/26 blackhole;" in conf
    assert "route 10.0.9.9/32 unreachable;" in conf
    assert "if net ~ 10.0.0.0/16 then accept;" in conf
    assert "172.30.0.0/16" not in conf, "an encapsulated pool is not carried by BGP"


def test_mesh_off_leaves_only_configured_peers():
    conf = bird(
        config=BgpConfig(node_mesh=False),
        global_peers=[Peer("198.18.0.100", 64511)],
        node_peers=[Peer("198.18.0.101", 65000)],
    )
    assert "Mesh_" not in conf
    assert "protocol bgp Global_198_18_0_100" in conf
    assert (
        "protocol bgp Node_198_18_0_101 from calicnm_peer {\n  neighbor 198.18.0.101 as 65000;"
        in conf
    )


def test_a_host_without_an_address_cannot_speak_bgp():
    with pytest.raises(InvalidRequest):
        render_bird(BirdInput(me=Host("x", None), hosts=[], config=BgpConfig()))


def test_route_reflector_has_every_host_as_client():
    conf = render_route_reflector("198.18.0.100", 64511, "1.0.0.1", HOSTS, BgpConfig(), POOLS)
    assert conf.count("rr client;") == 1 and conf.count("from calicnm_client") == 3
    assert "neighbor 198.18.0.3 as 64600;" in conf and "rr cluster id 1.0.0.1;" in conf


def test_status_rows_from_birdc():
    text = """BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     19:01:59.432
Mesh_198_18_0_3 BGP        ---        up     19:02:04.248  Established
Global_198_18_0_100 BGP    ---        start  19:02:04.248  Active        Socket: Connection refused
"""
    rows = parse_protocols(text)
    assert rows[0] == {
        "peer": "198.18.0.3",
        "type": "node-to-node mesh",
        "state": "up",
        "since": "19:02:04.248",
        "info": "Established",
    }
    assert rows[1]["type"] == "global" and rows[1]["info"].startswith("Active")


def test_peer_validation():
    assert Peer.parse("198.18.0.9", "65000") == Peer("198.18.0.9", 65000)
    for ip, as_num in [("nope", "1"), ("198.18.0.9", "0"), ("198.18.0.9", "x")]:
        with pytest.raises(InvalidRequest):
            Peer.parse(ip, as_num)


def ep(host, ip):
    return Endpoint("e" * 64, host, "n" * 64, "cali", "tmp", "ee:00:00:00:00:01", (A(ip),))


@pytest.mark.parametrize(
    ("mode", "device", "pool"),
    [
        ("vxlan", "vxlan.calicnm", Pool(N("172.30.0.0/16"), vxlan=True)),
        ("ipip", "tunl0", Pool(N("172.30.0.0/16"), ipip=True)),
    ],
)
def test_tunnel_routes_reach_other_hosts_blocks_and_borrowed_addresses(mode, device, pool):
    affinity = {
        "a": [N("172.30.0.0/26")],
        "b": [N("172.30.0.64/26"), N("10.0.0.0/26")],
        "c": [N("172.30.0.128/26")],
    }
    endpoints = [ep("b", "172.30.0.70"), ep("c", "172.30.0.5"), ep("a", "172.30.0.9")]
    routes = encap.tunnel_routes(
        mode, "a", HOSTS, [pool, Pool(N("10.0.0.0/16"))], affinity, endpoints
    )
    assert routes == [
        encap.TunnelRoute(N("172.30.0.5/32"), "198.18.0.4", device),
        encap.TunnelRoute(N("172.30.0.64/26"), "198.18.0.3", device),
        encap.TunnelRoute(N("172.30.0.128/26"), "198.18.0.4", device),
    ]
    assert (
        encap.tunnel_routes(
            "ipip" if mode == "vxlan" else "vxlan", "a", HOSTS, [pool], affinity, endpoints
        )
        == []
    )


def test_vteps_and_overheads():
    peers = encap.vtep_peers("a", HOSTS)
    assert [p.ip for p in peers] == ["198.18.0.3", "198.18.0.4"]
    assert peers[0].mac == encap.vtep_mac("b") != encap.vtep_mac("c")
    assert int(peers[0].mac[:2], 16) & 3 == 2
    assert encap.overhead(Pool(N("10.0.0.0/16"), vxlan=True)) == 50
    assert encap.overhead(Pool(N("10.0.0.0/16"), ipip=True)) == 20
    assert encap.overhead(Pool(N("10.0.0.0/16"))) == 0
