"""Profile, tag, rule and endpoint-profile commands (calicoctl 0.x's verbs
and output shapes)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from calicnm.cli import table
from calicnm.cli.context import Context, emit_json, network_label, out
from calicnm.errors import Conflict, InvalidRequest, NotFound
from calicnm.model import Endpoint, Network, effective_profiles
from calicnm.policy import DIRECTIONS, Profile, Rule, parse_rule_spec
from calicnm.store import edits, keys, records
from calicnm.store.kv import Store
from calicnm.validation import check_name

# ---- profile -----------------------------------------------------------------
#
# calicoctl 0.x's verbs and output shapes.  ``profile NAME ...`` and
# ``endpoint ID profile ...`` put a free-form word before a subcommand, which
# argparse cannot parse; ``rewrite_argv`` turns them into the hidden commands
# PROFILE_OF / ENDPOINT_OF first.

PROFILE_USAGE = """
  calicnm profile show [--detailed] [--json]
  calicnm profile add PROFILE
  calicnm profile remove PROFILE [--no-check]
  calicnm profile PROFILE tag show [--json]
  calicnm profile PROFILE tag (add|remove) TAG
  calicnm profile PROFILE rule (show|json)
  calicnm profile PROFILE rule update                  (JSON on stdin)
  calicnm profile PROFILE rule add (inbound|outbound) [--at=POSITION] RULE...
  calicnm profile PROFILE rule remove (inbound|outbound) (--at=POSITION | RULE...)"""
ENDPOINT_USAGE = """
  calicnm endpoint show [--host HOST] [--detailed] [--json]
  calicnm endpoint ENDPOINT_ID profile show [--host HOST] [--json]
  calicnm endpoint ENDPOINT_ID profile (append|remove) [--host HOST] PROFILE...
  calicnm endpoint ENDPOINT_ID profile set [--host HOST] [PROFILE...]"""
RULE_HELP = (
    "(allow|deny) [PROTOCOL [type N [code M]]] [from [ports P] [tag T] [cidr C]] "
    "[to [ports P] [tag T] [cidr C]]; a value may start with ! to negate it"
)
PROFILE_OF = "profile-of"
ENDPOINT_OF = "endpoint-of"
PROFILE_ACTIONS = ("show", "add", "remove")
ENDPOINT_ACTIONS = ("show",)


def _command_index(parser: argparse.ArgumentParser, argv: list[str]) -> int | None:
    """Index of the command word, skipping the global options before it."""
    options = parser._option_string_actions
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return i + 1 if i + 1 < len(argv) else None
        if not word.startswith("-") or word == "-":
            return i
        flag = word.split("=", 1)[0]
        action = options.get(flag)
        if action is None:  # argparse accepts unique prefixes of long options
            matches = {options[s] for s in options if s.startswith("--") and s.startswith(flag)}
            action = matches.pop() if len(matches) == 1 else None
        i += 2 if action is not None and action.nargs != 0 and "=" not in word else 1
    return None


def rewrite_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``profile NAME ...`` -> ``profile-of NAME ...`` and ``endpoint ID ...``
    -> ``endpoint-of ID ...`` when NAME/ID is not one of the command's own
    actions (so a profile cannot be called show/add/remove in this form)."""
    words = list(argv)
    i = _command_index(parser, words)
    if i is None or i + 1 >= len(words) or words[i + 1].startswith("-"):
        return words
    if words[i] == "profile" and words[i + 1] not in PROFILE_ACTIONS:
        words[i] = PROFILE_OF
    elif words[i] == "endpoint" and words[i + 1] not in ENDPOINT_ACTIONS:
        words[i] = ENDPOINT_OF
    return words


