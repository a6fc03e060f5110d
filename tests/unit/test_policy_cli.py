"""The profile commands' pure helpers, and edits over the in-memory store."""

from __future__ import annotations

import ipaddress

import pytest

from calicnm.cli import main as cli
from calicnm.cli import profile_commands as cli_policy
from calicnm.errors import Conflict, DatastoreConflict, InvalidRequest, NotFound
from calicnm.model import Endpoint, Network
from calicnm.policy import Profile, Rule, parse_rule_spec
from calicnm.store import edits, keys, kv, records
from calicnm.store.kv import Txn
from tests.fakes import MemoryStore

# ---- argv rewriting and REMAINDER options -------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["profile", "show"], ["profile", "show"]),
        (["profile", "add", "web"], ["profile", "add", "web"]),
        (["profile", "remove", "web"], ["profile", "remove", "web"]),
        (["profile", "-h"], ["profile", "-h"]),
        (["profile", "--help"], ["profile", "--help"]),
        (["profile"], ["profile"]),
        (["profile", "web", "rule", "show"], ["profile-of", "web", "rule", "show"]),
        (
            ["--etcd-endpoints", "http://e:2379", "profile", "web", "tag", "show"],
            ["--etcd-endpoints", "http://e:2379", "profile-of", "web", "tag", "show"],
        ),
        (
            ["--etcd-endpoints=http://e:2379", "profile", "web", "tag", "show"],
            ["--etcd-endpoints=http://e:2379", "profile-of", "web", "tag", "show"],
        ),
        (["--etcd-end", "profile", "profile", "x"], ["--etcd-end", "profile", "profile-of", "x"]),
        (["endpoint", "show"], ["endpoint", "show"]),
        (["endpoint", "abc", "profile", "show"], ["endpoint-of", "abc", "profile", "show"]),
        (["endpoint", "--help"], ["endpoint", "--help"]),
        (["pool", "web"], ["pool", "web"]),
        (["--hostname", "endpoint", "pool", "show"], ["--hostname", "endpoint", "pool", "show"]),
    ],
)
def test_rewrite_argv(argv, expected):
    assert cli_policy.rewrite_argv(cli.build_parser(), argv) == expected


def parse(*argv: str):
    parser = cli.build_parser()
    args = parser.parse_args(cli_policy.rewrite_argv(parser, list(argv)))
    cli_policy.pull_remainder_options(args)
    return args


