"""The agent against a real etcd and a throwaway network namespace.

The namespace stands in for the host: real veths, real iptables (the
host's backend) and real ipsets.  Endpoint records are written to etcd the
way the plugin writes them.
"""

from __future__ import annotations

import ipaddress
import subprocess

import pytest

from calicnm.endpoint import derive_mac, plan_link
from calicnm.host.ipsets import Ipsets
from calicnm.host.iptables import Iptables
from calicnm.host.markers import Markers
from calicnm.host.netlink import HostPlumbing
from calicnm.host.policy_applier import PolicyApplier
from calicnm.model import Endpoint, Network
from calicnm.node.agent import Agent
from calicnm.policy import Profile, parse_rule_spec
from calicnm.store import keys

pytestmark = [pytest.mark.kernel, pytest.mark.etcd]

NET = "a" * 64
EP1 = "1" * 64
EP2 = "2" * 64
EP_REMOTE = "3" * 64


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True).stdout


def chain(name: str) -> list[str]:
    return sh("iptables", "-w", "-S", name).splitlines()[1:]


def ipset_members(name: str) -> set[str]:
    out = sh("ipset", "list", name)
    return set(out.split("Members:\n", 1)[1].split())


def add_endpoint(store, plumbing, eid, ip, host="h1", profiles=None, veth=True):
    plan = plan_link(eid, derive_mac(eid), (ipaddress.IPv4Address(ip),))
    if veth:
        plumbing.create(plan)
    ep = Endpoint(
        eid,
        host,
        NET,
        plan.host_if,
        plan.peer_if,
        plan.mac,
        (ipaddress.IPv4Address(ip),),
        profiles=profiles,
    )
    store.put(keys.endpoint(host, eid), ep.to_json())
    return ep


@pytest.fixture
def rig(etcd_store, netns, tmp_path):
    # etcd_store first: its connection is made from the host namespace.
    store = etcd_store
    store.put(keys.network(NET), Network(NET, docker_name="dataman").to_json())
    store.put(keys.profile("dataman"), Profile.default("dataman").to_json())
    plumbing = HostPlumbing()
    agent = Agent(
        store,
        "h1",
        PolicyApplier(Iptables(), Ipsets()),
        plumbing,
        Markers(str(tmp_path / "programmed")),
    )
    return store, plumbing, agent, tmp_path


def test_converges_routes_chains_sets_and_markers(rig):
    store, plumbing, agent, tmp = rig
    ep1 = add_endpoint(store, plumbing, EP1, "10.0.0.1")
    add_endpoint(store, plumbing, EP2, "10.0.0.2")
    add_endpoint(store, plumbing, EP_REMOTE, "10.0.1.7", host="h2", veth=False)
    assert agent.reconcile(full=True) is False

    assert "10.0.0.1 dev cali11111111111 proto static scope link" in sh("ip", "route")
    assert ipset_members("calicnm-t-dataman") == {"10.0.0.1", "10.0.0.2", "10.0.1.7"}
    forward = sh("iptables", "-w", "-S", "FORWARD").splitlines()
    assert forward.count("-A FORWARD -j calicnm-FORWARD") == 1
    assert "-A calicnm-FROM-EP -i cali11111111111 -g calicnm-from-11111111111" in chain(
        "calicnm-FROM-EP"
    )
    assert chain("calicnm-FROM-EP")[-1] == "-A calicnm-FROM-EP -j DROP"
    assert sorted((tmp / "programmed").iterdir()) == sorted(
        [tmp / "programmed" / EP1, tmp / "programmed" / EP2]
    )

    # A rule change rewrites the profile chain only, in place.
    profile = Profile.default("dataman")
    rule = parse_rule_spec("allow tcp to ports 80,443".split())
    store.put(
        keys.profile("dataman"),
        Profile("dataman", profile.tags, (*profile.inbound, rule), profile.outbound).to_json(),
    )
    agent.reconcile()
    assert any("--dports 80,443" in r for r in chain("calicnm-pi-dataman"))

    # Membership follows profiles: EP2 given another profile leaves the tag.
    store.put(keys.profile("WEB"), Profile.default("WEB").to_json())
    add_endpoint(store, plumbing, EP2, "10.0.0.2", profiles=("WEB",), veth=False)
    agent.reconcile()
    assert ipset_members("calicnm-t-dataman") == {"10.0.0.1", "10.0.1.7"}
    assert ipset_members("calicnm-t-WEB") == {"10.0.0.2"}

    # An endpoint removed: its chains, marker and (with the veth) route go.
    plumbing.remove(ep1.interface, ep1.peer)
    store.delete(keys.endpoint("h1", EP1))
    agent.reconcile()
    assert "calicnm-from-11111111111" not in sh("iptables", "-w", "-S")
    assert not (tmp / "programmed" / EP1).exists()


