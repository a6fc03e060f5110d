"""Compiling policy into kernel state: profiles -> iptables chains and ipsets.

Pure: takes values, returns a ``CompiledPolicy`` value; ``host.policy_applier`` applies it.

Chains (filter table), all owned by calicnm through the ``calicnm-`` prefix::

    FORWARD -> calicnm-FORWARD   (also from DOCKER-USER) with a VXLAN pool: packets from
                                 the tunnel whose inner source is a local container or
                                 not another host's, dropped; then conntrack, the hot
                                 path first (ESTABLISHED accept, then INVALID drop: the
                                 states exclude each other, so the order changes no
                                 verdict and an established packet is matched once), then
                                      -i cali+ -> calicnm-FROM-EP (sender's outbound),
                                      -o cali+ -> calicnm-TO-EP   (receiver's inbound),
                                 then accept what both allowed.
    INPUT   -> calicnm-INPUT     the same tunnel checks, VXLAN/IPIP only from registered
                                 hosts; container -> host: the sender's outbound policy,
                                 then the endpoint-to-host action (drop by default).
    calicnm-FROM-EP / -TO-EP     dispatch on the interface name to the endpoint's chain
                                 (a two-level tree past DISPATCH_FLAT_LIMIT endpoints,
                                 so a packet is matched against ~sqrt(n) rules, not n);
                                 an interface with no chain ends in DROP.
    calicnm-from-<id>/-to-<id>   per endpoint: clear the accept mark, then each profile
                                 in order; RETURN as soon as one set the mark; else DROP.
    calicnm-pi-<p>/-po-<p>       per profile and direction: its rules in order; allow
                                 sets the mark and returns, deny drops.

Tags become ``hash:ip`` ipsets holding the addresses of every endpoint on
any host whose profiles carry the tag, so rules grow with endpoints plus
rules, never with endpoints times members.

The VXLAN tunnel (raw and filter tables), only while a pool is VXLAN::

    raw PREROUTING -> calicnm-raw-PREROUTING   VXLAN from a registered host: NOTRACK
    raw OUTPUT     -> calicnm-raw-OUTPUT       VXLAN to a registered host: NOTRACK
    OUTPUT         -> calicnm-OUTPUT           accept that untracked VXLAN
    calicnm-INPUT                              accept untracked VXLAN (after the drop
                                               of VXLAN from anything else)

The outer packets are never tracked: their verdict never depends on state
(they are accepted from and to registered hosts, dropped from anyone else),
so tracking them only costs two conntrack lookups per packet on each host.
The inner packets are tracked and policed as before.

nat-outgoing (nat table), only while at least one pool has it::

    POSTROUTING -> calicnm-POSTROUTING   MASQUERADE from a nat-outgoing pool
                                         (set calicnm-masq-pools) to anything
                                         outside every pool (calicnm-all-pools),
                                         except link-local and loopback.

Both pool sets are ``hash:net``; traffic between pools, on any host, is never
masqueraded.

Fail closed: a profile that is referenced but missing or unreadable gets a
chain that drops everything, and an interface the dispatch does not know
is dropped; nothing here ever produces a blanket ACCEPT for a cali
interface.  An endpoint on an ``--internal`` network drops anything whose
destination is outside every pool.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from calicnm.model import VXLAN_DEVICE, VXLAN_PORT, IPv4Network, Pool
from calicnm.policy import PORT_PROTOCOLS, Profile, Rule

PREFIX = "calicnm-"
FORWARD = "calicnm-FORWARD"
INPUT = "calicnm-INPUT"
OUTPUT = "calicnm-OUTPUT"
RAW_PREROUTING = "calicnm-raw-PREROUTING"
RAW_OUTPUT = "calicnm-raw-OUTPUT"
FROM_EP = "calicnm-FROM-EP"
TO_EP = "calicnm-TO-EP"
ACCEPT_MARK = "0x1000000"
IFACE_PREFIX = "cali"
DISPATCH_FLAT_LIMIT = 32
MAX_CHAIN = 28
MAX_IPSET = 31
MULTIPORT_MAX = 15
HEX = "0123456789abcdef"

NAT_POSTROUTING = "calicnm-POSTROUTING"
ALL_POOLS = "calicnm-all-pools"
MASQ_POOLS = "calicnm-masq-pools"
PEER_HOSTS = "calicnm-peer-hosts"
TUNNEL_SOURCES = "calicnm-tunnel-srcs"
LOCAL_IPS = "calicnm-local-ips"
NEVER_MASQUERADED = ("169.254.0.0/16", "127.0.0.0/8")
HASH_IP = "hash:ip"
HASH_NET = "hash:net"

JUMPS = (("FORWARD", FORWARD), ("INPUT", INPUT), ("OUTPUT", OUTPUT))
"""(kernel chain, calicnm chain) pairs: one jump at the top of each."""

TABLE_JUMPS: dict[str, tuple[tuple[str, str], ...]] = {
    "filter": JUMPS,
    "nat": (("POSTROUTING", NAT_POSTROUTING),),
    "raw": (("PREROUTING", RAW_PREROUTING), ("OUTPUT", RAW_OUTPUT)),
}
"""Per table, the jumps from kernel chains; a jump exists, as rule 1, while
its calicnm chain is wanted, and is deleted (before the chain) once it is not."""

GUEST_JUMPS: dict[str, tuple[tuple[str, str], ...]] = {
    "filter": (("DOCKER-USER", FORWARD),),
}
"""Jumps from chains another program owns, kept as their rule 1 while that
chain exists.  dockerd re-inserts ``FORWARD -j DOCKER-USER`` at the top on
every start and network creation; a jump at the top of DOCKER-USER puts
calicnm's verdict ahead of dockerd's own ACCEPT rules even then."""


def shorten(name: str, budget: int) -> str:
    """``name`` if it fits, else a stable hash of it (``_`` + hex)."""
    if len(name) <= budget:
        return name
    return "_" + hashlib.sha256(f"{budget} {name}".encode()).hexdigest()[: budget - 1]


def profile_chain(name: str, direction: str) -> str:
    tag = "pi-" if direction == "inbound" else "po-"
    return PREFIX + tag + shorten(name, MAX_CHAIN - len(PREFIX) - len(tag))


def endpoint_chain(interface: str, direction: str) -> str:
    tag = "to-" if direction == "inbound" else "from-"
    suffix = interface[len(IFACE_PREFIX) :] if interface.startswith(IFACE_PREFIX) else interface
    return PREFIX + tag + shorten(suffix, MAX_CHAIN - len(PREFIX) - len(tag))


def tag_ipset(tag: str) -> str:
    return PREFIX + "t-" + shorten(tag, MAX_IPSET - len(PREFIX) - 2)


def temp_ipset(name: str) -> str:
    """Same length as ``name``: the swap partner used while rewriting it.

    Tag sets ``calicnm-t-X`` swap with ``calicnm-x-X``; the (lower-case) pool
    sets with their upper-case spelling (``calicnm-ALL-POOLS``), so no two
    sets ever share a partner and every partner keeps the ``calicnm-`` prefix
    (a leftover one is destroyed by the next full resync).
    """
    rest = name[len(PREFIX) :]
    if rest.startswith("t-"):
        return PREFIX + "x-" + rest[2:]
    return PREFIX + rest.upper()


@dataclass(frozen=True)
class LocalEndpoint:
    id: str
    interface: str
    ips: tuple[str, ...]
    profiles: tuple[str, ...]
    internal: bool = False
    """On an ``--internal`` network: egress only to pool addresses."""
    mac: str = ""
    """The container's MAC (the fast path writes it into frames it hands over)."""


