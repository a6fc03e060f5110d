"""The breakdown: what each part of calicnm's same-host path costs per packet.

Each part is added, alone, to its own copy of the hand-built path (two namespaces routed
through a third, no iptables), so its cost is the difference from the hand-built case in
the same run.  The parts are the real thing: calicnm's chains and ipsets come from
:func:`calicnm.profiles.compile_policy` for the two ends on a network with the default
profile, and Docker's rules are those dockerd 20.10 writes on a host and, for its embedded
DNS, in every container on a user-defined network.

Nothing here touches anything but the namespaces the testbed made for the case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.dataplane.places import Place
from calicnm.policy import Profile
from calicnm.profiles import (
    FORWARD,
    INPUT,
    CompiledPolicy,
    LocalEndpoint,
    compile_policy,
    tag_ipset,
)

__all__ = ["PARTS", "Ends", "Part"]

NETWORK = "bench"
ADDRESSES = ("10.202.0.1", "10.202.0.2")
INTERFACES = ("cali1", "cali2")

DOCKER_HOST_RULES = """*filter
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -i cali+ -j ACCEPT
-A FORWARD -o cali+ -j ACCEPT
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A FORWARD -i docker0 -o docker0 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
*nat
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
COMMIT
"""
"""dockerd's host rules with its default bridge, as ``iptables-save`` shows them, with the
FORWARD policy DROP it sets.  The two ``cali+`` accepts at the top stand in for calicnm's
jump, which sits there on a real host: what dockerd adds to calicnm's packets is its nat
table (conntrack and the nat hooks), not its filter chains."""

DOCKER_DNS_RULES = """*nat
:DOCKER_OUTPUT - [0:0]
:DOCKER_POSTROUTING - [0:0]
-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT
-A POSTROUTING -d 127.0.0.11/32 -j DOCKER_POSTROUTING
-A DOCKER_OUTPUT -d 127.0.0.11/32 -p tcp -m tcp --dport 53 -j DNAT --to-destination 127.0.0.11:40001
-A DOCKER_OUTPUT -d 127.0.0.11/32 -p udp -m udp --dport 53 -j DNAT --to-destination 127.0.0.11:40002
-A DOCKER_POSTROUTING -s 127.0.0.11/32 -p tcp -m tcp --sport 40001 -j SNAT --to-source :53
-A DOCKER_POSTROUTING -s 127.0.0.11/32 -p udp -m udp --sport 40002 -j SNAT --to-source :53
COMMIT
"""
"""What dockerd writes in a container's own namespace on a user-defined network (calicnm's
or a bridge) for its embedded DNS server: a nat table, so conntrack runs there too."""


@dataclass(frozen=True)
class Ends:
    """The hand-built path's three namespaces: the routing host and the two ends."""

    host: Place
    client: Place
    server: Place


@dataclass(frozen=True)
class Part:
    """One thing added to the hand-built path, and how to add it."""

    key: str
    title: str
    what: str
    """What the packets cross in addition, for the report."""
    apply: Callable[[Ends], None]


def restore(place: Place, text: str, noflush: bool = True) -> None:
    """``iptables-restore`` of ``text`` in ``place``."""
    flags = ["--noflush"] if noflush else []
    place.run(["sh", "-c", f"iptables-restore {' '.join(flags)} <<'EOF'\n{text}EOF\n"])


def bench_policy() -> CompiledPolicy:
    """calicnm's compiled policy for the two ends, both on one network with its default
    profile (members talk freely): exactly what the agent would program for them."""
    endpoints = [
        LocalEndpoint(f"ep{i}", iface, (ip,), (NETWORK,))
        for i, (iface, ip) in enumerate(zip(INTERFACES, ADDRESSES, strict=True))
    ]
    members = {NETWORK: frozenset(ADDRESSES)}
    return compile_policy({NETWORK: Profile.default(NETWORK)}, endpoints, members)


def filter_script(chains: dict[str, tuple[str, ...]], jumps: list[str]) -> str:
    lines = ["*filter", *(f":{name} - [0:0]" for name in chains), *jumps]
    for name, rules in chains.items():
        lines += [f"-A {name} {rule}" for rule in rules]
    return "\n".join([*lines, "COMMIT", ""])


def load_ipsets(place: Place, policy: CompiledPolicy) -> None:
    for name, members in sorted(policy.ipsets.items()):
        place.run(["ipset", "create", name, policy.ipset_type(name)])
        for member in sorted(members):
            place.run(["ipset", "add", name, member])


def strict_rp_filter(ends: Ends) -> None:
    """calicnm's setting on its host-side veths (``all`` too, as calicnm requires)."""
    for iface in ("all", *INTERFACES):
        ends.host.run(["sysctl", "-q", "-w", f"net.ipv4.conf.{iface}.rp_filter=1"])


def conntrack_only(ends: Ends) -> None:
    """Connection tracking in the routing namespace, through one stateful accept."""
    restore(
        ends.host,
        "*filter\n-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
        "-A FORWARD -j ACCEPT\nCOMMIT\n",
    )


def calicnm_chains(ends: Ends) -> None:
    """calicnm's filter chains and ipsets, as the agent programs them."""
    policy = bench_policy()
    load_ipsets(ends.host, policy)
    jumps = [f"-A FORWARD -j {FORWARD}", f"-A INPUT -j {INPUT}"]
    restore(ends.host, filter_script(policy.chains, jumps))


