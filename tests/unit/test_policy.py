"""The policy model: rule validation, calicoctl's rule grammar, profile JSON."""

from __future__ import annotations

import json

import pytest

from calicnm.errors import InvalidRequest
from calicnm.policy import Profile, Rule, parse_rule_spec
from calicnm.validation import check_name

# ---- Rule.from_dict: what is accepted, in canonical form ---------------------


@pytest.mark.parametrize(
    ("data", "action", "match"),
    [
        ({}, "allow", {}),
        ({"action": "deny"}, "deny", {}),
        ({"protocol": "tcp"}, "allow", {"protocol": "tcp"}),
        ({"protocol": "TCP"}, "allow", {"protocol": "tcp"}),
        ({"protocol": 17}, "allow", {"protocol": "udp"}),
        ({"protocol": "6"}, "allow", {"protocol": "tcp"}),
        ({"protocol": 47}, "allow", {"protocol": "47"}),
        ({"protocol": "sctp"}, "allow", {"protocol": "sctp"}),
        ({"!protocol": "icmp"}, "allow", {"!protocol": "icmp"}),
        ({"src_net": "10.0.0.0/8"}, "allow", {"src_net": "10.0.0.0/8"}),
        ({"dst_net": "10.1.2.3"}, "allow", {"dst_net": "10.1.2.3/32"}),
        ({"!src_net": "10.0.0.0/24"}, "allow", {"!src_net": "10.0.0.0/24"}),
        ({"!dst_net": "192.168.0.0/16"}, "allow", {"!dst_net": "192.168.0.0/16"}),
        ({"src_tag": "web"}, "allow", {"src_tag": "web"}),
        ({"dst_tag": "db.v2"}, "allow", {"dst_tag": "db.v2"}),
        ({"!src_tag": "web"}, "allow", {"!src_tag": "web"}),
        ({"!dst_tag": "a_b-c"}, "allow", {"!dst_tag": "a_b-c"}),
        (
            {"protocol": "tcp", "dst_ports": [80, "443"]},
            "allow",
            {"protocol": "tcp", "dst_ports": [80, 443]},
        ),
        ({"protocol": "udp", "src_ports": 53}, "allow", {"protocol": "udp", "src_ports": [53]}),
        (
            {"protocol": "tcp", "src_ports": ["1000:2000", 0, 65535]},
            "allow",
            {"protocol": "tcp", "src_ports": ["1000:2000", 0, 65535]},
        ),
        ({"protocol": "tcp", "!dst_ports": [22]}, "allow", {"protocol": "tcp", "!dst_ports": [22]}),
        (
            {"protocol": "udp", "!src_ports": ["5:5"]},
            "allow",
            {"protocol": "udp", "!src_ports": ["5:5"]},
        ),
        ({"protocol": "icmp", "icmp_type": 8}, "allow", {"protocol": "icmp", "icmp_type": 8}),
        ({"protocol": "icmp", "icmp_type": 0}, "allow", {"protocol": "icmp", "icmp_type": 0}),
        (
            {"protocol": "icmp", "icmp_type": 3, "icmp_code": 255},
            "allow",
            {"protocol": "icmp", "icmp_type": 3, "icmp_code": 255},
        ),
        ({"protocol": "icmp", "!icmp_type": 254}, "allow", {"protocol": "icmp", "!icmp_type": 254}),
        (
            {"protocol": "icmp", "icmp_type": 3, "!icmp_code": 1},
            "allow",
            {"protocol": "icmp", "icmp_type": 3, "!icmp_code": 1},
        ),
        (
            {"src_net": "10.0.0.0/8", "!src_net": "10.1.0.0/16"},
            "allow",
            {"src_net": "10.0.0.0/8", "!src_net": "10.1.0.0/16"},
        ),
        ({"src_tag": None, "action": "deny"}, "deny", {}),
    ],
)
def test_rule_from_dict_accepts_and_canonicalises(data, action, match):
    rule = Rule.from_dict(data)
    assert rule == Rule(action, match)
    assert Rule.from_dict(rule.to_dict()) == rule


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"action": "permit"}, "action: 'permit' is not one of allow, deny"),
        ({"action": None}, "action: None is not one of allow, deny"),
        ({"colour": "red"}, "colour: unknown field"),
        ({"!action": "deny"}, "!action: unknown field"),
        ({"protocol": "gre"}, "protocol: 'gre' is not a protocol"),
        ({"protocol": 0}, "protocol: 0 is not a protocol"),
        ({"protocol": 256}, "protocol: 256 is not a protocol"),
        ({"protocol": True}, "protocol: True is not a protocol"),
        ({"!protocol": 1.5}, "!protocol: 1.5 is not a protocol"),
        ({"src_net": "10.0.0.1/24"}, "src_net: '10.0.0.1/24' is not a network"),
        ({"dst_net": "nowhere"}, "dst_net: 'nowhere' is not a network"),
        ({"dst_net": "fd00::/64"}, "dst_net: 'fd00::/64': IPv6 is not supported"),
        ({"!src_net": "10.0.0.0/33"}, "!src_net: '10.0.0.0/33' is not a network"),
        ({"src_tag": "bad tag"}, "src_tag: 'bad tag' is not a tag name"),
        ({"dst_tag": 5}, "dst_tag: 5 is not a tag name"),
        ({"!dst_tag": "-x"}, "!dst_tag: '-x' is not a tag name"),
        ({"src_tag": "web\n"}, "src_tag: 'web\\n' is not a tag name"),
        ({"protocol": "tcp", "dst_ports": [70000]}, "dst_ports: 70000 is outside 0-65535"),
        ({"protocol": "tcp", "dst_ports": [-1]}, "dst_ports: -1 is outside 0-65535"),
        ({"protocol": "tcp", "src_ports": ["200:100"]}, "src_ports: range 200:100 runs backwards"),
        ({"protocol": "tcp", "src_ports": ["1:2:3"]}, "src_ports: '1:2:3' is outside 0-65535"),
        (
            {"protocol": "tcp", "src_ports": ["http"]},
            "src_ports: 'http' is not a port or N:M range",
        ),
        ({"protocol": "tcp", "src_ports": [True]}, "src_ports: True is not a port"),
        ({"protocol": "tcp", "dst_ports": []}, "dst_ports: empty port list"),
        ({"protocol": "udp", "!dst_ports": ["x"]}, "!dst_ports: 'x' is not a port"),
        ({"dst_ports": [80]}, "dst_ports: ports need protocol tcp or udp"),
        ({"protocol": "icmp", "src_ports": [80]}, "src_ports: ports need protocol tcp or udp"),
        ({"!protocol": "tcp", "!src_ports": [80]}, "!src_ports: ports need protocol tcp or udp"),
        ({"protocol": "icmp", "icmp_type": 255}, "icmp_type: 255 is not an integer 0-254"),
        ({"protocol": "icmp", "icmp_type": "8"}, "icmp_type: '8' is not an integer 0-254"),
        ({"protocol": "icmp", "icmp_type": True}, "icmp_type: True is not an integer 0-254"),
        (
            {"protocol": "icmp", "icmp_type": 3, "icmp_code": 256},
            "icmp_code: 256 is not an integer 0-255",
        ),
        ({"protocol": "icmp", "!icmp_type": -1}, "!icmp_type: -1 is not an integer 0-254"),
        ({"icmp_type": 8}, "icmp_type: needs protocol icmp"),
        ({"protocol": "udp", "!icmp_type": 8}, "!icmp_type: needs protocol icmp"),
        ({"protocol": "icmp", "icmp_code": 0}, "icmp_code: needs icmp_type"),
        ({"protocol": "tcp", "!protocol": "udp"}, "!protocol: cannot be combined with protocol"),
        (
            {"protocol": "icmp", "icmp_type": 8, "!icmp_type": 0},
            "!icmp_type: cannot be combined with icmp_type",
        ),
    ],
)
def test_rule_from_dict_rejections_name_their_field(data, message):
    with pytest.raises(InvalidRequest) as err:
        Rule.from_dict(data, "inbound rule 3")
    assert str(err.value).startswith("invalid inbound rule 3: ")
    assert message in str(err.value)


