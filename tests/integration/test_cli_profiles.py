"""``calicnm profile`` and ``calicnm endpoint ID profile`` against a real etcd:
calicoctl's verbs, exact output shapes, errors and exit codes."""

from __future__ import annotations

import ipaddress
import json

import pytest

from calicnm.model import Endpoint, Network
from calicnm.policy import Profile
from calicnm.store import keys
from tests.integration.cli_runner import run

pytestmark = pytest.mark.etcd

NET = Network(id="n" * 64, docker_name="dataman")
EP1 = "e1" * 32
EP2 = "e2" * 32


def ok(url: str, *args: str, stdin: str | None = None) -> list[str]:
    result = run(url, *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.splitlines()


def fails(url: str, *args: str, stdin: str | None = None, code: int = 1) -> str:
    """The one stderr line of a failed command."""
    result = run(url, *args, stdin=stdin)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("calicnm: error: "), lines
    return lines[-1]


def table_rows(lines: list[str]) -> list[list[str]]:
    """The cells of a table.render table, header row first."""
    return [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("|")]


def put_endpoint(store, eid: str, host: str, profiles=None, sandbox=None) -> None:
    ep = Endpoint(
        eid,
        host,
        NET.id,
        "cali" + eid[:11],
        "tmp" + eid[:11],
        "ee:00:00:00:00:01",
        (ipaddress.IPv4Address("10.0.0.2"),),
        sandbox=sandbox,
        profiles=profiles,
    )
    store.put(keys.endpoint(host, eid), ep.to_json())


@pytest.fixture
def url(etcd_store, etcd_server) -> str:
    return etcd_server.url


@pytest.fixture
def cluster(etcd_store, etcd_server) -> str:
    """Network "dataman" (profile dataman) with EP1 on h1 (joined) and EP2 on h2."""
    etcd_store.put(keys.network(NET.id), NET.to_json())
    put_endpoint(etcd_store, EP1, "h1", sandbox="/var/run/docker/netns/x")
    put_endpoint(etcd_store, EP2, "h2")
    return etcd_server.url


# ---- profile show / add / remove ----------------------------------------------


def test_profile_add_show_remove(url, etcd_store):
    assert table_rows(ok(url, "profile", "show")) == [["Name"]]
    assert ok(url, "profile", "add", "web") == ["Created profile web"]
    assert ok(url, "profile", "add", "db") == ["Created profile db"]
    assert Profile.from_json(etcd_store.get(keys.profile("web")).value) == Profile.default("web")
    lines = ok(url, "profile", "show")
    assert lines[0].startswith("+") and lines[-1].startswith("+")
    assert table_rows(lines) == [["Name"], ["db"], ["web"]]
    shown = json.loads("\n".join(ok(url, "profile", "show", "--json")))
    assert shown[1] == {
        "id": "web",
        "tags": ["web"],
        "inbound_rules": [{"action": "allow", "src_tag": "web"}],
        "outbound_rules": [{"action": "allow"}],
    }
    assert fails(url, "profile", "add", "web") == "calicnm: error: Profile web already exists."
    assert ok(url, "profile", "remove", "db") == ["Deleted profile db"]
    assert fails(url, "profile", "remove", "db") == "calicnm: error: Profile db not found."
    assert table_rows(ok(url, "profile", "show")) == [["Name"], ["web"]]


def test_profile_name_is_validated(url):
    assert "profile name 'bad/name' must be" in fails(url, "profile", "add", "bad/name")
    assert "profile name 'x y' must be" in fails(url, "profile", "x y", "rule", "show")


def test_profile_show_detailed(cluster, etcd_store):
    url = cluster
    ok(url, "profile", "add", "dataman")
    ok(url, "profile", "add", "idle")
    rows = table_rows(ok(url, "profile", "show", "--detailed"))
    assert rows == [
        ["Name", "Host", "Network", "Endpoint ID", "State"],
        ["dataman", "h1", "dataman", EP1, "active"],
        ["dataman", "h2", "dataman", EP2, "created"],
        ["idle", "None", "None", "None", "None"],
    ]
    shown = json.loads("\n".join(ok(url, "profile", "show", "--detailed", "--json")))
    assert [e["endpoint_id"] for e in shown[0]["endpoints"]] == [EP1, EP2]
    assert shown[0]["endpoints"][0] == {
        "endpoint_id": EP1,
        "host": "h1",
        "network": "dataman",
        "state": "active",
    }
    assert shown[1]["endpoints"] == []


def test_profile_remove_refuses_while_in_use(cluster, etcd_store):
    url = cluster
    ok(url, "profile", "add", "dataman")
    message = fails(url, "profile", "remove", "dataman")
    assert "Profile dataman is in use by 2 endpoint(s)" in message and "--no-check" in message
    assert etcd_store.get(keys.profile("dataman")) is not None
    assert ok(url, "profile", "remove", "dataman", "--no-check") == ["Deleted profile dataman"]
    assert etcd_store.get(keys.profile("dataman")) is None


# ---- tags ------------------------------------------------------------------------


def test_tags(url):
    ok(url, "profile", "add", "web")
    assert ok(url, "profile", "web", "tag", "show") == ["web"]
    assert ok(url, "profile", "web", "tag", "add", "frontend") == [
        "Tag frontend added to profile web"
    ]
    assert ok(url, "profile", "web", "tag", "show") == ["web", "frontend"]
    assert json.loads("\n".join(ok(url, "profile", "web", "tag", "show", "--json"))) == [
        "web",
        "frontend",
    ]
    assert fails(url, "profile", "web", "tag", "add", "frontend") == (
        "calicnm: error: Tag frontend is already on profile web"
    )
    assert ok(url, "profile", "web", "tag", "remove", "web") == ["Tag web removed from profile web"]
    assert fails(url, "profile", "web", "tag", "remove", "web") == (
        "calicnm: error: Tag web is not on profile web"
    )
    assert "tag 'no tag' must be" in fails(url, "profile", "web", "tag", "add", "no tag")
    assert ok(url, "profile", "web", "tag", "show") == ["frontend"]


@pytest.mark.parametrize(
    "args",
    [
        ["tag", "show"],
        ["tag", "add", "x"],
        ["tag", "remove", "x"],
        ["rule", "show"],
        ["rule", "json"],
        ["rule", "update"],
        ["rule", "add", "inbound", "allow"],
        ["rule", "remove", "inbound", "--at=1"],
    ],
)
def test_unknown_profile(url, args):
    stdin = '{"inbound_rules": [], "outbound_rules": []}'
    assert fails(url, "profile", "ghost", *args, stdin=stdin) == (
        "calicnm: error: Profile ghost not found."
    )


# ---- rules -------------------------------------------------------------------------


def test_rule_show_exact(url):
    ok(url, "profile", "add", "dataman")
    result = run(url, "profile", "dataman", "rule", "show")
    assert result.returncode == 0
    assert result.stdout == (
        "Inbound rules:\n   1 allow from tag dataman\nOutbound rules:\n   1 allow\n"
    )


def test_rule_add_and_remove(url):
    ok(url, "profile", "add", "web")
    assert ok(url, "profile", "web", "rule", "add", "inbound", "allow", "tcp", "to", "ports",
              "80,443") == []  # fmt: skip
    assert ok(url, "profile", "web", "rule", "add", "inbound", "allow", "icmp", "type", "8") == []
    assert ok(url, "profile", "web", "rule", "add", "inbound", "--at=1", "deny", "from", "cidr",
              "10.0.0.0/26") == []  # fmt: skip
    assert ok(url, "profile", "web", "rule", "add", "outbound", "--at", "1", "deny", "udp", "to",
              "ports", "!53", "cidr", "10.9.0.0/16") == []  # fmt: skip
    assert ok(url, "profile", "web", "rule", "add", "outbound", "allow", "!tcp", "to", "tag",
              "!db", "--at", "2") == []  # fmt: skip
    assert ok(url, "profile", "web", "rule", "show") == [
        "Inbound rules:",
        "   1 deny from cidr 10.0.0.0/26",
        "   2 allow from tag web",
        "   3 allow tcp to ports 80,443",
        "   4 allow icmp type 8",
        "Outbound rules:",
        "   1 deny udp to ports !53 cidr 10.9.0.0/16",
        "   2 allow !tcp to tag !db",
        "   3 allow",
    ]
    # calicoctl skipped a rule that is already there.
    assert ok(url, "profile", "web", "rule", "add", "inbound", "allow", "icmp", "type", "8") == [
        "Rule already present, skipping."
    ]
    assert ok(url, "profile", "web", "rule", "remove", "inbound", "--at=2") == []
    assert ok(url, "profile", "web", "rule", "remove", "inbound", "allow", "tcp", "to", "ports",
              "80,443") == []  # fmt: skip
    assert ok(url, "profile", "web", "rule", "remove", "outbound", "--at", "3") == []
    assert ok(url, "profile", "web", "rule", "show") == [
        "Inbound rules:",
        "   1 deny from cidr 10.0.0.0/26",
        "   2 allow icmp type 8",
        "Outbound rules:",
        "   1 deny udp to ports !53 cidr 10.9.0.0/16",
        "   2 allow !tcp to tag !db",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "inbound", "--at=4", "allow"], "Position 4 is out of range"),
        (["add", "inbound", "--at=0", "allow"], "Position 0 is out of range"),
        (["remove", "inbound", "--at=2"], "Position 2 is out of range: profile web has 1 inbound"),
        (["remove", "outbound", "deny"], "Rule not found: profile web has no outbound rule 'deny'"),
        (["add", "inbound", "permit"], "invalid rule: action: 'permit' is not one of allow, deny"),
        (["add", "inbound", "allow", "udp", "type", "8"], "icmp_type: needs protocol icmp"),
        (["add", "inbound", "allow", "tcp", "to", "ports", "99999"], "dst_ports: 99999 is outside"),
        (["add", "inbound", "allow", "from", "ports", "80"], "src_ports: ports need protocol"),
        (["add", "inbound", "allow", "from", "cidr", "10.0.0.1/8"], "src_net: '10.0.0.1/8' is not"),
        (["add", "inbound", "allow", "from", "tag", "a", "tag", "b"], "src_tag given twice"),
        (["add", "inbound", "allow", "tcp", "from"], "'from' needs ports, tag or cidr"),
        (["add", "inbound", "allow", "icmp", "type", "x"], "icmp_type: 'x' is not an integer"),
    ],
)
def test_rule_errors(url, args, message):
    ok(url, "profile", "add", "web")
    assert message in fails(url, "profile", "web", "rule", *args)
    assert ok(url, "profile", "web", "rule", "show") == [
        "Inbound rules:",
        "   1 allow from tag web",
        "Outbound rules:",
        "   1 allow",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "inbound"], "a rule is required"),
        (["add", "sideways", "allow"], "invalid choice: 'sideways'"),
        (["add", "inbound", "--at=x", "allow"], "invalid value: 'x'"),
        (["add", "inbound", "allow", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["remove", "inbound"], "give --at=POSITION or the rule to remove"),
        (["remove", "inbound", "--at=1", "allow"], "not both"),
    ],
)
def test_rule_usage_errors_exit_2(url, args, message):
    assert message in fails(url, "profile", "web", "rule", *args, code=2)


