"""A full apply against the real iptables and ipset of a throwaway namespace:
it compares the kernel in its own spelling, so an unchanged kernel costs no
write, and a chain or set changed by hand is rewritten (and nothing else)."""

from __future__ import annotations

import ipaddress
import subprocess

import pytest

from calicnm.host.ipsets import Ipsets
from calicnm.host.iptables import Iptables
from calicnm.host.policy_applier import PolicyApplier
from calicnm.model import Pool
from calicnm.policy import Profile, parse_rule_spec
from calicnm.profiles import LocalEndpoint, compile_policy, profile_chain, tag_ipset

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
