"""Golden tables for nat-outgoing: pools -> nat chain, POSTROUTING jump and pool ipsets."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest

from calicnm import profiles as p
from calicnm.cli import main as cli
from calicnm.model import Pool
from calicnm.policy import Profile

MASQ = (
    "-d 169.254.0.0/16 -j RETURN",
    "-d 127.0.0.0/8 -j RETURN",
    "-m set --match-set calicnm-masq-pools src -m set ! --match-set calicnm-all-pools dst "
    "-j MASQUERADE",
)
EP = p.LocalEndpoint("e1" * 32, "calie1e1e1e1e1e", ("10.0.0.2",), ("dataman",))


def pool(cidr: str, nat: bool = False, **kw: bool) -> Pool:
    return Pool(ipaddress.IPv4Network(cidr), nat_outgoing=nat, **kw)


def compile_with(*pools: Pool) -> p.CompiledPolicy:
    return p.compile_policy({"dataman": Profile.default("dataman")}, [EP], {}, pools)


def test_one_nat_pool_full_nat_table_and_sets():
    dp = compile_with(pool("192.168.0.0/16", nat=True))
    assert dp.nat_chains == {"calicnm-POSTROUTING": MASQ}
    assert dp.ipsets == {
        "calicnm-t-dataman": frozenset(),
        "calicnm-all-pools": frozenset({"192.168.0.0/16"}),
        "calicnm-masq-pools": frozenset({"192.168.0.0/16"}),
    }
    assert dp.ipset_types == {
        "calicnm-t-dataman": "hash:ip",
        "calicnm-all-pools": "hash:net",
        "calicnm-masq-pools": "hash:net",
    }
    assert dp.tables() == {"filter": dp.chains, "nat": dp.nat_chains, "raw": {}}
    assert p.TABLE_JUMPS["nat"] == (("POSTROUTING", "calicnm-POSTROUTING"),)
    assert p.TABLE_JUMPS["filter"] == p.JUMPS


def test_several_pools_all_count_only_nat_ones_masquerade():
    dp = compile_with(
        pool("10.0.0.0/16", nat=True),
        pool("10.1.0.0/24"),
        pool("10.2.0.0/26", nat=True, disabled=True),
        pool("172.16.0.0/12"),
    )
    assert dp.ipsets["calicnm-all-pools"] == {
        "10.0.0.0/16",
        "10.1.0.0/24",
        "10.2.0.0/26",
        "172.16.0.0/12",
    }
    assert dp.ipsets["calicnm-masq-pools"] == {"10.0.0.0/16", "10.2.0.0/26"}
    assert dp.nat_chains == {"calicnm-POSTROUTING": MASQ}


@pytest.mark.parametrize(
    "pools",
    [(), (pool("10.0.0.0/16"),), (pool("10.0.0.0/16"), pool("10.1.0.0/16", disabled=True))],
    ids=["no pools", "one plain pool", "two plain pools"],
)
def test_without_nat_pools_no_nat_chain_jump_or_pool_sets(pools):
    dp = compile_with(*pools)
    assert dp.nat_chains == {}
    assert set(dp.ipsets) == {"calicnm-t-dataman"}
    assert dp.ipset_type("calicnm-t-dataman") == "hash:ip"
    assert dp == compile_with()  # the filter table does not depend on pools


def test_filter_table_is_the_same_with_or_without_nat():
    assert compile_with(pool("10.0.0.0/16", nat=True)).chains == compile_with().chains


def test_nat_without_endpoints_still_masquerades():
    # Another host's containers are none of our business, but a host with
    # no local endpoint yet still gets the (cheap) nat rule: it is per pool.
    dp = p.compile_policy({}, [], {}, [pool("10.0.0.0/16", nat=True)])
    assert dp.nat_chains == {"calicnm-POSTROUTING": MASQ}
    assert set(dp.ipsets) == {"calicnm-all-pools", "calicnm-masq-pools"}


def test_a_slash_zero_pool_is_written_as_two_halves():
    # hash:net refuses a zero prefix length.
    dp = compile_with(pool("0.0.0.0/0", nat=True))
    assert dp.ipsets["calicnm-all-pools"] == {"0.0.0.0/1", "128.0.0.0/1"}


def test_pool_set_names_fit_and_swap_partners_are_distinct():
    names = [p.ALL_POOLS, p.MASQ_POOLS, p.tag_ipset("dataman"), p.tag_ipset("all-pools")]
    temps = [p.temp_ipset(n) for n in names]
    assert p.temp_ipset(p.ALL_POOLS) == "calicnm-ALL-POOLS"
    assert p.temp_ipset(p.MASQ_POOLS) == "calicnm-MASQ-POOLS"
    assert p.temp_ipset("calicnm-t-dataman") == "calicnm-x-dataman"  # unchanged
    for name, temp in zip(names, temps, strict=True):
        assert len(name) <= p.MAX_IPSET and len(temp) == len(name) and temp.startswith(p.PREFIX)
    assert len(set(names) | set(temps)) == 2 * len(names)


def test_rule_count_includes_the_nat_table():
    with_nat = compile_with(pool("10.0.0.0/16", nat=True)).rule_count()
    assert with_nat == compile_with().rule_count() + len(MASQ)


class _Ipam:
    def __init__(self) -> None:
        self.added: list[Pool] = []

    def add_pool(self, new: Pool) -> None:
        self.added.append(new)


@pytest.mark.parametrize(("flag", "nat"), [([], False), (["--nat-outgoing"], True)])
def test_pool_add_nat_outgoing_flag(flag, nat, capsys):
    args = cli.build_parser().parse_args(["pool", "add", "10.9.0.0/24", "10.8.0.0/24", *flag])
    ipam = _Ipam()
    assert args.fn(SimpleNamespace(args=args, ipam=ipam)) == 0
    assert [(str(x.cidr), x.nat_outgoing, x.disabled) for x in ipam.added] == [
        ("10.9.0.0/24", nat, False),
        ("10.8.0.0/24", nat, False),
    ]
    assert ipam.added[0].options == (["nat-outgoing"] if nat else [])
