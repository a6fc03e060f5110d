"""Profiles and rules: Calico's policy model, validated, with no I/O.

A profile is a name, a list of tags and two ordered rule lists.  A tag
names the set of addresses of every endpoint, on any host, that has a
profile carrying that tag.  Rules are evaluated in order and the first
match wins; ``allow`` accepts for this profile, ``deny`` drops.  An
endpoint accepts a packet only if one of its profiles allows it.

Rules are stored as Calico stored them: JSON objects with the fields
below, each match field negatable with a ``!`` prefix (``"!src_net"``).
Validation reports every problem of a rule at once, each naming its field.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from calicnm.errors import InvalidRequest
from calicnm.validation import check_name, is_name

ACTIONS = ("allow", "deny")
PROTOCOL_NAMES = {"tcp": 6, "udp": 17, "icmp": 1, "sctp": 132, "udplite": 136}
PORT_PROTOCOLS = ("tcp", "udp")
MATCH_FIELDS = (
    "protocol",
    "src_net",
    "dst_net",
    "src_tag",
    "dst_tag",
    "src_ports",
    "dst_ports",
    "icmp_type",
    "icmp_code",
)
KNOWN_FIELDS = ("action", *MATCH_FIELDS, *(f"!{m}" for m in MATCH_FIELDS))
DIRECTIONS = ("inbound", "outbound")
MAX_PORTS = 256
"""Ports and ranges in one rule's port list: each list compiles to
multiport matches of 15, and positive source and destination lists
multiply, so the bound keeps one rule to a few hundred iptables lines."""
MAX_RULES = 1000
"""Rules in one direction of one profile."""
MAX_TAGS = 256


def _port(value: object, where: str, problems: list[str]) -> int | str | None:
    """A port as an int, or a range as ``"N:M"`` text (Calico's stored forms)."""
    text = str(value).strip()
    if isinstance(value, bool):
        problems.append(f"{where}: {value!r} is not a port")
        return None
    parts = text.split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        problems.append(f"{where}: {value!r} is not a port or N:M range")
        return None
    if len(numbers) not in (1, 2) or not all(0 <= n <= 65535 for n in numbers):
        problems.append(f"{where}: {value!r} is outside 0-65535")
        return None
    if len(numbers) == 2 and numbers[0] > numbers[1]:
        problems.append(f"{where}: range {text} runs backwards")
        return None
    return numbers[0] if len(numbers) == 1 else f"{numbers[0]}:{numbers[1]}"


def _protocol(value: object, where: str, problems: list[str]) -> str | None:
    if isinstance(value, str) and value.lower() in PROTOCOL_NAMES:
        return value.lower()
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 255:
        for name, number in PROTOCOL_NAMES.items():
            if number == value:
                return name
        return str(value)
    problems.append(
        f"{where}: {value!r} is not a protocol (one of {', '.join(PROTOCOL_NAMES)} or 1-255)"
    )
    return None


@dataclass(frozen=True)
class Rule:
    """One validated rule; ``match`` maps (possibly ``!``-prefixed) field names
    to canonical values (nets as strings, ports as lists of strings)."""

    action: str = "allow"
    match: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: object, where: str = "rule") -> Rule:
        if not isinstance(data, dict):
            raise InvalidRequest(f"{where} must be a JSON object")
        problems: list[str] = []
        unknown = sorted(k for k in data if k not in KNOWN_FIELDS)
        for key in unknown:
            problems.append(f"{key}: unknown field")
        action = data.get("action", "allow")
        if action not in ACTIONS:
            problems.append(f"action: {action!r} is not one of {', '.join(ACTIONS)}")
        match: dict[str, Any] = {}
        for key, value in data.items():
            if key == "action" or key in unknown or value is None:
                continue
            base = key.lstrip("!")
            if base == "protocol":
                canon: Any = _protocol(value, key, problems)
            elif base in ("src_net", "dst_net"):
                canon = _net(value, key, problems)
            elif base in ("src_tag", "dst_tag"):
                canon = value if is_name(value) else None
                if canon is None:
                    problems.append(f"{key}: {value!r} is not a tag name")
            elif base in ("src_ports", "dst_ports"):
                items = value if isinstance(value, list) else [value]
                if len(items) > MAX_PORTS:
                    problems.append(f"{key}: more than {MAX_PORTS} ports or ranges")
                    continue
                ports = [_port(p, key, problems) for p in items]
                canon = [p for p in ports if p is not None] or None
                if not items:
                    problems.append(f"{key}: empty port list")
            else:  # icmp_type / icmp_code
                limit = 254 if base == "icmp_type" else 255
                ok = isinstance(value, int) and not isinstance(value, bool)
                canon = value if ok and 0 <= value <= limit else None
                if canon is None:
                    problems.append(f"{key}: {value!r} is not an integer 0-{limit}")
            if canon is not None:
                match[key] = canon
        _check_combinations(match, problems)
        if problems:
            raise InvalidRequest(f"invalid {where}: " + "; ".join(problems))
        return cls(action=str(action), match=match)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action}
        for key in KNOWN_FIELDS:
            if key in self.match:
                out[key] = self.match[key]
        return out

    def pprint(self) -> str:
        """calicoctl's one-line form: ``allow tcp from tag A to ports 80,443``."""
        words = [self.action]
        for neg in ("", "!"):
            if f"{neg}protocol" in self.match:
                words.append(f"{neg}{self.match[f'{neg}protocol']}")
        for key, label in (("icmp_type", "type"), ("icmp_code", "code")):
            for neg in ("", "!"):
                if f"{neg}{key}" in self.match:
                    words += [label, f"{neg}{self.match[f'{neg}{key}']}"]
        for side, word in (("src", "from"), ("dst", "to")):
            parts: list[str] = []
            for key, label in (("ports", "ports"), ("tag", "tag"), ("net", "cidr")):
                for neg in ("", "!"):
                    value = self.match.get(f"{neg}{side}_{key}")
                    if value is None:
                        continue
                    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
                    parts += [label, f"{neg}{text}"]
            if parts:
                words += [word, *parts]
        return " ".join(words)


