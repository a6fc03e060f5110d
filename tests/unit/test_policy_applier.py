"""PolicyApplier against the kernel fakes: what ends up in the tables and
sets, first apply, incremental applies, failures and drift repair."""

from __future__ import annotations

import ipaddress

import pytest

from calicnm.errors import DataplaneError
from calicnm.host.ipsets import MAX_ELEMENTS
from calicnm.host.policy_applier import PolicyApplier
from calicnm.model import Pool
from calicnm.policy import Profile, parse_rule_spec
from calicnm.profiles import (
    ALL_POOLS,
    FORWARD,
    FROM_EP,
    INPUT,
    MASQ_POOLS,
    NAT_POSTROUTING,
    TO_EP,
    CompiledPolicy,
    LocalEndpoint,
    compile_policy,
    endpoint_chain,
    profile_chain,
    tag_ipset,
)
from tests.fakes import FakeIpsets, FakeIptables

WEB = Profile.default("web")
DB = Profile.default("db")
EP1 = LocalEndpoint("e1", "cali1", ("10.0.0.1",), ("web",))
EP2 = LocalEndpoint("e2", "cali2", ("10.0.0.2",), ("db",))
NAT_POOL = Pool(ipaddress.IPv4Network("10.0.0.0/16"), nat_outgoing=True)


def compiled(
    endpoints: tuple[LocalEndpoint, ...] = (EP1, EP2),
    profiles: dict[str, Profile | None] | None = None,
    pools: tuple[Pool, ...] = (),
) -> CompiledPolicy:
    profiles = {"web": WEB, "db": DB} if profiles is None else profiles
    members: dict[str, set[str]] = {}
    for ep in endpoints:
        for name in ep.profiles:
            members.setdefault(name, set()).update(ep.ips)
    return compile_policy(profiles, list(endpoints), members, pools)


class Rig:
    def __init__(self) -> None:
        self.iptables = FakeIptables()
        self.ipsets = FakeIpsets(self.iptables)
        self.applier = PolicyApplier(self.iptables, self.ipsets)

    def state(self) -> tuple[str, str, dict[str, set[str]]]:
        sets = {name: self.ipsets.members(name) for name in self.ipsets.sets}
        return self.iptables.save("filter"), self.iptables.save("nat"), sets

    def calicnm_chains(self, table: str = "filter") -> dict[str, list[str]]:
        return {
            name: rules
            for name, rules in self.iptables.chains(table).items()
            if name.startswith("calicnm-")
        }


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_first_apply_writes_every_chain_and_jumps_at_the_top(rig):
    rig.iptables.command("-A FORWARD -j ACCEPT")  # someone else's rule, already there
    want = compiled()
    rig.applier.apply(want)

    assert rig.calicnm_chains() == {name: list(rules) for name, rules in want.chains.items()}
    assert rig.iptables.rules("FORWARD") == [f"-j {FORWARD}", "-j ACCEPT"]
    assert rig.iptables.rules("INPUT") == [f"-j {INPUT}"]
    assert f"-i cali1 -g {endpoint_chain('cali1', 'outbound')}" in rig.iptables.rules(FROM_EP)
    assert rig.ipsets.members(tag_ipset("web")) == {"10.0.0.1"}
    assert rig.ipsets.members(tag_ipset("db")) == {"10.0.0.2"}
    assert set(rig.ipsets.sets) == {tag_ipset("web"), tag_ipset("db")}
    assert rig.calicnm_chains("nat") == {}


def test_a_second_identical_apply_writes_nothing(rig):
    rig.applier.apply(compiled())
    before, commits = rig.state(), rig.iptables.commits
    stats = rig.applier.apply(compiled())
    assert rig.state() == before
    assert rig.iptables.commits == commits
    assert (stats.chains_written, stats.chains_deleted, stats.sets_written) == (0, 0, 0)


def test_a_profile_change_rewrites_only_that_profiles_chain(rig):
    rig.applier.apply(compiled())
    before = rig.iptables.generations()
    rule = parse_rule_spec("allow tcp to ports 80,443".split())
    web = Profile("web", WEB.tags, (*WEB.inbound, rule), WEB.outbound)
    rig.applier.apply(compiled(profiles={"web": web, "db": DB}))

    after = rig.iptables.generations()
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {profile_chain("web", "inbound")}
    assert any("--dports 80,443" in r for r in rig.iptables.rules(profile_chain("web", "inbound")))


