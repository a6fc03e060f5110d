"""Veth, route, neighbour and sysctl plumbing against the real kernel."""

from __future__ import annotations

import ipaddress
import subprocess

import pytest

from calicnm.endpoint import LinkPlan, plan_link
from calicnm.errors import DataplaneError
from calicnm.host.netlink import HostPlumbing, host_addresses
from calicnm.host.sysctl import read_sysctl

pytestmark = pytest.mark.kernel

EID = "629601b5fa245ddf93ea239eb288111b92d6781bedeebcb340ccdf43a081ea34"
IP = ipaddress.IPv4Address("10.65.0.7")


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def test_create_wires_the_host_side(netns):
    plumbing = HostPlumbing()
    plan = plan_link(EID, "ee:01:02:03:04:05", (IP,))
    plumbing.create(plan)
    assert sh("ip", "-4", "route", "show", "10.65.0.7") == "", "routes are the agent's"
    assert plumbing.ensure_routes("cali629601b5fa2", ("10.65.0.7",), "ee:01:02:03:04:05")
    sh("ip", "route", "del", "10.65.0.7/32")
    assert plumbing.ensure_routes("cali629601b5fa2", ("10.65.0.7",), "ee:01:02:03:04:05")

    host_if = sh("ip", "-o", "link", "show", "cali629601b5fa2")
    assert "state UP" in host_if or "UP" in host_if.split(">")[0]
    peer = sh("ip", "-o", "link", "show", "tmp629601b5fa2")
    assert "ee:01:02:03:04:05" in peer
    assert read_sysctl("net/ipv4/conf/cali629601b5fa2/proxy_arp") == "1"
    assert read_sysctl("net/ipv4/neigh/cali629601b5fa2/proxy_delay") == "0"
    assert read_sysctl("net/ipv4/conf/cali629601b5fa2/rp_filter") == "1"
    route = sh("ip", "-4", "route", "show", "10.65.0.7")
    assert "dev cali629601b5fa2" in route and "scope link" in route
    neigh = sh("ip", "neigh", "show", "10.65.0.7")
    assert "ee:01:02:03:04:05" in neigh and "PERMANENT" in neigh
    assert plumbing.routes_to("cali629601b5fa2") == ["10.65.0.7/32"]

    assert plumbing.remove("cali629601b5fa2", "tmp629601b5fa2")
    assert plumbing.links_with_prefix("cali", "tmp") == []
    assert sh("ip", "-4", "route", "show", "10.65.0.7") == ""
    assert plumbing.remove("cali629601b5fa2", "tmp629601b5fa2") is False
    assert not plumbing.ensure_routes("cali629601b5fa2", ("10.65.0.7",), "ee:01:02:03:04:05")


def test_create_replaces_a_stale_pair(netns):
    sh("ip", "link", "add", "cali629601b5fa2", "type", "veth", "peer", "name", "stale0")
    plumbing = HostPlumbing()
    plumbing.create(plan_link(EID, "ee:01:02:03:04:05", (IP,)))
    assert plumbing.links_with_prefix("cali", "tmp", "stale") == [
        "cali629601b5fa2",
        "tmp629601b5fa2",
    ]


def test_remove_finds_the_peer_after_docker_moved_it_back(netns):
    plumbing = HostPlumbing()
    plumbing.create(plan_link(EID, "ee:01:02:03:04:05", (IP,)))
    sh("ip", "link", "del", "cali629601b5fa2")
    assert plumbing.remove("cali629601b5fa2", "tmp629601b5fa2") is False
    assert plumbing.links_with_prefix("cali", "tmp") == []


def test_failed_create_leaves_nothing(netns):
    plumbing = HostPlumbing()
    bad = LinkPlan("cali_ok", "tmp-name-far-too-long", "ee:01:02:03:04:05", (IP,))
    with pytest.raises(DataplaneError, match="cannot create veth"):
        plumbing.create(bad)
    assert plumbing.links_with_prefix("cali", "tmp") == []
    bad_mtu = LinkPlan("calimtu", "tmpmtu", "ee:01:02:03:04:05", (IP,), mtu=70000)
    with pytest.raises(DataplaneError):
        plumbing.create(bad_mtu)
    assert plumbing.links_with_prefix("cali", "tmp") == []


def test_host_addresses_lists_global_ipv4(netns):
    sh("ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1")
    sh("ip", "addr", "add", "198.18.7.2/24", "dev", "up0")
    assert ("up0", "198.18.7.2") in host_addresses()