def test_rule_json_update_round_trip(url, etcd_store):
    ok(url, "profile", "add", "web")
    ok(url, "profile", "web", "tag", "add", "extra")
    ok(url, "profile", "web", "rule", "add", "inbound", "--at=1", "deny", "from", "cidr",
       "10.0.0.0/26")  # fmt: skip
    ok(url, "profile", "web", "rule", "add", "inbound", "allow", "udp", "from", "ports",
       "1000:2000,53", "tag", "!web")  # fmt: skip
    before = etcd_store.get(keys.profile("web"))
    dumped = "\n".join(ok(url, "profile", "web", "rule", "json"))
    data = json.loads(dumped)
    assert data == {
        "id": "web",
        "inbound_rules": [
            {"action": "deny", "src_net": "10.0.0.0/26"},
            {"action": "allow", "src_tag": "web"},
            {
                "action": "allow",
                "protocol": "udp",
                "src_ports": ["1000:2000", 53],
                "!src_tag": "web",
            },
        ],
        "outbound_rules": [{"action": "allow"}],
    }
    assert dumped == json.dumps(data, indent=2, sort_keys=True)
    assert ok(url, "profile", "web", "rule", "update", stdin=dumped) == [
        "Successfully updated rules on profile web"
    ]
    assert etcd_store.get(keys.profile("web")).value == before.value

    data["inbound_rules"] = data["inbound_rules"][2:]
    data["outbound_rules"].insert(0, {"action": "deny", "protocol": "icmp", "icmp_type": 8})
    ok(url, "profile", "web", "rule", "update", stdin=json.dumps(data))
    assert ok(url, "profile", "web", "rule", "show") == [
        "Inbound rules:",
        "   1 allow udp from ports 1000:2000,53 tag !web",
        "Outbound rules:",
        "   1 deny icmp type 8",
        "   2 allow",
    ]
    assert ok(url, "profile", "web", "tag", "show") == ["web", "extra"]  # tags untouched


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        ("", "no rules on stdin"),
        ("{nope", "rules on stdin are not JSON"),
        ('{"id": "db", "inbound_rules": [], "outbound_rules": []}', '"id"=db doesn\'t match'),
        ('{"id": "web", "inbound_rules": []}', "needs outbound_rules"),
        ('{"inbound_rules": [], "outbound_rules": [], "tags": ["x"]}', "unknown field(s): tags"),
        (
            '{"inbound_rules": [{"action": "allow"}, {"protocol": "tcp", "icmp_type": 1}],'
            ' "outbound_rules": [{"dst_net": "::/0"}]}',
            "invalid inbound rule 2: icmp_type: needs protocol icmp; "
            "invalid outbound rule 1: dst_net: '::/0': IPv6 is not supported",
        ),
    ],
)
def test_rule_update_validates_everything_first(url, stdin, message):
    ok(url, "profile", "add", "web")
    assert message in fails(url, "profile", "web", "rule", "update", stdin=stdin)
    assert ok(url, "profile", "web", "rule", "show")[1] == "   1 allow from tag web"