def policy_every_packet(ends: Ends) -> None:
    """calicnm's chains with conntrack off for the ends' traffic (raw-table NOTRACK) and
    the conntrack rules left out: every packet walks dispatch, the endpoint chains, the
    profile chains and the tag ipset, which is what those cost per packet."""
    policy = bench_policy()
    load_ipsets(ends.host, policy)
    chains = dict(policy.chains)
    chains[FORWARD] = tuple(rule for rule in chains[FORWARD] if "conntrack" not in rule)
    restore(ends.host, filter_script(chains, [f"-A FORWARD -j {FORWARD}"]))
    restore(ends.host, "*raw\n-A PREROUTING -i cali+ -j CT --notrack\nCOMMIT\n")


def docker_host_chains(ends: Ends) -> None:
    """dockerd's host chains and nat rules (which turn conntrack on by themselves)."""
    restore(ends.host, "*filter\n:FORWARD DROP [0:0]\nCOMMIT\n", noflush=False)
    restore(ends.host, DOCKER_HOST_RULES)


def docker_dns_nat(ends: Ends) -> None:
    """dockerd's embedded-DNS nat rules in both ends' namespaces."""
    for end in (ends.client, ends.server):
        restore(end, DOCKER_DNS_RULES)


def everything(ends: Ends) -> None:
    """All of calicnm's same-host path: Docker's rules on the host and in the ends,
    calicnm's chains at the top of FORWARD, strict rp_filter."""
    docker_host_chains(ends)
    policy = bench_policy()
    load_ipsets(ends.host, policy)
    jumps = [f"-I FORWARD 1 -j {FORWARD}", f"-A INPUT -j {INPUT}"]
    restore(ends.host, filter_script(policy.chains, jumps))
    docker_dns_nat(ends)
    strict_rp_filter(ends)


def untracked_open_pair(ends: Ends) -> None:
    """Candidate: calicnm's chains, with the ends' traffic untracked (both are members of
    a tag whose profile lets members talk both ways, so every packet is allowed with or
    without state) and accepted by one rule at the top of calicnm's FORWARD chain."""
    policy = bench_policy()
    load_ipsets(ends.host, policy)
    tag = tag_ipset(NETWORK)
    both = f"-m set --match-set {tag} src -m set --match-set {tag} dst"
    chains = dict(policy.chains)
    chains[FORWARD] = (
        f"-i cali+ -m conntrack --ctstate UNTRACKED {both} -j ACCEPT",
        *chains[FORWARD],
    )
    restore(ends.host, filter_script(chains, [f"-A FORWARD -j {FORWARD}"]))
    restore(ends.host, f"*raw\n-A PREROUTING -i cali+ {both} -j CT --notrack\nCOMMIT\n")


NFT_HOT_PATH = """table ip calicnm {
    set t-bench { type ipv4_addr; elements = { %(members)s } }
    chain forward {
        type filter hook forward priority filter; policy drop;
        iifname "cali*" ct state established,related accept
        oifname "cali*" ct state established,related accept
        iifname "cali*" ct state invalid drop
        oifname "cali*" ct state invalid drop
        iifname vmap { "cali1" : jump from-1, "cali2" : jump from-2 }
        oifname vmap { "cali1" : jump to-1, "cali2" : jump to-2 }
        iifname "cali*" accept
        oifname "cali*" accept
    }
    chain from-1 { ip saddr != 10.202.0.1 drop; return; }
    chain from-2 { ip saddr != 10.202.0.2 drop; return; }
    chain to-1 { ip saddr @t-bench return; drop; }
    chain to-2 { ip saddr @t-bench return; drop; }
}
"""
"""calicnm's hot path written natively for nftables: one table, interface dispatch by
verdict map, the tag as a native set, conntrack as a native expression."""


def native_nftables(ends: Ends) -> None:
    """Candidate: the same policy as one native nftables table (needs ``nft``)."""
    text = NFT_HOT_PATH % {"members": ", ".join(ADDRESSES)}
    ends.host.run(["sh", "-c", f"nft -f - <<'EOF'\n{text}EOF\n"])


PARTS: tuple[Part, ...] = (
    Part("rpf", "+ strict rp_filter", "a reverse-path lookup per packet", strict_rp_filter),
    Part("ct", "+ conntrack", "connection tracking in the routing namespace", conntrack_only),
    Part(
        "chains",
        "+ calicnm's chains",
        "calicnm's FORWARD chain, dispatch, endpoint and profile chains, tag ipset",
        calicnm_chains,
    ),
    Part(
        "walk",
        "+ calicnm's policy on every packet",
        "the same chains, untracked: every packet walks the whole policy",
        policy_every_packet,
    ),
    Part("docker", "+ Docker's host chains", "dockerd's filter and nat rules", docker_host_chains),
    Part(
        "dns",
        "+ Docker's DNS NAT in the containers",
        "dockerd's embedded-DNS nat table in both ends (conntrack there)",
        docker_dns_nat,
    ),
    Part("all", "+ all of the above", "calicnm's same-host path, rebuilt by hand", everything),
    Part(
        "untracked",
        "candidate: open pair untracked",
        "calicnm's chains; the pair's packets untracked and accepted by one rule",
        untracked_open_pair,
    ),
    Part(
        "nft",
        "candidate: native nftables",
        "the same policy in one nftables table with verdict maps and a native set",
        native_nftables,
    ),
)