def test_rule_from_dict_collects_every_problem_at_once():
    with pytest.raises(InvalidRequest) as err:
        Rule.from_dict(
            {
                "action": "permit",
                "colour": "red",
                "src_net": "10.0.0.1/8",
                "dst_tag": "no way",
                "protocol": "udp",
                "dst_ports": [99999],
                "icmp_type": 8,
            }
        )
    text = str(err.value)
    for field in ("action:", "colour:", "src_net:", "dst_tag:", "dst_ports:", "icmp_type:"):
        assert field in text, field
    assert text.count("; ") == 5


@pytest.mark.parametrize("data", [None, [], "allow", 3])
def test_rule_must_be_an_object(data):
    with pytest.raises(InvalidRequest, match="rule must be a JSON object"):
        Rule.from_dict(data)


# ---- parse_rule_spec and pprint ----------------------------------------------


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("allow", {}),
        ("deny", {"action": "deny"}),
        ("allow tcp", {"protocol": "tcp"}),
        ("allow !udp", {"!protocol": "udp"}),
        ("allow icmp type 8", {"protocol": "icmp", "icmp_type": 8}),
        ("allow icmp type 3 code 1", {"protocol": "icmp", "icmp_type": 3, "icmp_code": 1}),
        ("allow icmp type !8", {"protocol": "icmp", "!icmp_type": 8}),
        ("allow from tag web", {"src_tag": "web"}),
        ("deny from cidr 10.0.0.0/26", {"action": "deny", "src_net": "10.0.0.0/26"}),
        ("allow to cidr !10.0.0.0/8", {"!dst_net": "10.0.0.0/8"}),
        ("allow tcp to ports 80,443", {"protocol": "tcp", "dst_ports": [80, 443]}),
        ("allow udp from ports 1000:2000,53", {"protocol": "udp", "src_ports": ["1000:2000", 53]}),
        ("allow tcp to ports !22", {"protocol": "tcp", "!dst_ports": [22]}),
        (
            "allow tcp from ports 1024:65535 tag web cidr 10.0.0.0/8 "
            "to ports 80 tag db cidr 10.1.0.0/16",
            {
                "protocol": "tcp",
                "src_ports": ["1024:65535"],
                "src_tag": "web",
                "src_net": "10.0.0.0/8",
                "dst_ports": [80],
                "dst_tag": "db",
                "dst_net": "10.1.0.0/16",
            },
        ),
        ("allow to tag db from tag web", {"src_tag": "web", "dst_tag": "db"}),
        ("allow from tag web tag !admin", {"src_tag": "web", "!src_tag": "admin"}),
        ("allow 47", {"protocol": "47"}),
    ],
)
def test_parse_rule_spec(words, expected):
    assert parse_rule_spec(words.split()) == Rule.from_dict(expected)


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ("", "a rule needs an action: allow or deny"),
        ("permit", "action: 'permit' is not one of allow, deny"),
        ("allow tcp from", "'from' needs ports, tag or cidr"),
        ("allow to", "'to' needs ports, tag or cidr"),
        ("allow tcp sideways", "expected 'from' or 'to', got 'sideways'"),
        ("allow tcp to ports", "ports needs a value"),
        ("allow icmp type", "type needs a value"),
        ("allow from tag a tag b", "src_tag given twice"),
        ("allow to cidr !10.0.0.0/8 cidr !10.1.0.0/16", "!dst_net given twice"),
        ("allow udp type 8", "icmp_type: needs protocol icmp"),
        ("allow icmp type x", "icmp_type: 'x' is not an integer 0-254"),
        ("allow icmp code 1", "icmp_code: needs icmp_type"),
        ("allow from ports 80", "src_ports: ports need protocol tcp or udp"),
        ("allow tcp to ports 80,http", "dst_ports: 'http' is not a port"),
        ("allow from cidr 10.0.0.1/8", "src_net: '10.0.0.1/8' is not a network"),
        ("allow gre", "protocol: 'gre' is not a protocol"),
        ("allow from tag bad/tag", "src_tag: 'bad/tag' is not a tag name"),
    ],
)
def test_parse_rule_spec_rejections(words, message):
    with pytest.raises(InvalidRequest) as err:
        parse_rule_spec(words.split())
    assert message in str(err.value)