# ---- endpoint profiles -----------------------------------------------------------


def test_endpoint_profile_commands(cluster, etcd_store):
    url = cluster
    ok(url, "profile", "add", "dataman")
    ok(url, "profile", "add", "web")
    ok(url, "profile", "add", "db")

    # No list of its own: the network's profile governs it.
    assert ok(url, "endpoint", EP1, "profile", "show") == ["dataman"]
    shown = json.loads("\n".join(ok(url, "endpoint", EP1[:12], "profile", "show", "--json")))
    assert shown == {"endpoint_id": EP1, "host": "h1", "profiles": ["dataman"], "inherited": True}

    assert ok(url, "endpoint", EP1, "profile", "append", "web", "db") == [
        "Profile(s) web,db appended."
    ]
    assert ok(url, "endpoint", EP1, "profile", "show") == ["dataman", "web", "db"]
    stored = Endpoint.from_json(etcd_store.get(keys.endpoint("h1", EP1)).value)
    assert stored.profiles == ("dataman", "web", "db")

    assert ok(url, "endpoint", EP1[:16], "profile", "remove", "dataman", "db") == [
        "Profile(s) dataman,db removed."
    ]
    assert ok(url, "endpoint", EP1, "profile", "show", "--host", "h1") == ["web"]

    assert ok(url, "endpoint", EP1, "profile", "set", "db", "--host", "h1", "dataman") == [
        "Profile(s) db,dataman set."
    ]
    assert ok(url, "endpoint", EP1, "profile", "show") == ["db", "dataman"]

    # An empty list is allowed: it denies all of the endpoint's traffic.
    assert ok(url, "endpoint", EP1, "profile", "set") == ["Profile(s) (none) set."]
    assert ok(url, "endpoint", EP1, "profile", "show") == []
    shown = json.loads("\n".join(ok(url, "endpoint", EP1, "profile", "show", "--json")))
    assert (shown["profiles"], shown["inherited"]) == ([], False)

    # The other endpoint still follows its network.
    assert ok(url, "endpoint", EP2, "profile", "show") == ["dataman"]
    assert ok(url, "endpoint", EP2, "profile", "remove", "dataman") == [
        "Profile(s) dataman removed."
    ]
    assert Endpoint.from_json(etcd_store.get(keys.endpoint("h2", EP2)).value).profiles == ()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["append", "ghost"], "Profile(s) ghost not found."),
        (["set", "web", "ghost", "ghost2"], "Profile(s) ghost,ghost2 not found."),
        (["append", "dataman"], f"Profile(s) dataman already on endpoint {EP1}"),
        (["remove", "web"], f"Profile(s) web not on endpoint {EP1}"),
        (["append", "web", "web"], "Profile web is given more than once"),
        (["append", "bad/name"], "profile name 'bad/name' must be"),
    ],
)
def test_endpoint_profile_errors(cluster, etcd_store, args, message):
    url = cluster
    ok(url, "profile", "add", "dataman")
    ok(url, "profile", "add", "web")
    before = etcd_store.get(keys.endpoint("h1", EP1))
    assert message in fails(url, "endpoint", EP1, "profile", *args)
    assert etcd_store.get(keys.endpoint("h1", EP1)) == before