@dataclass(frozen=True)
class FastPathEntry:
    """One address in the same-host fast path: the endpoint's interface and MAC, and its
    open group (a small number, unique per tag within one compile)."""

    interface: str
    mac: str
    group: int


def open_tag(profiles: Mapping[str, Profile | None], ep: LocalEndpoint) -> str | None:
    """The tag ``ep`` is open to, or None.

    An endpoint is open to tag T when its first profile carries T, its first inbound
    rule is exactly "allow from tag T" and its first outbound rule is exactly "allow".
    Profiles are tried in order and the first decisive rule wins, so every packet from
    ``ep`` to anyone is allowed, and every packet from a member of T to ``ep`` is
    allowed, whatever its protocol, ports or connection state.  Two local endpoints
    open to the same tag are therefore allowed everything both ways: policy with or
    without conntrack gives them the same verdict for every packet (only conntrack's
    own INVALID drop, which is not policy, no longer applies between them).  Endpoints
    on ``--internal`` networks are never open (their egress is checked against the
    pools first)."""
    if not ep.profiles or ep.internal:
        return None
    first = profiles.get(ep.profiles[0])
    if first is None or not first.inbound or not first.outbound:
        return None
    inbound, outbound = first.inbound[0], first.outbound[0]
    if outbound.action != "allow" or outbound.match:
        return None
    if inbound.action != "allow" or set(inbound.match) != {"src_tag"}:
        return None
    tag = str(inbound.match["src_tag"])
    return tag if tag in first.tags else None