PPRINT_CASES = [
    ({}, "allow"),
    ({"action": "deny"}, "deny"),
    ({"src_tag": "dataman"}, "allow from tag dataman"),
    ({"protocol": "tcp", "dst_ports": [80, 443]}, "allow tcp to ports 80,443"),
    ({"protocol": "icmp", "icmp_type": 8}, "allow icmp type 8"),
    ({"protocol": "icmp", "icmp_type": 3, "icmp_code": 4}, "allow icmp type 3 code 4"),
    ({"protocol": "icmp", "icmp_type": 3, "!icmp_code": 4}, "allow icmp type 3 code !4"),
    ({"protocol": "icmp", "!icmp_type": 0}, "allow icmp type !0"),
    ({"action": "deny", "src_net": "10.0.0.0/26"}, "deny from cidr 10.0.0.0/26"),
    ({"!protocol": "tcp", "!dst_tag": "db"}, "allow !tcp to tag !db"),
    (
        {"action": "deny", "protocol": "udp", "!src_tag": "web", "dst_ports": ["1000:2000", 53]},
        "deny udp from tag !web to ports 1000:2000,53",
    ),
    (
        {
            "protocol": "tcp",
            "src_ports": ["1024:65535"],
            "!src_ports": [2000],
            "src_tag": "a",
            "!src_tag": "b",
            "src_net": "10.0.0.0/8",
            "!src_net": "10.1.0.0/16",
            "dst_ports": [80],
            "!dst_ports": [81],
            "dst_tag": "c",
            "!dst_tag": "d",
            "dst_net": "10.2.0.0/16",
            "!dst_net": "10.2.3.0/24",
        },
        "allow tcp from ports 1024:65535 ports !2000 tag a tag !b cidr 10.0.0.0/8 "
        "cidr !10.1.0.0/16 to ports 80 ports !81 tag c tag !d cidr 10.2.0.0/16 cidr !10.2.3.0/24",
    ),
    ({"protocol": 132}, "allow sctp"),
    ({"protocol": 99, "dst_net": "10.0.0.1"}, "allow 99 to cidr 10.0.0.1/32"),
]