@pytest.mark.parametrize(
    ("argv", "at", "words"),
    [
        (["inbound", "allow"], None, ["allow"]),
        (["inbound", "--at=2", "allow", "tcp"], 2, ["allow", "tcp"]),
        (["inbound", "--at", "2", "allow", "tcp"], 2, ["allow", "tcp"]),
        (["--at", "3", "inbound", "deny", "from", "cidr", "10.0.0.0/26"], 3,
         ["deny", "from", "cidr", "10.0.0.0/26"]),
        (["inbound", "allow", "icmp", "type", "8", "--at=1"], 1, ["allow", "icmp", "type", "8"]),
        (["outbound", "allow", "!tcp", "to", "tag", "!db"], None,
         ["allow", "!tcp", "to", "tag", "!db"]),
        (["inbound", "--", "allow"], None, ["allow"]),
    ],
)  # fmt: skip
def test_rule_words_and_at_reach_the_command(argv, at, words):
    args = parse("profile", "web", "rule", "add", *argv)
    assert (args.name, args.at, args.words) == ("web", at, words)
    assert args.fn is cli_policy.cmd_rule_add


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inbound", "allow", "--at"], "expected one argument"),
        (["inbound", "--at=x", "allow"], "invalid value: 'x'"),
        (["--at=1", "inbound", "--at=2", "allow"], "given more than once"),
        (["inbound", "allow", "--bogus"], "unrecognized arguments: --bogus"),
        (["sideways", "allow"], "invalid choice: 'sideways'"),
    ],
)
def test_rule_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse("profile", "web", "rule", "add", *argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_endpoint_profile_options_anywhere():
    args = parse("endpoint", "abc", "profile", "append", "a", "--host", "h1", "b")
    assert (args.endpoint_id, args.host, args.words) == ("abc", "h1", ["a", "b"])
    assert args.fn is cli_policy.cmd_endpoint_profile_append
    args = parse("endpoint", "abc", "profile", "set", "--host=h2")
    assert (args.host, args.words) == ("h2", [])
    args = parse("endpoint", "abc", "profile", "show", "--json")
    assert args.json and args.fn is cli_policy.cmd_endpoint_profile_show


# ---- pure edits ----------------------------------------------------------------

WEB = Profile.default("web")
DENY = parse_rule_spec("deny from cidr 10.0.0.0/26".split())
ICMP = parse_rule_spec("allow icmp type 8".split())


def test_rule_lines_exact():
    profile = Profile("p", (), (Rule("allow", {"src_tag": "dataman"}), *[ICMP] * 10), (Rule(),))
    lines = cli_policy.rule_listing(profile)
    assert lines[:2] == ["Inbound rules:", "   1 allow from tag dataman"]
    assert lines[11] == "  11 allow icmp type 8"
    assert lines[12:] == ["Outbound rules:", "   1 allow"]
    assert cli_policy.rule_listing(Profile("e")) == ["Inbound rules:", "Outbound rules:"]


def test_add_rule_positions():
    assert cli_policy.add_rule(WEB, "inbound", DENY, 1).inbound == (DENY, *WEB.inbound)
    assert cli_policy.add_rule(WEB, "inbound", DENY, None).inbound == (*WEB.inbound, DENY)
    assert cli_policy.add_rule(WEB, "inbound", DENY, 2).inbound == (*WEB.inbound, DENY)
    assert cli_policy.add_rule(WEB, "outbound", DENY, 1).outbound == (DENY, Rule())
    assert cli_policy.add_rule(WEB, "inbound", WEB.inbound[0], 1) == WEB  # already there: unchanged
    for bad in (0, -1, 3):
        with pytest.raises(InvalidRequest, match=f"Position {bad} is out of range.*1-2"):
            cli_policy.add_rule(WEB, "inbound", DENY, bad)


def test_remove_rule_by_position_or_equality():
    two = cli_policy.add_rule(WEB, "inbound", DENY, 1)
    assert cli_policy.remove_rule(two, "inbound", None, 1) == WEB
    assert cli_policy.remove_rule(two, "inbound", DENY, None) == WEB
    assert cli_policy.remove_rule(WEB, "outbound", None, 1).outbound == ()
    with pytest.raises(InvalidRequest, match="Position 3 is out of range: profile web has 2"):
        cli_policy.remove_rule(two, "inbound", None, 3)
    with pytest.raises(NotFound, match="no inbound rule 'allow icmp type 8'"):
        cli_policy.remove_rule(two, "inbound", ICMP, None)


def test_tags():
    assert cli_policy.add_tag(WEB, "db").tags == ("web", "db")
    assert cli_policy.remove_tag(WEB, "web").tags == ()
    with pytest.raises(Conflict, match="Tag web is already on profile web"):
        cli_policy.add_tag(WEB, "web")
    with pytest.raises(NotFound, match="Tag db is not on profile web"):
        cli_policy.remove_tag(WEB, "db")


def test_parse_rules_update():
    new = cli_policy.parse_rules_update(
        '{"id": "web", "inbound_rules": [{"action": "deny"}], "outbound_rules": []}', "web"
    )
    assert (new.inbound, new.outbound) == ((Rule("deny"),), ())
    no_id = cli_policy.parse_rules_update('{"inbound_rules": [], "outbound_rules": []}', "web")
    assert no_id == Profile("web")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no rules on stdin"),
        ("{", "rules on stdin are not JSON"),
        ("[]", "must be an object"),
        ('{"id": "db", "inbound_rules": [], "outbound_rules": []}', '"id"=db doesn\'t match'),
        ('{"inbound_rules": []}', "needs outbound_rules"),
        ('{"inbound_rules": [], "outbound_rules": [], "tags": []}', "unknown field(s): tags"),
        ('{"inbound_rules": [{"protocol": "x"}], "outbound_rules": 1}', "inbound rule 1: protocol"),
    ],
)
def test_parse_rules_update_rejections(text, message):
    with pytest.raises(InvalidRequest) as err:
        cli_policy.parse_rules_update(text, "web")
    assert message in str(err.value)


# ---- edits over MemoryStore -------------------------------------------------

NET = Network(id="n" * 64, docker_name="dataman")


def endpoint(eid: str, host: str = "h1", profiles: tuple[str, ...] | None = None) -> Endpoint:
    return Endpoint(
        eid, host, NET.id, "cali" + eid[:11], "tmp" + eid[:11], "ee:00:00:00:00:01",
        (ipaddress.IPv4Address("10.0.0.2"),), profiles=profiles,
    )  # fmt: skip


@pytest.fixture
def store() -> MemoryStore:
    s = MemoryStore()
    s.put(keys.network(NET.id), NET.to_json())
    for ep in (endpoint("a" * 64), endpoint("ab" * 32, "h2", ("web",)), endpoint("a" * 64, "h3")):
        s.put(keys.endpoint(ep.host, ep.id), ep.to_json())
    return s