def fast_path_plan(
    profiles: Mapping[str, Profile | None], endpoints: Iterable[LocalEndpoint]
) -> dict[str, FastPathEntry]:
    """address -> entry for every address of every local endpoint open to a tag that
    another local endpoint is also open to (a group of one has no one to talk to).
    Group numbers follow the tags' sorted order, so they never collide."""
    by_tag: dict[str, list[LocalEndpoint]] = {}
    for ep in endpoints:
        tag = open_tag(profiles, ep)
        if tag is not None and ep.mac:
            by_tag.setdefault(tag, []).append(ep)
    plan: dict[str, FastPathEntry] = {}
    groups = [tag for tag in sorted(by_tag) if len(by_tag[tag]) > 1]
    for number, tag in enumerate(groups, start=1):
        for ep in by_tag[tag]:
            for ip in ep.ips:
                plan[ip] = FastPathEntry(ep.interface, ep.mac, number)
    return plan


ENDPOINT_TO_HOST_ACTIONS = ("drop", "accept", "return")
HOST_ACTION_RULES: dict[str, tuple[str, ...]] = {
    "drop": ("-i cali+ -j DROP",),
    "accept": ("-i cali+ -j ACCEPT",),
    "return": (),
}
"""What happens to a container's packet for the host itself once its own
outbound policy allowed it: dropped (the default, as Felix does), accepted,
or returned to the host's INPUT chain and its rules."""


@dataclass(frozen=True)
class HostFacts:
    """What the compiler needs to know about the host besides policy.

    ``endpoint_to_host`` is one of ``ENDPOINT_TO_HOST_ACTIONS``.  With an
    encapsulated pool, ``peer_hosts`` (every other registered host's address)
    are the only senders of VXLAN (UDP 4789) or IPIP the host accepts, and
    ``tunnel_sources`` (other hosts' blocks and borrowed addresses in VXLAN
    pools, and their host addresses) the only inner sources it forwards from
    the VXLAN device.
    """

    endpoint_to_host: str = "drop"
    vxlan: bool = False
    ipip: bool = False
    peer_hosts: frozenset[str] = frozenset()
    tunnel_sources: frozenset[str] = frozenset()


@dataclass(frozen=True)
class CompiledPolicy:
    """Desired kernel state: chains per table, and ipsets with their type.

    ``chains`` is the filter table and ``nat_chains`` the nat table (rule
    bodies per chain).  ``ipset_types`` gives each set's type; a set it does
    not name is ``hash:ip``.
    """

    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ipsets: dict[str, frozenset[str]] = field(default_factory=dict)
    nat_chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ipset_types: dict[str, str] = field(default_factory=dict)
    raw_chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    fast_path: dict[str, FastPathEntry] = field(default_factory=dict)
    """The same-host fast path's entries (see ``fast_path_plan``)."""

    def tables(self) -> dict[str, dict[str, tuple[str, ...]]]:
        """Per table, in the order they are applied: raw last, so the accepts for
        untracked packets are in place before anything is untracked."""
        return {"filter": self.chains, "nat": self.nat_chains, "raw": self.raw_chains}

    def ipset_type(self, name: str) -> str:
        return self.ipset_types.get(name, HASH_IP)

    def rule_count(self) -> int:
        return sum(len(rules) for chains in self.tables().values() for rules in chains.values())


class CompileCache:
    """What ``compile_policy`` compiled before, for a caller that compiles
    again and again (the agent): each profile's chains, kept while the profile
    is the same object, and each endpoint's chains, kept while the endpoint
    is equal.  A compile with a cache gives exactly what one without gives;
    it only skips recomputing the parts that cannot have changed.  Holds only
    what the last compile used."""

    def __init__(self) -> None:
        self.profiles: dict[tuple[str, str], tuple[Profile, tuple[str, ...], tuple[str, ...]]] = {}
        self.endpoints: dict[tuple[LocalEndpoint, str], tuple[str, ...]] = {}