def _net(value: object, where: str, problems: list[str]) -> str | None:
    try:
        net = ipaddress.ip_network(str(value), strict=True)
    except ValueError as exc:
        problems.append(f"{where}: {value!r} is not a network ({exc})")
        return None
    if net.version != 4:
        problems.append(f"{where}: {value!r}: IPv6 is not supported by calicnm yet")
        return None
    return str(net)


def _check_combinations(match: dict[str, Any], problems: list[str]) -> None:
    proto = match.get("protocol")
    for key in ("src_ports", "dst_ports", "!src_ports", "!dst_ports"):
        if key in match and proto not in PORT_PROTOCOLS:
            problems.append(f"{key}: ports need protocol tcp or udp")
    for key in ("icmp_type", "icmp_code", "!icmp_type", "!icmp_code"):
        if key in match and proto != "icmp":
            problems.append(f"{key}: needs protocol icmp")
    if ("icmp_code" in match or "!icmp_code" in match) and "icmp_type" not in match:
        problems.append("icmp_code: needs icmp_type")
    for key in MATCH_FIELDS:
        if key in match and f"!{key}" in match and key in ("protocol", "icmp_type"):
            problems.append(f"!{key}: cannot be combined with {key}")


@dataclass(frozen=True)
class Profile:
    name: str
    tags: tuple[str, ...] = ()
    inbound: tuple[Rule, ...] = ()
    outbound: tuple[Rule, ...] = ()

    @classmethod
    def default(cls, name: str) -> Profile:
        """Calico's "security group": members talk freely, others are denied."""
        return cls(
            name=name,
            tags=(name,),
            inbound=(Rule("allow", {"src_tag": name}),),
            outbound=(Rule("allow"),),
        )

    def rules(self, direction: str) -> tuple[Rule, ...]:
        return self.inbound if direction == "inbound" else self.outbound

    def rules_json(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "inbound_rules": [r.to_dict() for r in self.inbound],
            "outbound_rules": [r.to_dict() for r in self.outbound],
        }

    def to_json(self) -> str:
        data = self.rules_json()
        data["tags"] = list(self.tags)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes, name: str | None = None) -> Profile:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise InvalidRequest(f"profile is not JSON: {exc}") from exc
        return cls.from_dict(data, name)

    @classmethod
    def from_dict(cls, data: object, name: str | None = None) -> Profile:
        if not isinstance(data, dict):
            raise InvalidRequest("profile must be a JSON object")
        pname = check_name(name or data.get("id"), "profile name")
        tags = data.get("tags")
        tags = [] if tags is None else tags
        if not isinstance(tags, list) or len(tags) > MAX_TAGS:
            raise InvalidRequest(f"tags must be a list of at most {MAX_TAGS} names")
        problems = []
        rules: dict[str, list[Rule]] = {"inbound": [], "outbound": []}
        for direction in DIRECTIONS:
            # Only null means "none": a falsy non-list ({}, "", 0) is refused
            # below instead of silently emptying the rules.
            items = data.get(f"{direction}_rules")
            items = [] if items is None else items
            if not isinstance(items, list):
                problems.append(f"{direction}_rules must be a list")
                continue
            if len(items) > MAX_RULES:
                problems.append(f"{direction}_rules: more than {MAX_RULES} rules")
                continue
            for i, item in enumerate(items, 1):
                try:
                    rules[direction].append(Rule.from_dict(item, f"{direction} rule {i}"))
                except InvalidRequest as exc:
                    problems.append(str(exc))
        for tag in tags:
            try:
                check_name(tag, "tag")
            except InvalidRequest as exc:
                problems.append(str(exc))
        if problems:
            raise InvalidRequest("; ".join(problems))
        return cls(pname, tuple(tags), tuple(rules["inbound"]), tuple(rules["outbound"]))