def test_endpoint_lookup_errors(cluster, etcd_store):
    url = cluster
    assert fails(url, "endpoint", "f" * 64, "profile", "show") == (
        f"calicnm: error: Endpoint {'f' * 64} not found."
    )
    assert "at least 12 characters" in fails(url, "endpoint", EP1[:6], "profile", "show")
    assert "not found on host h2" in fails(url, "endpoint", EP1, "profile", "show", "--host", "h2")
    # The same id on two hosts: ambiguous until --host says which.
    put_endpoint(etcd_store, EP1, "h9", profiles=("web",))
    assert "ambiguous" in fails(url, "endpoint", EP1, "profile", "show")
    assert ok(url, "endpoint", EP1, "profile", "show", "--host", "h9") == ["web"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["append"], "at least one PROFILE is required"),
        (["remove", "--host", "h1"], "at least one PROFILE is required"),
        (["append", "web", "--json"], "unrecognized arguments: --json"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_endpoint_profile_usage_errors(url, args, message):
    assert message in fails(url, "endpoint", EP1, "profile", *args, code=2)


def test_help_mentions_the_name_forms(url):
    assert any("calicnm profile PROFILE rule add" in line for line in ok(url, "profile", "-h"))
    assert any(
        "calicnm endpoint ENDPOINT_ID profile" in line for line in ok(url, "endpoint", "--help")
    )