def pull_remainder_options(args: argparse.Namespace) -> None:
    """Take the options a trailing ``REMAINDER`` positional swallowed
    (``rule add inbound --at 2 allow ...``) back out of ``args.words``.

    Rule words and profile names never start with ``-``, so any other such
    word is a usage error (exit 2); ``-h`` prints the command's help.
    """
    sub: argparse.ArgumentParser | None = getattr(args, "subparser", None)
    if sub is None:
        return
    allowed: tuple[str, ...] = args.remainder_options
    kept: list[str] = []
    given: set[str] = set()
    words = list(args.words)
    i = 0
    while i < len(words):
        word = words[i]
        flag, eq, value = word.partition("=")
        if word == "--":
            kept += words[i + 1 :]
            break
        if word in ("-h", "--help"):
            sub.print_help()
            sys.exit(0)
        if flag in allowed:
            action = sub._option_string_actions[flag]
            if not eq:
                if i + 1 >= len(words):
                    sub.error(f"argument {flag}: expected one argument")
                i += 1
                value = words[i]
            if flag in given or getattr(args, action.dest) is not None:
                sub.error(f"argument {flag}: given more than once")
            given.add(flag)
            try:
                converted = action.type(value) if callable(action.type) else value
            except ValueError:
                sub.error(f"argument {flag}: invalid value: {value!r}")
            setattr(args, action.dest, converted)
        elif word.startswith("-") and len(word) > 1:
            sub.error(f"unrecognized arguments: {word}")
        else:
            kept.append(word)
        i += 1
    args.words = kept


def _store(ctx: Context) -> Store:
    return ctx.store


def _endpoint_state(endpoint: Endpoint) -> str:
    """``active`` once joined to a sandbox (a running container), else ``created``."""
    return "active" if endpoint.sandbox else "created"


def cmd_profile_show(ctx: Context) -> int:
    store = _store(ctx)
    profiles = records.profiles(store)
    members: dict[str, list[Endpoint]] = {}
    nets: dict[str, Network] = {}
    if ctx.args.detailed:
        nets = records.networks(store)
        for ep, names in edits.memberships(store):
            for name in names:
                members.setdefault(name, []).append(ep)
    if ctx.args.json:
        rows = []
        for p in profiles:
            data = json.loads(p.to_json())
            if ctx.args.detailed:
                data["endpoints"] = [
                    {
                        "host": ep.host,
                        "network": (
                            nets[ep.network_id].docker_name if ep.network_id in nets else None
                        ),
                        "endpoint_id": ep.id,
                        "state": _endpoint_state(ep),
                    }
                    for ep in members.get(p.name, [])
                ]
            rows.append(data)
        emit_json(rows)
        return 0
    if not ctx.args.detailed:
        out(table.render(["Name"], [[p.name] for p in profiles]))
        return 0
    rows2: list[list[object]] = []
    for p in profiles:
        eps = members.get(p.name, [])
        if not eps:
            rows2.append([p.name, "None", "None", "None", "None"])
        for ep in eps:
            net = nets.get(ep.network_id)
            label = network_label(net, ep.network_id)
            rows2.append([p.name, ep.host, label, ep.id, _endpoint_state(ep)])
    out(table.render(["Name", "Host", "Network", "Endpoint ID", "State"], rows2))
    return 0


def cmd_profile_add(ctx: Context) -> int:
    name = check_name(ctx.args.name, "profile name")
    if not edits.create_profile(_store(ctx), Profile.default(name)):
        raise Conflict(f"Profile {name} already exists.")
    out(f"Created profile {name}")
    return 0


def cmd_profile_remove(ctx: Context) -> int:
    store = _store(ctx)
    name = edits.get_profile(store, ctx.args.name).name
    if not ctx.args.no_check:
        users = len(edits.profile_members(store, name))
        if users:
            raise Conflict(
                f"Profile {name} is in use by {users} endpoint(s); take it off them "
                f"('calicnm endpoint ID profile remove {name}') or pass --no-check"
            )
    edits.delete_profile(store, name)
    out(f"Deleted profile {name}")
    return 0


def cmd_tag_show(ctx: Context) -> int:
    profile = edits.get_profile(_store(ctx), ctx.args.name)
    if ctx.args.json:
        emit_json(list(profile.tags))
        return 0
    for tag in profile.tags:
        out(tag)
    return 0


def add_tag(profile: Profile, tag: str) -> Profile:
    if tag in profile.tags:
        raise Conflict(f"Tag {tag} is already on profile {profile.name}")
    return dataclasses.replace(profile, tags=(*profile.tags, tag))


def remove_tag(profile: Profile, tag: str) -> Profile:
    if tag not in profile.tags:
        raise NotFound(f"Tag {tag} is not on profile {profile.name}")
    return dataclasses.replace(profile, tags=tuple(t for t in profile.tags if t != tag))


def cmd_tag_add(ctx: Context) -> int:
    tag = check_name(ctx.args.tag, "tag")
    profile = edits.update_profile(_store(ctx), ctx.args.name, lambda p: add_tag(p, tag))
    out(f"Tag {tag} added to profile {profile.name}")
    return 0


