"""Golden tables: profiles, local endpoints and tag members -> chains and ipsets."""

from __future__ import annotations

import hashlib

import pytest

from calicnm import profiles as p
from calicnm.policy import Profile, Rule, parse_rule_spec

ACC = "0x1000000/0x1000000"
MARK = f"-j MARK --set-xmark {ACC}"
RET = f"-m mark --mark {ACC} -j RETURN"

RULES = [
    ("allow", [MARK, RET]),
    ("deny", ["-j DROP"]),
    ("allow from tag dataman", [f"-m set --match-set calicnm-t-dataman src {MARK}", RET]),
    ("allow tcp to ports 80,443", [f"-p tcp -m multiport --dports 80,443 {MARK}", RET]),
    ("deny from cidr 10.0.0.0/26", ["-s 10.0.0.0/26 -j DROP"]),
    ("allow icmp type 8", [f"-p icmp -m icmp --icmp-type 8 {MARK}", RET]),
    ("allow icmp type 3 code 1", [f"-p icmp -m icmp --icmp-type 3/1 {MARK}", RET]),
    ("allow icmp type !8", [f"-p icmp -m icmp ! --icmp-type 8 {MARK}", RET]),
    (
        "deny tcp from ports 1000:2000 cidr !10.1.0.0/16 to tag !WEB",
        [
            "-p tcp ! -s 10.1.0.0/16 -m set ! --match-set calicnm-t-WEB dst "
            "-m multiport --sports 1000:2000 -j DROP"
        ],
    ),
    ("allow udp to ports !53", [f"-p udp -m multiport ! --dports 53 {MARK}", RET]),
    ("allow 132 to cidr 10.9.0.0/24", [f"-p sctp -d 10.9.0.0/24 {MARK}", RET]),
]


@pytest.mark.parametrize(("spec", "lines"), RULES, ids=[r[0] for r in RULES])
def test_rule_bodies(spec, lines):
    assert p.rule_bodies(parse_rule_spec(spec.split())) == lines


def test_long_port_lists_split_into_multiport_chunks():
    ports = [*range(1, 17), "100:200"]
    rule = Rule.from_dict({"action": "deny", "protocol": "tcp", "dst_ports": ports})
    assert p.rule_bodies(rule) == [
        "-p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 -j DROP",
        "-p tcp -m multiport --dports 16,100:200 -j DROP",
    ]


EP = p.LocalEndpoint("e1" * 32, "calie1e1e1e1e1e", ("10.0.0.2",), ("dataman",))


def test_one_endpoint_full_table():
    profile = Profile.default("dataman")
    dp = p.compile_policy({"dataman": profile}, [EP], {"dataman": {"10.0.0.2", "10.0.0.3"}})
    assert dp.ipsets == {"calicnm-t-dataman": frozenset({"10.0.0.2", "10.0.0.3"})}
    assert dp.chains == {
        "calicnm-FORWARD": (
            "-i cali+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-o cali+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-i cali+ -m conntrack --ctstate INVALID -j DROP",
            "-o cali+ -m conntrack --ctstate INVALID -j DROP",
            "-i cali+ -j calicnm-FROM-EP",
            "-o cali+ -j calicnm-TO-EP",
            "-i cali+ -j ACCEPT",
            "-o cali+ -j ACCEPT",
        ),
        "calicnm-INPUT": (
            "-i cali+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-i cali+ -m conntrack --ctstate INVALID -j DROP",
            "-i cali+ -j calicnm-FROM-EP",
            "-i cali+ -j DROP",
        ),
        "calicnm-FROM-EP": ("-i calie1e1e1e1e1e -g calicnm-from-e1e1e1e1e1e", "-j DROP"),
        "calicnm-TO-EP": ("-o calie1e1e1e1e1e -g calicnm-to-e1e1e1e1e1e", "-j DROP"),
        "calicnm-from-e1e1e1e1e1e": (
            "! -s 10.0.0.2/32 -j DROP",
            "-j MARK --set-xmark 0x0/0x1000000",
            "-j calicnm-po-dataman",
            RET,
            "-j DROP",
        ),
        "calicnm-to-e1e1e1e1e1e": (
            "-j MARK --set-xmark 0x0/0x1000000",
            "-j calicnm-pi-dataman",
            RET,
            "-j DROP",
        ),
        "calicnm-pi-dataman": (f"-m set --match-set calicnm-t-dataman src {MARK}", RET),
        "calicnm-po-dataman": (MARK, RET),
    }


def test_profiles_are_tried_in_order_and_missing_ones_drop():
    ep = p.LocalEndpoint("e1" * 32, "calie1e1e1e1e1e", ("10.0.0.2",), ("gone", "WEB"))
    dp = p.compile_policy({"WEB": Profile("WEB"), "gone": None}, [ep], {})
    assert dp.chains["calicnm-to-e1e1e1e1e1e"] == (
        "-j MARK --set-xmark 0x0/0x1000000",
        "-j calicnm-pi-gone",
        RET,
        "-j calicnm-pi-WEB",
        RET,
        "-j DROP",
    )
    assert dp.chains["calicnm-pi-gone"][0].endswith("-j DROP")
    assert dp.chains["calicnm-pi-WEB"] == ()


def test_endpoint_without_profiles_denies_everything():
    ep = p.LocalEndpoint("e1" * 32, "calie1e1e1e1e1e", ("10.0.0.2",), ())
    dp = p.compile_policy({}, [ep], {})
    assert dp.chains["calicnm-to-e1e1e1e1e1e"] == ("-j MARK --set-xmark 0x0/0x1000000", "-j DROP")