def parse_rule_spec(words: list[str]) -> Rule:
    """calicoctl's rule grammar, e.g. ``allow tcp from tag WEB to ports 80,443``::

        (allow|deny) [PROTO [type N [code M]]]
                     [from [ports P] [tag T] [cidr C]] [to [ports P] [tag T] [cidr C]]

    A value may start with ``!`` to negate it.  The result is validated like
    any stored rule, so ``allow udp type 8`` is refused naming its field.
    """
    if not words:
        raise InvalidRequest("a rule needs an action: allow or deny")
    data: dict[str, Any] = {"action": words[0]}
    rest = list(words[1:])

    def take(what: str) -> str:
        if not rest:
            raise InvalidRequest(f"rule: {what} needs a value")
        return rest.pop(0)

    def put(key: str, text: str) -> None:
        if text.startswith("!"):
            key, text = f"!{key}", text[1:]
        # A field and its negation may both appear ("from cidr A cidr !B"), as
        # pprint writes them; from_dict refuses the combinations that clash.
        if key in data:
            raise InvalidRequest(f"rule: {key} given twice")
        value: Any = text
        if key.endswith("_ports"):
            value = [int(p) if p.isascii() and p.isdigit() else p for p in text.split(",") if p]
        elif key.endswith(("icmp_type", "icmp_code")) and text.isascii() and text.isdigit():
            value = int(text)
        data[key] = value

    if rest and rest[0] not in ("from", "to"):
        put("protocol", take("protocol"))
        while rest and rest[0] in ("type", "code"):
            word = take("type")
            put(f"icmp_{word}", take(word))
    while rest:
        side = take("from/to")
        if side not in ("from", "to"):
            raise InvalidRequest(f"rule: expected 'from' or 'to', got {side!r}")
        prefix = "src" if side == "from" else "dst"
        matched = False
        while rest and rest[0] in ("ports", "tag", "cidr"):
            word = take("match")
            key = {"ports": "ports", "tag": "tag", "cidr": "net"}[word]
            put(f"{prefix}_{key}", take(word))
            matched = True
        if not matched:
            raise InvalidRequest(f"rule: '{side}' needs ports, tag or cidr")
    return Rule.from_dict(data, "rule")