def cmd_tag_remove(ctx: Context) -> int:
    tag = ctx.args.tag
    profile = edits.update_profile(_store(ctx), ctx.args.name, lambda p: remove_tag(p, tag))
    out(f"Tag {tag} removed from profile {profile.name}")
    return 0


def rule_listing(profile: Profile) -> list[str]:
    """calicoctl's ``rule show``: numbered from 1, ``" %3d %s"`` each."""
    lines = ["Inbound rules:"]
    lines += [f" {i:3d} {r.pprint()}" for i, r in enumerate(profile.inbound, 1)]
    lines.append("Outbound rules:")
    lines += [f" {i:3d} {r.pprint()}" for i, r in enumerate(profile.outbound, 1)]
    return lines


def _with_rules(profile: Profile, direction: str, rules: list[Rule]) -> Profile:
    if direction == "inbound":
        return dataclasses.replace(profile, inbound=tuple(rules))
    return dataclasses.replace(profile, outbound=tuple(rules))


def add_rule(profile: Profile, direction: str, rule: Rule, at: int | None) -> Profile:
    """Insert ``rule`` at 1-based ``at`` (None: append).  ``profile`` comes
    back unchanged when an equal rule is already there, as calicoctl skipped
    it; a position outside 1..len+1 is refused."""
    rules = list(profile.rules(direction))
    position = len(rules) + 1 if at is None else at
    if not 1 <= position <= len(rules) + 1:
        raise InvalidRequest(
            f"Position {position} is out of range: profile {profile.name} has "
            f"{len(rules)} {direction} rule(s), so a new one goes at 1-{len(rules) + 1}"
        )
    if rule in rules:
        return profile
    rules.insert(position - 1, rule)
    return _with_rules(profile, direction, rules)


def remove_rule(profile: Profile, direction: str, rule: Rule | None, at: int | None) -> Profile:
    """Remove the rule at 1-based ``at``, or else the first rule equal to ``rule``."""
    rules = list(profile.rules(direction))
    if at is not None:
        if not 1 <= at <= len(rules):
            raise InvalidRequest(
                f"Position {at} is out of range: profile {profile.name} has "
                f"{len(rules)} {direction} rule(s)"
            )
        del rules[at - 1]
    elif rule is None or rule not in rules:
        shown = rule.pprint() if rule else "(none)"
        raise NotFound(f"Rule not found: profile {profile.name} has no {direction} rule '{shown}'")
    else:
        rules.remove(rule)
    return _with_rules(profile, direction, rules)


def parse_rules_update(text: str, name: str) -> Profile:
    """The JSON of ``rule json`` (possibly edited), validated as a whole:
    a profile ``name`` carrying the new rules (and no tags)."""
    if not text.strip():
        raise InvalidRequest(f"no rules on stdin: pipe in 'calicnm profile {name} rule json'")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"rules on stdin are not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("rules JSON must be an object with inbound_rules and outbound_rules")
    unknown = sorted(str(k) for k in data if k not in ("id", "inbound_rules", "outbound_rules"))
    if unknown:
        raise InvalidRequest(f"rules JSON has unknown field(s): {', '.join(unknown)}")
    if "id" in data and data["id"] != name:
        raise InvalidRequest(f'Rules JSON "id"={data["id"]} doesn\'t match profile name {name}.')
    missing = [k for k in ("inbound_rules", "outbound_rules") if k not in data]
    if missing:
        raise InvalidRequest(f"rules JSON needs {' and '.join(missing)} (use [] for none)")
    rules = {k: data[k] for k in ("inbound_rules", "outbound_rules")}
    return Profile.from_dict(rules, name)


def cmd_rule_show(ctx: Context) -> int:
    for line in rule_listing(edits.get_profile(_store(ctx), ctx.args.name)):
        out(line)
    return 0


def cmd_rule_json(ctx: Context) -> int:
    emit_json(edits.get_profile(_store(ctx), ctx.args.name).rules_json())
    return 0


def cmd_rule_update(ctx: Context) -> int:
    name = edits.get_profile(_store(ctx), ctx.args.name).name
    new = parse_rules_update(sys.stdin.read(), name)
    edits.update_profile(
        _store(ctx),
        name,
        lambda p: dataclasses.replace(p, inbound=new.inbound, outbound=new.outbound),
    )
    out(f"Successfully updated rules on profile {name}")
    return 0