def tag_members(
    profiles: dict[str, Profile], endpoints: Iterable[tuple[tuple[str, ...], tuple[str, ...]]]
) -> dict[str, set[str]]:
    """tag -> addresses, from (profiles, ips) of every endpoint on every host."""
    tags_of = {name: p.tags for name, p in profiles.items()}
    members: dict[str, set[str]] = {}
    for profile_names, ips in endpoints:
        for name in profile_names:
            for tag in tags_of.get(name, ()):
                members.setdefault(tag, set()).update(ips)
    return members


def compile_policy(
    profiles: Mapping[str, Profile | None],
    endpoints: list[LocalEndpoint],
    members: Mapping[str, AbstractSet[str]],
    pools: Sequence[Pool] = (),
    facts: HostFacts | None = None,
    cache: CompileCache | None = None,
) -> CompiledPolicy:
    """The whole desired filter- and nat-table state for this host.

    ``profiles`` maps names to profiles; ``None`` marks one that exists but
    could not be read (it compiles to a drop chain).  Only profiles used by
    local endpoints, and tags their rules mention, are materialised.
    ``pools`` are every pool; nat-outgoing is programmed while one has it.
    ``facts`` says how the host itself is protected (see ``HostFacts``).
    ``cache`` (see ``CompileCache``) saves recompiling unchanged parts;
    ``members`` given as frozen sets are then handed on as the same objects.
    """
    facts = facts or HostFacts()
    cache = cache or CompileCache()
    endpoint_cache: dict[tuple[LocalEndpoint, str], tuple[str, ...]] = {}
    profile_cache: dict[tuple[str, str], tuple[Profile, tuple[str, ...], tuple[str, ...]]] = {}
    forward: list[str] = []
    inputs: list[str] = []
    outputs: list[str] = []
    raw_chains: dict[str, tuple[str, ...]] = {}
    ipsets: dict[str, frozenset[str]] = {}
    types: dict[str, str] = {}
    if facts.vxlan:
        # Inner packets from the tunnel must come from another host's
        # addresses, never from one of this host's containers.
        ipsets[TUNNEL_SOURCES] = frozenset(facts.tunnel_sources)
        ipsets[LOCAL_IPS] = frozenset(ip for ep in endpoints for ip in ep.ips)
        types[TUNNEL_SOURCES], types[LOCAL_IPS] = HASH_NET, HASH_IP
        for top in (forward, inputs):
            top += [
                f"-i {VXLAN_DEVICE} -m set --match-set {LOCAL_IPS} src -j DROP",
                f"-i {VXLAN_DEVICE} -m set ! --match-set {TUNNEL_SOURCES} src -j DROP",
            ]
    if facts.vxlan or facts.ipip:
        ipsets[PEER_HOSTS] = frozenset(facts.peer_hosts)
        types[PEER_HOSTS] = HASH_IP
        if facts.vxlan:
            inputs += [
                f"-p udp --dport {VXLAN_PORT} -m set ! --match-set {PEER_HOSTS} src -j DROP",
                # The tunnel between registered hosts is not tracked (see the raw
                # table below), so nothing after this could accept it as
                # ESTABLISHED: it is accepted here, as Felix does.
                f"-p udp --dport {VXLAN_PORT} -m conntrack --ctstate UNTRACKED -j ACCEPT",
            ]
            raw_chains[RAW_PREROUTING] = (
                f"-p udp --dport {VXLAN_PORT} -m set --match-set {PEER_HOSTS} src -j CT --notrack",
            )
            raw_chains[RAW_OUTPUT] = (
                f"-p udp --dport {VXLAN_PORT} -m set --match-set {PEER_HOSTS} dst -j CT --notrack",
            )
            outputs.append(
                f"-p udp --dport {VXLAN_PORT} -m set --match-set {PEER_HOSTS} dst "
                "-m conntrack --ctstate UNTRACKED -j ACCEPT"
            )
        if facts.ipip:
            inputs.append(f"-p 4 -m set ! --match-set {PEER_HOSTS} src -j DROP")
    forward += [
        "-i cali+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-o cali+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-i cali+ -m conntrack --ctstate INVALID -j DROP",
        "-o cali+ -m conntrack --ctstate INVALID -j DROP",
        f"-i cali+ -j {FROM_EP}",
        f"-o cali+ -j {TO_EP}",
        "-i cali+ -j ACCEPT",
        "-o cali+ -j ACCEPT",
    ]
    inputs += [
        "-i cali+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-i cali+ -m conntrack --ctstate INVALID -j DROP",
        # The sender's outbound policy first (it may deny), then the host's
        # own verdict for what policy let through.
        f"-i cali+ -j {FROM_EP}",
        *HOST_ACTION_RULES[facts.endpoint_to_host],
    ]
    chains: dict[str, tuple[str, ...]] = {FORWARD: tuple(forward), INPUT: tuple(inputs)}
    if outputs:
        chains[OUTPUT] = tuple(outputs)
    used: set[str] = set()
    ordered = sorted(endpoints, key=lambda e: e.interface)
    for ep in ordered:
        used.update(ep.profiles)
        for direction in ("inbound", "outbound"):
            own = cache.endpoints.get((ep, direction)) or _endpoint_rules(ep, direction)
            endpoint_cache[ep, direction] = own
            chains[endpoint_chain(ep.interface, direction)] = own
    chains.update(_dispatch(FROM_EP, "-i", ordered, "outbound"))
    chains.update(_dispatch(TO_EP, "-o", ordered, "inbound"))

    tag_sets: dict[str, frozenset[str]] = {}
    for name in sorted(used):
        profile = profiles.get(name)
        for direction in ("inbound", "outbound"):
            chain = profile_chain(name, direction)
            if profile is None:
                chains[chain] = ('-m comment --comment "profile unreadable or missing" -j DROP',)
                continue
            known = cache.profiles.get((name, direction))
            if known is None or known[0] is not profile:
                rules: list[str] = []
                tags: list[str] = []
                for rule in profile.rules(direction):
                    tags.extend(_tags_of(rule))
                    rules.extend(rule_bodies(rule))
                known = (profile, tuple(rules), tuple(tags))
            profile_cache[name, direction] = known
            chains[chain] = known[1]
            for tag in known[2]:
                tag_sets[tag_ipset(tag)] = frozenset(members.get(tag, ()))
    cache.endpoints, cache.profiles = endpoint_cache, profile_cache
    ipsets.update(tag_sets)
    types.update(dict.fromkeys(tag_sets, HASH_IP))
    nat_chains: dict[str, tuple[str, ...]] = {}
    nat = any(pool.nat_outgoing for pool in pools)
    if nat or any(ep.internal for ep in endpoints):
        ipsets[ALL_POOLS] = _nets(pool.cidr for pool in pools)
        types[ALL_POOLS] = HASH_NET
    if nat:
        ipsets[MASQ_POOLS] = _nets(pool.cidr for pool in pools if pool.nat_outgoing)
        types[MASQ_POOLS] = HASH_NET
        nat_chains[NAT_POSTROUTING] = (
            # Link-local and loopback destinations are never masqueraded:
            # they are not "outside", and a cloud's metadata service must
            # never see a request under the host's address.
            *(f"-d {net} -j RETURN" for net in NEVER_MASQUERADED),
            f"-m set --match-set {MASQ_POOLS} src -m set ! --match-set {ALL_POOLS} dst "
            "-j MASQUERADE",
        )
    plan = fast_path_plan(profiles, endpoints)
    return CompiledPolicy(chains, ipsets, nat_chains, types, raw_chains, plan)