def test_a_removed_endpoint_takes_its_chains_profile_chains_and_sets_with_it(rig):
    rig.applier.apply(compiled())
    rig.applier.apply(compiled(endpoints=(EP1,)))

    chains = rig.calicnm_chains()
    assert chains == {
        name: list(rules) for name, rules in compiled(endpoints=(EP1,)).chains.items()
    }
    assert endpoint_chain("cali2", "inbound") not in chains
    assert profile_chain("db", "inbound") not in chains
    assert not any("cali2" in rule for rules in chains.values() for rule in rules)
    assert set(rig.ipsets.sets) == {tag_ipset("web")}


def test_nat_chain_and_postrouting_jump_follow_nat_outgoing_pools(rig):
    rig.applier.apply(compiled(pools=(NAT_POOL,)))
    assert rig.iptables.rules("POSTROUTING", "nat") == [f"-j {NAT_POSTROUTING}"]
    assert rig.calicnm_chains("nat") == {
        NAT_POSTROUTING: [
            "-d 169.254.0.0/16 -j RETURN",
            "-d 127.0.0.0/8 -j RETURN",
            f"-m set --match-set {MASQ_POOLS} src -m set ! --match-set {ALL_POOLS} dst "
            "-j MASQUERADE",
        ]
    }
    assert rig.ipsets.members(ALL_POOLS) == {"10.0.0.0/16"}
    assert rig.ipsets.members(MASQ_POOLS) == {"10.0.0.0/16"}

    rig.applier.apply(compiled(pools=(Pool(NAT_POOL.cidr),)))
    assert rig.iptables.rules("POSTROUTING", "nat") == []
    assert rig.calicnm_chains("nat") == {}
    assert ALL_POOLS not in rig.ipsets.sets
    assert MASQ_POOLS not in rig.ipsets.sets


def test_a_host_without_a_nat_table_is_fine_until_nat_is_wanted():
    iptables = FakeIptables(tables=("filter",))
    applier = PolicyApplier(iptables, FakeIpsets(iptables))
    applier.apply(compiled(), full=True)
    assert iptables.rules("FORWARD") == [f"-j {FORWARD}"]
    with pytest.raises(DataplaneError):
        applier.apply(compiled(pools=(NAT_POOL,)))


def test_a_failing_restore_changes_no_chain_and_makes_the_next_apply_full(rig):
    rig.applier.apply(compiled())
    tables = rig.iptables.save("filter"), rig.iptables.save("nat")
    rig.iptables.fail_next_restore = True
    with pytest.raises(DataplaneError):
        rig.applier.apply(compiled(endpoints=(EP1,)))
    assert (rig.iptables.save("filter"), rig.iptables.save("nat")) == tables

    # Drift meanwhile: an incremental apply would not see it; the next one
    # is a full one and repairs it.
    rig.iptables.command(f"-F {TO_EP}")
    rig.applier.apply(compiled())
    assert rig.iptables.rules(TO_EP) == list(compiled().chains[TO_EP])


def test_a_failing_ipset_restore_writes_no_chain_and_makes_the_next_apply_full(rig):
    rig.applier.apply(compiled())
    before = rig.state()
    rig.ipsets.fail_next_restore = True
    with pytest.raises(DataplaneError):
        rig.applier.apply(
            compiled(endpoints=(EP1, EP2, LocalEndpoint("e3", "cali3", ("10.0.0.3",), ("web",))))
        )
    assert rig.state() == before
    rig.ipsets.restore(f"flush {tag_ipset('db')}\n")
    rig.applier.apply(compiled())
    assert rig.ipsets.members(tag_ipset("db")) == {"10.0.0.2"}


@pytest.mark.parametrize("chain", [FROM_EP, profile_chain("web", "inbound")])
def test_a_chain_flushed_from_outside_is_repaired_by_a_full_apply(rig, chain):
    rig.applier.apply(compiled())
    rig.iptables.command(f"-F {chain}")
    rig.applier.apply(compiled(), full=True)
    assert rig.iptables.rules(chain) == list(compiled().chains[chain])


@pytest.mark.parametrize("chain", [INPUT, endpoint_chain("cali1", "outbound")])
def test_a_chain_deleted_from_outside_is_repaired_by_a_full_apply(rig, chain):
    rig.applier.apply(compiled())
    rig.iptables.delete_chain(chain)
    rig.applier.apply(compiled(), full=True)
    assert rig.calicnm_chains() == {n: list(r) for n, r in compiled().chains.items()}
    assert rig.iptables.rules("INPUT") == [f"-j {INPUT}"]


def test_an_emptied_ipset_and_a_leftover_one_are_repaired_by_a_full_apply(rig):
    rig.applier.apply(compiled())
    # A temporary set left by a crash mid-replace, as calicnm creates them.
    leftover = f"create calicnm-x-web hash:ip family inet maxelem {MAX_ELEMENTS}"
    rig.ipsets.restore(f"flush {tag_ipset('web')}\n{leftover}\n")
    rig.applier.apply(compiled(), full=True)
    assert rig.ipsets.members(tag_ipset("web")) == {"10.0.0.1"}
    assert set(rig.ipsets.sets) == {tag_ipset("web"), tag_ipset("db")}