def cmd_rule_add(ctx: Context) -> int:
    args = ctx.args
    if not args.words:
        args.subparser.error("a rule is required: (allow|deny) [PROTOCOL ...] [from ...] [to ...]")
    rule = parse_rule_spec(args.words)
    skipped = False

    def change(profile: Profile) -> Profile:
        nonlocal skipped
        updated = add_rule(profile, args.direction, rule, args.at)
        skipped = updated == profile
        return updated

    edits.update_profile(_store(ctx), args.name, change)
    if skipped:
        out("Rule already present, skipping.")
    return 0


def cmd_rule_remove(ctx: Context) -> int:
    args = ctx.args
    if args.at is not None and args.words:
        args.subparser.error("give --at=POSITION or a rule, not both")
    if args.at is None and not args.words:
        args.subparser.error("give --at=POSITION or the rule to remove")
    rule = parse_rule_spec(args.words) if args.words else None
    edits.update_profile(
        _store(ctx), args.name, lambda p: remove_rule(p, args.direction, rule, args.at)
    )
    return 0


# ---- endpoint profiles -------------------------------------------------------


def _profile_names(ctx: Context, required: bool) -> tuple[str, ...]:
    names: list[str] = ctx.args.words
    if required and not names:
        ctx.args.subparser.error("at least one PROFILE is required")
    for name in names:
        check_name(name, "profile name")
        if names.count(name) > 1:
            raise InvalidRequest(f"Profile {name} is given more than once")
    return tuple(names)


def _require_profiles(ctx: Context, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not edits.profile_exists(_store(ctx), n)]
    if missing:
        raise NotFound(f"Profile(s) {','.join(missing)} not found.")


def cmd_endpoint_profile_show(ctx: Context) -> int:
    store = _store(ctx)
    _, ep = edits.find_endpoint(store, ctx.args.endpoint_id, ctx.args.host)
    net_kv = store.get(keys.network(ep.network_id))
    names = effective_profiles(ep, Network.from_json(net_kv.value) if net_kv else None)
    if ctx.args.json:
        emit_json(
            {
                "endpoint_id": ep.id,
                "host": ep.host,
                "profiles": list(names),
                "inherited": ep.profiles is None,
            }
        )
        return 0
    for name in names:
        out(name)
    return 0


def cmd_endpoint_profile_append(ctx: Context) -> int:
    names = _profile_names(ctx, required=True)
    _require_profiles(ctx, names)
    endpoint = ctx.args.endpoint_id

    def change(current: tuple[str, ...]) -> tuple[str, ...]:
        present = [n for n in names if n in current]
        if present:
            raise Conflict(f"Profile(s) {','.join(present)} already on endpoint {endpoint}")
        return (*current, *names)

    edits.update_endpoint_profiles(_store(ctx), endpoint, change, ctx.args.host)
    out(f"Profile(s) {','.join(names)} appended.")
    return 0


def cmd_endpoint_profile_remove(ctx: Context) -> int:
    names = _profile_names(ctx, required=True)
    endpoint = ctx.args.endpoint_id

    def change(current: tuple[str, ...]) -> tuple[str, ...]:
        absent = [n for n in names if n not in current]
        if absent:
            raise NotFound(f"Profile(s) {','.join(absent)} not on endpoint {endpoint}")
        return tuple(n for n in current if n not in names)

    edits.update_endpoint_profiles(_store(ctx), endpoint, change, ctx.args.host)
    out(f"Profile(s) {','.join(names)} removed.")
    return 0


def cmd_endpoint_profile_set(ctx: Context) -> int:
    names = _profile_names(ctx, required=False)
    _require_profiles(ctx, names)
    edits.update_endpoint_profiles(
        _store(ctx), ctx.args.endpoint_id, lambda _: names, ctx.args.host
    )
    # An empty list is allowed: it denies all of the endpoint's traffic.
    out(f"Profile(s) {','.join(names) or '(none)'} set.")
    return 0