@pytest.mark.parametrize(("data", "text"), PPRINT_CASES)
def test_pprint_and_parse_round_trip(data, text):
    rule = Rule.from_dict(data)
    assert rule.pprint() == text
    assert parse_rule_spec(rule.pprint().split()) == rule


# ---- Profile -----------------------------------------------------------------


def test_default_profile_is_calicos_security_group():
    profile = Profile.default("dataman")
    assert profile.tags == ("dataman",)
    assert profile.rules_json() == {
        "id": "dataman",
        "inbound_rules": [{"action": "allow", "src_tag": "dataman"}],
        "outbound_rules": [{"action": "allow"}],
    }
    assert [r.pprint() for r in profile.rules("inbound")] == ["allow from tag dataman"]
    assert [r.pprint() for r in profile.rules("outbound")] == ["allow"]


@pytest.mark.parametrize(
    "profile",
    [
        Profile("empty"),
        Profile.default("web"),
        Profile(
            "mixed.v2",
            tags=("a", "b"),
            inbound=tuple(Rule.from_dict(d) for d, _ in PPRINT_CASES),
            outbound=(Rule("deny", {"dst_net": "10.0.0.0/8"}), Rule()),
        ),
    ],
)
def test_profile_json_round_trip(profile):
    raw = profile.to_json()
    assert Profile.from_json(raw) == profile
    assert Profile.from_json(raw.encode()) == profile
    data = json.loads(raw)
    assert data["id"] == profile.name and data["tags"] == list(profile.tags)
    assert Profile.from_dict(profile.rules_json()) == Profile(
        profile.name, (), profile.inbound, profile.outbound
    )


def test_profile_name_argument_wins_over_stored_id():
    assert Profile.from_json(Profile.default("a").to_json(), "b").name == "b"


@pytest.mark.parametrize(
    ("data", "messages"),
    [
        ([], ["profile must be a JSON object"]),
        ({"id": "bad name"}, ["profile name 'bad name' must be"]),
        ({}, ["profile name None must be"]),
        ({"id": "p", "tags": "web"}, ["tags must be a list"]),
        ({"id": "p", "tags": ["ok", "not ok", 3]}, ["tag 'not ok'", "tag 3"]),
        ({"id": "p", "inbound_rules": {}}, ["inbound_rules must be a list"]),
        ({"id": "p", "outbound_rules": ""}, ["outbound_rules must be a list"]),
        (
            {
                "id": "p",
                "inbound_rules": [{}, {"action": "nope"}],
                "outbound_rules": [{"src_net": "x"}],
                "tags": ["-bad"],
            },
            ["inbound rule 2: action:", "outbound rule 1: src_net:", "tag '-bad'"],
        ),
    ],
)
def test_profile_from_dict_rejections(data, messages):
    with pytest.raises(InvalidRequest) as err:
        Profile.from_dict(data)
    for message in messages:
        assert message in str(err.value)


def test_profile_from_json_rejects_non_json():
    with pytest.raises(InvalidRequest, match="profile is not JSON"):
        Profile.from_json("{nope")


@pytest.mark.parametrize("name", ["a", "A-1", "web.v2_x", "x" * 64, "0"])
def test_check_name_accepts(name):
    assert check_name(name, "profile name") == name


@pytest.mark.parametrize(
    "name", ["", "-a", ".a", "_a", "a b", "a/b", "x" * 65, "web\n", "\nweb", None, 5, "wé"]
)
def test_check_name_rejects(name):
    with pytest.raises(InvalidRequest, match=r"profile name .* must be 1-64 letters"):
        check_name(name, "profile name")
