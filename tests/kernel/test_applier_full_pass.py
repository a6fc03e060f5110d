"""A full apply against the real iptables and ipset of a throwaway namespace:
it compares the kernel in its own spelling, so an unchanged kernel costs no
write, and a chain or set changed by hand is rewritten (and nothing else)."""

from __future__ import annotations

import ipaddress
import subprocess

import pytest

from calicnm.host.ipsets import Ipsets
from calicnm.host.iptables import Iptables, detect_backend
from calicnm.host.policy_applier import PolicyApplier
from calicnm.model import Pool
from calicnm.policy import Profile, parse_rule_spec
from calicnm.profiles import (
    OUTPUT,
    RAW_OUTPUT,
    RAW_PREROUTING,
    HostFacts,
    LocalEndpoint,
    compile_policy,
    profile_chain,
    tag_ipset,
)

pytestmark = pytest.mark.kernel

RULE = parse_rule_spec("allow tcp from tag db to ports 80,443".split())
WEB = Profile("web", ("web",), (RULE, *Profile.default("web").inbound), ())
ENDPOINTS = [
    LocalEndpoint("e1", "cali1", ("10.0.0.1",), ("web",)),
    LocalEndpoint("e2", "cali2", ("10.0.0.2",), ("db",), internal=True),
]
POOL = Pool(ipaddress.IPv4Network("10.0.0.0/16"), nat_outgoing=True)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def desired():
    members = {"web": {"10.0.0.1"}, "db": {"10.0.0.2"}}
    profiles = {"web": WEB, "db": Profile.default("db")}
    return compile_policy(profiles, ENDPOINTS, members, [POOL])


def test_full_apply_rewrites_only_what_differs_in_the_kernel(netns):
    applier = PolicyApplier(Iptables(), Ipsets())
    first = applier.apply(desired(), full=True)
    assert first.chains_written > 5 and first.sets_written == 4

    again = applier.apply(desired(), full=True)
    assert (again.chains_written, again.chains_deleted, again.sets_written) == (0, 0, 0)

    chain = profile_chain("web", "inbound")
    sh("iptables", "-w", "-D", chain, "1")
    sh("ipset", "del", tag_ipset("db"), "10.0.0.2")
    repaired = applier.apply(desired(), full=True)
    assert (repaired.chains_written, repaired.sets_written) == (1, 1)
    assert "10.0.0.2" in sh("ipset", "list", tag_ipset("db"))
    assert "--dports 80,443" in sh("iptables", "-w", "-S", chain)

    fresh = PolicyApplier(Iptables(), Ipsets())  # a restarted agent: no spelling known
    restarted = fresh.apply(desired(), full=True)
    assert restarted.sets_written == 0
    assert fresh.apply(desired(), full=True).chains_written == 0


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_vxlan_tunnel_is_untracked_while_a_pool_is_vxlan_and_only_then(netns, backend):
    """The raw table holds calicnm's NOTRACK of tunnel packets between registered hosts
    (and the filter table their accepts) while a VXLAN pool exists; a full pass leaves it
    alone; once no pool is VXLAN, the chains and their jumps are gone."""
    iptables = Iptables(detect_backend(backend))
    applier = PolicyApplier(iptables, Ipsets())
    facts = HostFacts(vxlan=True, peer_hosts=frozenset({"198.18.0.3"}))
    profiles = {"web": WEB, "db": Profile.default("db")}
    with_tunnel = compile_policy(profiles, ENDPOINTS, {}, [POOL], facts)
    applier.apply(with_tunnel, full=True)
    raw = iptables.save("raw")
    assert f"-A PREROUTING -j {RAW_PREROUTING}" in raw
    assert f"-A OUTPUT -j {RAW_OUTPUT}" in raw
    assert "-j CT --notrack" in raw
    assert f"-A OUTPUT -j {OUTPUT}" in iptables.save("filter")
    assert applier.apply(with_tunnel, full=True).chains_written == 0
    assert applier.jumps_in_place()

    without = compile_policy(profiles, ENDPOINTS, {}, [POOL])
    applier.apply(without, full=True)
    assert "calicnm" not in iptables.save("raw")
    assert OUTPUT not in iptables.save("filter")
    assert applier.jumps_in_place()