def register(sub: Any, leaf: Any, prog: str) -> None:
    """The ``endpoint ID profile ...``, ``profile ...`` and ``profile NAME ...``
    commands (``endpoint show`` lives with the other endpoint commands)."""
    eone = sub.add_parser(ENDPOINT_OF, prog=f"{prog} endpoint")
    eone.add_argument(
        "endpoint_id", metavar="ENDPOINT_ID", help="full id or a 12+ character prefix"
    )
    eone_sub = eone.add_subparsers(dest="endpoint_part", required=True, metavar="profile")
    eprof = eone_sub.add_parser("profile", help="the profiles that govern the endpoint")
    eprof_sub = eprof.add_subparsers(dest="ep_profile_command", required=True, metavar="ACTION")
    host_help = "the endpoint's host (default: search every host)"
    epshow = leaf(eprof_sub, "show", cmd_endpoint_profile_show, "its profiles, one a line")
    epshow.add_argument("--host", help=host_help)
    epshow.add_argument("--json", action="store_true")
    for name, fn, text in (
        ("append", cmd_endpoint_profile_append, "add existing profiles to its list"),
        ("remove", cmd_endpoint_profile_remove, "take profiles off its list"),
        ("set", cmd_endpoint_profile_set, "replace its list (empty: deny all its traffic)"),
    ):
        p = leaf(eprof_sub, name, fn, text)
        p.add_argument("--host", help=host_help)
        p.add_argument("words", nargs=argparse.REMAINDER, metavar="PROFILE")
        p.set_defaults(subparser=p, remainder_options=("--host",))
        p.usage = f"{p.prog} [--host HOST] " + ("[PROFILE...]" if name == "set" else "PROFILE...")

    profile = sub.add_parser(
        "profile",
        help="security profiles: tags and rules",
        usage=PROFILE_USAGE.replace("calicnm", prog),
    )
    prof_sub = profile.add_subparsers(dest="profile_command", required=True, metavar="ACTION")
    pshow2 = leaf(prof_sub, "show", cmd_profile_show, "list profiles")
    pshow2.add_argument(
        "--detailed", action="store_true", help="also one row per endpoint using each profile"
    )
    pshow2.add_argument("--json", action="store_true")
    padd = leaf(
        prof_sub, "add", cmd_profile_add, "create a profile (tag NAME, members talk freely)"
    )
    padd.add_argument("name", metavar="PROFILE")
    prm = leaf(prof_sub, "remove", cmd_profile_remove, "delete a profile no endpoint uses")
    prm.add_argument("name", metavar="PROFILE")
    prm.add_argument(
        "--no-check",
        action="store_true",
        help="delete even while endpoints use it (their traffic is then denied)",
    )

    one = sub.add_parser(PROFILE_OF, prog=f"{prog} profile")
    one.add_argument("name", metavar="PROFILE")
    one_sub = one.add_subparsers(dest="profile_part", required=True, metavar="(tag|rule)")
    tag = one_sub.add_parser("tag", help="the profile's tags")
    tag_sub = tag.add_subparsers(dest="tag_command", required=True, metavar="ACTION")
    tshow = leaf(tag_sub, "show", cmd_tag_show, "one tag per line")
    tshow.add_argument("--json", action="store_true")
    leaf(tag_sub, "add", cmd_tag_add, "add a tag").add_argument("tag", metavar="TAG")
    leaf(tag_sub, "remove", cmd_tag_remove, "remove a tag").add_argument("tag", metavar="TAG")
    rule = one_sub.add_parser("rule", help="the profile's inbound and outbound rules")
    rule_sub = rule.add_subparsers(dest="rule_command", required=True, metavar="ACTION")
    leaf(rule_sub, "show", cmd_rule_show, "numbered rules, calicoctl's rule syntax")
    leaf(rule_sub, "json", cmd_rule_json, "the rules as JSON (for 'rule update')")
    leaf(rule_sub, "update", cmd_rule_update, "replace every rule with JSON read from stdin")
    for name, fn, text in (
        ("add", cmd_rule_add, "insert a rule (default: at the end)"),
        ("remove", cmd_rule_remove, "remove the rule at --at, or the first equal rule"),
    ):
        p = leaf(rule_sub, name, fn, text)
        p.add_argument("direction", choices=DIRECTIONS)
        p.add_argument("--at", type=int, metavar="POSITION", help="1-based position")
        p.add_argument("words", nargs=argparse.REMAINDER, metavar="RULE", help=RULE_HELP)
        p.set_defaults(subparser=p, remainder_options=("--at",))
        p.usage = f"{p.prog} (inbound|outbound) " + (
            "[--at=POSITION] RULE..." if name == "add" else "(--at=POSITION | RULE...)"
        )