def test_full_resync_repairs_drift(rig):
    store, plumbing, agent, _tmp = rig
    add_endpoint(store, plumbing, EP1, "10.0.0.1")
    agent.reconcile(full=True)
    sh("iptables", "-w", "-D", "FORWARD", "-j", "calicnm-FORWARD")
    sh("iptables", "-w", "-F", "calicnm-pi-dataman")
    sh("ipset", "flush", "calicnm-t-dataman")
    sh("ip", "route", "del", "10.0.0.1/32")
    sh("iptables", "-w", "-N", "calicnm-stale")
    agent.reconcile(full=True)
    assert sh("iptables", "-w", "-S", "FORWARD").count("-j calicnm-FORWARD") == 1
    assert chain("calicnm-pi-dataman")
    assert ipset_members("calicnm-t-dataman") == {"10.0.0.1"}
    assert "10.0.0.1 dev cali11111111111" in sh("ip", "route")
    assert "calicnm-stale" not in sh("iptables", "-w", "-S")


def test_a_restarted_agent_converges_without_duplicates(rig):
    store, plumbing, agent, tmp = rig
    add_endpoint(store, plumbing, EP1, "10.0.0.1")
    agent.reconcile(full=True)
    before = sh("iptables-save", "-t", "filter")
    fresh = Agent(
        store,
        "h1",
        PolicyApplier(Iptables(), Ipsets()),
        plumbing,
        Markers(str(tmp / "programmed")),
    )
    fresh.reconcile(full=True)
    fresh.reconcile(full=True)
    after = sh("iptables-save", "-t", "filter")
    strip = lambda text: [ln for ln in text.splitlines() if not ln.startswith("#")]  # noqa: E731
    assert strip(after) == strip(before)


def test_etcd_down_keeps_the_last_good_state(rig, etcd_server):
    store, plumbing, agent, _tmp = rig
    add_endpoint(store, plumbing, EP1, "10.0.0.1")
    agent.reconcile(full=True)
    before = sh("iptables-save", "-t", "filter")
    etcd_server.proc.send_signal(19)  # SIGSTOP
    try:
        from calicnm.errors import DatastoreUnavailable

        with pytest.raises(DatastoreUnavailable):
            agent.reconcile(full=True)
    finally:
        etcd_server.proc.send_signal(18)  # SIGCONT
    assert sh("iptables-save", "-t", "filter").splitlines()[1:-1] == before.splitlines()[1:-1]


def test_unreadable_profile_drops_but_others_are_served(rig):
    store, plumbing, agent, _tmp = rig
    add_endpoint(store, plumbing, EP1, "10.0.0.1")
    store.put(keys.profile("WEB"), "{not json")
    add_endpoint(store, plumbing, EP2, "10.0.0.2", profiles=("WEB",))
    agent.reconcile(full=True)
    assert chain("calicnm-pi-WEB")[0].endswith("-j DROP")
    assert any("match-set calicnm-t-dataman" in r for r in chain("calicnm-pi-dataman"))