def test_profile_crud(store):
    assert records.profiles(store) == []
    assert edits.ensure_profile(store, "web")
    assert not edits.ensure_profile(store, "web")
    assert not edits.create_profile(store, Profile("web"))
    assert edits.get_profile(store, "web") == Profile.default("web")
    assert edits.create_profile(store, Profile("a"))
    assert [p.name for p in records.profiles(store)] == ["a", "web"]
    edits.delete_profile(store, "a")
    with pytest.raises(NotFound, match="Profile a not found"):
        edits.get_profile(store, "a")
    with pytest.raises(NotFound):
        edits.delete_profile(store, "a")
    with pytest.raises(InvalidRequest, match="profile name"):
        edits.get_profile(store, "../x")


class Interfering(MemoryStore):
    """Changes a key behind the caller's back before each of its first commits."""

    def __init__(self, key: str, times: int) -> None:
        super().__init__()
        self.key, self.times = key, times

    def commit(self, txn: Txn) -> bool:
        if self.times and any(k == self.key for k, _ in txn.compare):
            self.times -= 1
            current = Profile.from_json(self.get(self.key).value)  # type: ignore[union-attr]
            self.put(self.key, cli_policy.add_tag(current, f"t{self.times}").to_json())
        return super().commit(txn)


def test_update_profile_retries_and_keeps_concurrent_changes():
    s = Interfering(keys.profile("web"), 0)
    edits.ensure_profile(s, "web")
    s.times = 2
    result = edits.update_profile(s, "web", lambda p: cli_policy.add_tag(p, "mine"))
    assert result.tags == ("web", "t1", "t0", "mine")
    assert edits.get_profile(s, "web") == result


def test_compare_and_swap_gives_up_after_the_bound_having_written_nothing():
    s = Interfering(keys.profile("web"), 0)
    edits.ensure_profile(s, "web")
    s.times = kv.CAS_RETRIES + 1
    pauses: list[float] = []
    with pytest.raises(DatastoreConflict, match="gave up after"):
        kv.update(s, keys.profile("web"), lambda _kv: "{}", "profile web", sleep=pauses.append)
    assert len(pauses) == kv.CAS_RETRIES and max(pauses) <= 0.05
    assert s.get(keys.profile("web")).value != "{}"  # type: ignore[union-attr]


def test_update_profile_refusals_write_nothing(store):
    edits.ensure_profile(store, "web")
    before = store.commits
    with pytest.raises(Conflict):
        edits.update_profile(store, "web", lambda p: cli_policy.add_tag(p, "web"))
    edits.update_profile(store, "web", lambda p: p)
    assert store.commits == before
    with pytest.raises(NotFound):
        edits.update_profile(store, "nope", lambda p: p)


def test_find_endpoint(store):
    kv, ep = edits.find_endpoint(store, "ab" * 32)
    assert ep.host == "h2" and kv.key == keys.endpoint("h2", "ab" * 32)
    assert edits.find_endpoint(store, "abababababab")[1].id == "ab" * 32
    assert edits.find_endpoint(store, "a" * 64, host="h3")[1].host == "h3"
    assert edits.find_endpoint(store, "a" * 12, host="h1")[1].host == "h1"
    with pytest.raises(InvalidRequest, match=r"ambiguous: it matches aaaaaaaaaaaa on h1, .* on h3"):
        edits.find_endpoint(store, "a" * 64)
    with pytest.raises(NotFound, match="at least 12 characters"):
        edits.find_endpoint(store, "ababab")
    with pytest.raises(NotFound, match="not found on host h1"):
        edits.find_endpoint(store, "ab" * 32, host="h1")
    with pytest.raises(InvalidRequest):
        edits.find_endpoint(store, "a/b")


def test_update_endpoint_profiles_starts_from_effective(store):
    seen = []

    def append(current: tuple[str, ...]) -> tuple[str, ...]:
        seen.append(current)
        return (*current, "web")

    ep = edits.update_endpoint_profiles(store, "a" * 64, append, host="h1")
    assert seen == [("dataman",)] and ep.profiles == ("dataman", "web")
    assert edits.find_endpoint(store, "a" * 64, "h1")[1].profiles == ("dataman", "web")
    emptied = edits.update_endpoint_profiles(store, "ab" * 32, lambda _: ())
    assert emptied.profiles == ()
    with pytest.raises(InvalidRequest, match="profile name"):
        edits.update_endpoint_profiles(store, "ab" * 32, lambda _: ("bad name",))


def test_profile_members(store):
    members = edits.profile_members(store, "dataman")
    assert sorted(e.host for e in members) == ["h1", "h3"]
    assert [e.host for e in edits.profile_members(store, "web")] == ["h2"]
    assert edits.profile_members(store, "other") == []