def _nets(cidrs: Iterable[IPv4Network]) -> frozenset[str]:
    """``hash:net`` members; it refuses a /0, which is written as its two halves."""
    out: set[str] = set()
    for cidr in cidrs:
        out.update(str(c) for c in (cidr.subnets() if cidr.prefixlen == 0 else (cidr,)))
    return frozenset(out)


def _endpoint_rules(ep: LocalEndpoint, direction: str) -> tuple[str, ...]:
    rules = []
    if direction == "outbound" and len(ep.ips) == 1:
        # Belt and braces with strict rp_filter: only the endpoint's address.
        rules.append(f"! -s {ep.ips[0]}/32 -j DROP")
    if direction == "outbound" and ep.internal:
        # An --internal network reaches pool addresses only: no outside, no host.
        rules.append(f"-m set ! --match-set {ALL_POOLS} dst -j DROP")
    rules.append(f"-j MARK --set-xmark 0x0/{ACCEPT_MARK}")
    for name in ep.profiles:
        rules.append(f"-j {profile_chain(name, direction)}")
        rules.append(f"-m mark --mark {ACCEPT_MARK}/{ACCEPT_MARK} -j RETURN")
    rules.append("-j DROP")
    return tuple(rules)


def _dispatch(
    root: str, flag: str, endpoints: list[LocalEndpoint], direction: str
) -> dict[str, tuple[str, ...]]:
    def leaf_rules(eps: list[LocalEndpoint]) -> list[str]:
        return [f"{flag} {e.interface} -g {endpoint_chain(e.interface, direction)}" for e in eps]

    if len(endpoints) <= DISPATCH_FLAT_LIMIT:
        return {root: (*leaf_rules(endpoints), "-j DROP")}
    buckets: dict[str, list[LocalEndpoint]] = {}
    for ep in endpoints:
        key = ep.interface[len(IFACE_PREFIX) : len(IFACE_PREFIX) + 1]
        buckets.setdefault(key if key in HEX else "_", []).append(ep)
    chains: dict[str, tuple[str, ...]] = {}
    top: list[str] = []
    for key in sorted(buckets):
        if key == "_":
            top.extend(leaf_rules(buckets[key]))
            continue
        leaf = f"{root}-{key}"
        top.append(f"{flag} {IFACE_PREFIX}{key}+ -g {leaf}")
        chains[leaf] = (*leaf_rules(buckets[key]), "-j DROP")
    chains[root] = (*top, "-j DROP")
    return chains