def test_a_duplicated_jump_is_reduced_to_one(rig):
    rig.applier.apply(compiled())
    rig.iptables.command(f"-A FORWARD -j {FORWARD}")
    rig.iptables.command(f"-I INPUT 1 -j {INPUT}")
    rig.applier.apply(compiled(), full=True)
    assert rig.iptables.rules("FORWARD") == [f"-j {FORWARD}"]
    assert rig.iptables.rules("INPUT") == [f"-j {INPUT}"]


def test_a_jump_deleted_from_outside_comes_back_and_foreign_rules_stay(rig):
    rig.applier.apply(compiled())
    rig.iptables.command("-N DOCKER-USER")
    rig.iptables.command("-I FORWARD 1 -j DOCKER-USER")
    rig.iptables.command(f"-D FORWARD -j {FORWARD}")
    rig.applier.apply(compiled(), full=True)
    assert rig.iptables.rules("FORWARD") == [f"-j {FORWARD}", "-j DOCKER-USER"]
    assert rig.iptables.rules("DOCKER-USER") == [f"-j {FORWARD}"]


def test_a_full_apply_removes_calicnm_chains_this_process_never_wrote(rig):
    rig.iptables.restore(
        f"*filter\n:calicnm-from-old - [0:0]\n:{FROM_EP} - [0:0]\n"
        f"-A {FROM_EP} -i caliold -g calicnm-from-old\nCOMMIT\n"
    )
    rig.applier.apply(compiled(), full=True)
    assert "calicnm-from-old" not in rig.iptables.chains()
    assert rig.iptables.rules(FROM_EP) == list(compiled().chains[FROM_EP])


def test_a_rule_inserted_above_the_jump_moves_the_jump_back_to_the_top(rig):
    rig.applier.apply(compiled())
    assert rig.applier.jumps_in_place()
    rig.iptables.command("-N DOCKER-USER")
    rig.iptables.command("-A DOCKER-USER -j RETURN")
    rig.iptables.command("-I FORWARD 1 -j DOCKER-USER")  # what dockerd does at start
    assert not rig.applier.jumps_in_place()
    rig.applier.apply(compiled(), full=True)
    assert rig.iptables.rules("FORWARD") == [f"-j {FORWARD}", "-j DOCKER-USER"]
    assert rig.iptables.rules("DOCKER-USER") == [f"-j {FORWARD}", "-j RETURN"]
    assert rig.applier.jumps_in_place()


def test_an_outside_flush_is_noticed_by_the_cheap_check(rig):
    rig.applier.apply(compiled())
    rig.iptables.command("-F FORWARD")
    assert not rig.applier.jumps_in_place()
    rig.applier.apply(compiled(), full=True)
    rig.iptables.command(f"-F {FORWARD}")
    assert not rig.applier.jumps_in_place()
    rig.applier.apply(compiled(), full=True)
    assert rig.applier.jumps_in_place()


def test_a_full_apply_of_an_unchanged_kernel_writes_nothing(rig):
    rig.applier.apply(compiled(), full=True)
    before, commits = rig.state(), rig.iptables.commits
    stats = rig.applier.apply(compiled(), full=True)
    assert rig.state() == before
    assert rig.iptables.commits == commits
    assert (stats.chains_written, stats.chains_deleted, stats.sets_written) == (0, 0, 0)


def test_a_rule_edited_from_outside_is_repaired_by_a_full_apply_and_only_its_chain(rig):
    rig.applier.apply(compiled(), full=True)
    chain = profile_chain("web", "inbound")
    first = rig.iptables.rules(chain)[0]
    rig.iptables.command(f"-D {chain} {first}")
    rig.iptables.command(f"-A {chain} {first}")  # same rules, another order
    stats = rig.applier.apply(compiled(), full=True)
    assert rig.iptables.rules(chain) == list(compiled().chains[chain])
    assert stats.chains_written == 1


def test_an_ipset_member_changed_from_outside_is_repaired_by_a_full_apply(rig):
    rig.applier.apply(compiled(), full=True)
    rig.ipsets.restore(f"add {tag_ipset('web')} 10.9.9.9\ndel {tag_ipset('db')} 10.0.0.2\n")
    stats = rig.applier.apply(compiled(), full=True)
    assert rig.ipsets.members(tag_ipset("web")) == {"10.0.0.1"}
    assert rig.ipsets.members(tag_ipset("db")) == {"10.0.0.2"}
    assert stats.sets_written == 2