def test_only_used_profiles_and_tags_are_materialised():
    dp = p.compile_policy(
        {"dataman": Profile.default("dataman"), "other": Profile.default("other")},
        [EP],
        {"dataman": {"10.0.0.2"}, "other": {"10.0.0.9"}},
    )
    assert "calicnm-pi-other" not in dp.chains
    assert set(dp.ipsets) == {"calicnm-t-dataman"}


def test_rules_grow_linearly_and_dispatch_is_a_tree():
    def eps(n):
        ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
        return [
            p.LocalEndpoint(eid, f"cali{eid[:11]}", (f"10.{i // 250}.{i % 250}.1",), ("dataman",))
            for i, eid in enumerate(ids)
        ]

    profiles = {"dataman": Profile.default("dataman")}
    small = p.compile_policy(profiles, eps(100), {})
    big = p.compile_policy(profiles, eps(1000), {})
    per_endpoint = (big.rule_count() - small.rule_count()) / 900
    assert per_endpoint < 12
    assert len(big.chains["calicnm-FROM-EP"]) <= 17
    assert max(len(r) for c, r in big.chains.items() if c.startswith("calicnm-FROM-EP-")) < 100


def test_long_names_are_shortened_stably():
    name = "a-very-long-profile-name-indeed"
    chain = p.profile_chain(name, "inbound")
    assert len(chain) <= 28 and chain == p.profile_chain(name, "inbound")
    assert chain != p.profile_chain(name + "2", "inbound")
    assert len(p.tag_ipset(name)) <= 31
    assert len(p.temp_ipset(p.tag_ipset(name))) == len(p.tag_ipset(name))


def test_tag_members_follow_profiles_on_every_host():
    profiles = {"A": Profile("A", tags=("T",)), "B": Profile("B", tags=("T", "U"))}
    members = p.tag_members(
        profiles, [(("A",), ("10.0.0.1",)), (("B",), ("10.0.0.2",)), ((), ("10.0.0.3",))]
    )
    assert members == {"T": {"10.0.0.1", "10.0.0.2"}, "U": {"10.0.0.2"}}


# ---- the same-host fast path's plan --------------------------------------------------


def _ep(name: str, ip: str, *profiles: str, internal: bool = False) -> p.LocalEndpoint:
    return p.LocalEndpoint(
        name, f"cali{name}", (ip,), profiles, internal, mac=f"ee:00:00:00:00:{ip[-1]}0"
    )


def test_fast_path_takes_only_endpoints_open_to_a_tag_they_share():
    web, db = Profile.default("web"), Profile.default("db")
    guarded = Profile(
        "guarded",
        ("web",),
        (Rule("deny", {"protocol": "tcp", "dst_ports": [22]}), Rule("allow", {"src_tag": "web"})),
        (Rule("allow"),),
    )
    one_way = Profile("oneway", ("web",), (Rule("allow", {"src_tag": "web"}),), (Rule("deny"),))
    profiles = {"web": web, "db": db, "guarded": guarded, "oneway": one_way, "gone": None}
    eps = [
        _ep("1", "10.0.0.1", "web"),
        _ep("2", "10.0.0.2", "web", "db"),  # first profile decides: open to web
        _ep("3", "10.0.0.3", "db"),  # open to db, but alone in it
        _ep("4", "10.0.0.4", "guarded"),  # a deny comes first: not open
        _ep("5", "10.0.0.5", "oneway"),  # may not send: not open
        _ep("6", "10.0.0.6", "gone"),  # unreadable profile: not open
        _ep("7", "10.0.0.7", "web", internal=True),  # egress checked against pools first
        _ep("8", "10.0.0.8", "db", "web"),  # open to db, with 3
    ]
    plan = p.fast_path_plan(profiles, eps)
    assert set(plan) == {"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.8"}
    assert plan["10.0.0.1"] == p.FastPathEntry("cali1", "ee:00:00:00:00:10", plan["10.0.0.2"].group)
    assert plan["10.0.0.3"].group == plan["10.0.0.8"].group != plan["10.0.0.1"].group
    assert {e.group for e in plan.values()} == {1, 2}, "small numbers, one per tag"
    # The same plan comes out of the compiler, next to the chains that agree with it.
    assert p.compile_policy(profiles, eps, {}).fast_path == plan


def test_open_means_every_packet_between_the_pair_is_allowed_both_ways():
    """What makes skipping the host's chains safe for a pair: each end's first
    profile allows everything out and everything in from the shared tag, which the
    compiled chains express as their first rules."""
    web = Profile.default("web")
    eps = [_ep("1", "10.0.0.1", "web"), _ep("2", "10.0.0.2", "web")]
    assert all(p.open_tag({"web": web}, ep) == "web" for ep in eps)
    compiled = p.compile_policy({"web": web}, eps, {"web": frozenset({"10.0.0.1", "10.0.0.2"})})
    assert compiled.chains[p.profile_chain("web", "outbound")][0] == MARK
    inbound = compiled.chains[p.profile_chain("web", "inbound")][0]
    assert inbound == f"-m set --match-set calicnm-t-web src {MARK}"
    assert compiled.ipsets["calicnm-t-web"] == {"10.0.0.1", "10.0.0.2"}
    # A rule edited to narrow either direction takes the pair out of the fast path.
    narrowed = Profile("web", ("web",), web.inbound, (Rule("allow", {"protocol": "tcp"}),))
    assert p.fast_path_plan({"web": narrowed}, eps) == {}
    no_tag = Profile("web", (), web.inbound, web.outbound)
    assert p.fast_path_plan({"web": no_tag}, eps) == {}