def _tags_of(rule: Rule) -> list[str]:
    return [str(v) for k, v in rule.match.items() if k.lstrip("!") in ("src_tag", "dst_tag")]


def _port_chunks(ports: list[int | str]) -> list[str]:
    """Split a port list into multiport-sized pieces (a range counts twice)."""
    chunks: list[list[str]] = [[]]
    used = 0
    for port in ports:
        cost = 2 if ":" in str(port) else 1
        if used + cost > MULTIPORT_MAX:
            chunks.append([])
            used = 0
        chunks[-1].append(str(port))
        used += cost
    return [",".join(c) for c in chunks if c]


def rule_bodies(rule: Rule) -> list[str]:
    """iptables rule bodies for one rule; several when positive port lists
    need more than one multiport match (their cross product)."""
    m = rule.match
    base: list[str] = []
    for neg in ("", "!"):
        proto = m.get(f"{neg}protocol")
        if proto is not None:
            base.append(f"{'! ' if neg else ''}-p {proto}")
    for side, flag in (("src", "-s"), ("dst", "-d")):
        for neg in ("", "!"):
            net = m.get(f"{neg}{side}_net")
            if net is not None:
                base.append(f"{'! ' if neg else ''}{flag} {net}")
            tag = m.get(f"{neg}{side}_tag")
            if tag is not None:
                bang = "! " if neg else ""
                base.append(f"-m set {bang}--match-set {tag_ipset(tag)} {side}")
    for neg in ("", "!"):
        itype = m.get(f"{neg}icmp_type")
        if itype is not None:
            code = m.get("icmp_code")
            value = f"{itype}/{code}" if code is not None and not neg else str(itype)
            base.append(f"-m icmp {'! ' if neg else ''}--icmp-type {value}")
    if "!icmp_code" in m and "icmp_type" in m:
        # "type T but not code C": a separate negated type/code match.
        base.append(f"-m icmp ! --icmp-type {m['icmp_type']}/{m['!icmp_code']}")
    variants = [base]
    proto = m.get("protocol")
    for side, opt in (("src", "--sports"), ("dst", "--dports")):
        if proto not in PORT_PROTOCOLS:
            break
        negated = m.get(f"!{side}_ports")
        if negated:
            for chunk in _port_chunks(negated):
                for v in variants:
                    v.append(f"-m multiport ! {opt} {chunk}")
        positive = m.get(f"{side}_ports")
        if positive:
            variants = [
                [*v, f"-m multiport {opt} {chunk}"]
                for v in variants
                for chunk in _port_chunks(positive)
            ]
    lines: list[str] = []
    for v in variants:
        match = " ".join(v)
        prefix = f"{match} " if match else ""
        if rule.action == "deny":
            lines.append(f"{prefix}-j DROP")
        else:
            lines.append(f"{prefix}-j MARK --set-xmark {ACCEPT_MARK}/{ACCEPT_MARK}")
            lines.append(f"-m mark --mark {ACCEPT_MARK}/{ACCEPT_MARK} -j RETURN")
    return lines
