"""BGP for container routes: the model in etcd and BIRD's configuration.

Pure: ``render_bird`` turns one host's view of the BGP settings into a BIRD 2
configuration; the node writes it and asks BIRD to reload, which keeps
every session whose configuration did not change.

What a host announces (as Calico did):
- each block it holds affinity for, as one aggregate, installed locally as a
  blackhole (the /32 routes of its containers are more specific, so only
  unused addresses of the block hit the blackhole);
- each container address it hosts outside its own blocks, as a /32
  (a "borrowed" address);
- nothing else: the export filter only lets routes inside routed pools out.
Routes learnt from peers go to the kernel (``proto bird``); other hosts'
kernels therefore hold one route per block, not one per container.

What a host accepts (``calicnm_import_bgp``, on every session): only a
prefix inside a BGP-routed pool that is one of its blocks or longer
(``net ~ [ <pool>{<block prefix>,32} ]``); a peer, or a compromised host,
cannot steer any other traffic of the host (a default route, the underlay,
another site).  Only such routes, and this host's own block blackholes,
reach the kernel.  With no routed pool nothing is accepted.

Session protection (``BgpConfig``): ``password`` puts the TCP MD5 secret on
every session (``password "...";``); ``ttl_security`` turns on GTSM
(``ttl security on;``) and makes every session a ``direct`` one, so BIRD
sends with TTL 255 and accepts only TTL 255, i.e. from a peer one hop away.
BIRD would accept ``ttl security`` next to ``multihop`` too, but then takes
``256 - hops`` as the minimum TTL, and the bare ``multihop`` of the
template means 64 hops: a check that stops nothing in a data centre.

Sessions: a full iBGP mesh between all hosts (``Mesh_<ip>``) unless it is
switched off, plus global peers (``Global_<ip>``, e.g. route reflectors)
and this host's own peers (``Node_<ip>``).  A route reflector is a BIRD of
its own (``render_route_reflector``) with every host as an ``rr client``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from calicnm.errors import InvalidRequest
from calicnm.model import BgpConfig, Host, IPv4Address, IPv4Network, Peer, Pool


@dataclass(frozen=True)
class BirdInput:
    me: Host
    hosts: list[Host]
    config: BgpConfig
    global_peers: list[Peer] = field(default_factory=list)
    node_peers: list[Peer] = field(default_factory=list)
    pools: list[Pool] = field(default_factory=list)
    blocks: list[IPv4Network] = field(default_factory=list)
    borrowed: list[IPv4Address] = field(default_factory=list)
    log_path: str | None = None


def as_of(host: Host, config: BgpConfig) -> int:
    return host.as_num if host.as_num is not None else config.as_num


def protocol_name(kind: str, ip: str) -> str:
    return f"{kind}_{ip.replace('.', '_')}"


def routed_pools(pools: Iterable[Pool]) -> list[Pool]:
    """Pools whose blocks BGP carries (encapsulated pools are routed by the
    agent over their tunnel instead)."""
    return [p for p in pools if not (p.vxlan or p.ipip)]


def import_prefix_set(pools: Iterable[Pool]) -> str | None:
    """The BIRD prefix set of what BGP may carry: in each routed pool, its
    blocks and anything longer; None if no pool is routed by BGP."""
    items = [f"{p.cidr}{{{p.block_prefix},32}}" for p in routed_pools(pools)]
    return f"[ {', '.join(items)} ]" if items else None


def bird_text(value: str, what: str) -> str:
    """``value`` as a BIRD string literal.  BIRD has no escapes in strings,
    so a quote (or a backslash, or a control character) is refused rather
    than quoted: it could end the string and inject configuration."""
    if (
        not value
        or not all(c.isascii() and c.isprintable() for c in value)
        or any(c in value for c in '"\\')
    ):
        raise InvalidRequest(
            f"{what} cannot go into the BIRD configuration: "
            "it must be printable ASCII without quotes or backslashes"
        )
    return f'"{value}"'


def _routed_filters(pools: Iterable[Pool]) -> list[str]:
    """The prefix set and the import filter every BGP session uses."""
    prefixes = import_prefix_set(pools)
    if prefixes is None:
        return [
            "# No pool is routed by BGP: nothing is accepted from any peer.",
            "filter calicnm_import_bgp {",
            "  reject;",
            "}",
        ]
    return [
        "# What BGP may carry: a block of a BGP-routed pool, or a longer prefix inside it.",
        f"define CALICNM_ROUTED = {prefixes};",
        "",
        "# Accepted from every peer: nothing else (no default route, nothing outside the pools).",
        "filter calicnm_import_bgp {",
        "  if net ~ CALICNM_ROUTED then accept;",
        "  reject;",
        "}",
    ]


def _session_security(config: BgpConfig, multihop: bool) -> list[str]:
    """Template lines for the password and TTL security settings; without
    TTL security, ``multihop`` says whether sessions are multihop ones."""
    lines = []
    if config.password is not None:
        lines.append(f"  password {bird_text(config.password, 'the BGP password')};")
    if config.ttl_security:
        lines += [
            "  # TTL security (GTSM): sends TTL 255, accepts only TTL 255, so every peer must",
            "  # be one hop away; sessions are direct, not multihop (with multihop BIRD would",
            "  # accept TTL 256 - hops, 192 for the default 64 hops).",
            "  direct;",
            "  ttl security on;",
        ]
    elif multihop:
        lines.append("  multihop;")
    return lines


def _bgp_protocol(kind: str, peer_ip: str, peer_as: int, extra: str = "") -> list[str]:
    return [
        f"protocol bgp {protocol_name(kind, peer_ip)} from calicnm_peer {{",
        f"  neighbor {peer_ip} as {peer_as};",
        *([f"  {extra}"] if extra else []),
        "}",
    ]


def render_bird(data: BirdInput) -> str:
    me = data.me
    if me.ip is None:
        raise InvalidRequest(f"host {me.name} has no address; BGP needs one")
    my_as = as_of(me, data.config)
    pools = routed_pools(data.pools)
    lines = [
        f"# Generated by calicnm for host {me.name}; do not edit (rewritten on every change).",
        f"router id {me.ip};",
        *([f'log "{data.log_path}" {{ info, warning, error, fatal }};'] if data.log_path else []),
        "",
        "protocol device { scan time 10; }",
        "",
        "# Interface networks, so BGP next hops resolve (never exported).",
        'protocol direct { ipv4; interface -"cali*", -"vxlan.calicnm", -"tunl*", "*"; }',
        "",
        "filter calicnm_export_bgp {",
    ]
    # Aggregates: a block of ours is announced whole, never its members.
    for block in data.blocks:
        lines.append(f"  if net = {block} then accept;")
    for block in data.blocks:
        lines.append(f"  if net ~ {block} then reject;")
    for pool in pools:
        lines.append(f"  if net ~ {pool.cidr} then accept;")
    kernel_bgp = (
        ["  if source = RTS_BGP && net ~ CALICNM_ROUTED then accept;"]
        if import_prefix_set(pools) is not None
        else []
    )
    lines += [
        "  reject;",
        "}",
        "",
        *_routed_filters(pools),
        "",
        "# To the kernel: this host's block blackholes and routes learnt by BGP inside the pools.",
        "filter calicnm_export_kernel {",
        '  if proto = "calicnm_blocks" then accept;',
        *kernel_bgp,
        "  reject;",
        "}",
        "",
        "# persist: routes stay in the kernel if BIRD stops; graceful restart:",
        "# after a BIRD restart the kernel is synced only once the peers' routes",
        "# are back, so nothing is withdrawn in between.",
        "protocol kernel {",
        "  ipv4 { import none; export filter calicnm_export_kernel; };",
        "  merge paths on;",
        "  persist;",
        "  graceful restart;",
        "}",
        "",
        "protocol static calicnm_blocks {",
        "  ipv4;",
        *(f"  route {block} blackhole;" for block in data.blocks),
        "}",
        "",
        "protocol static calicnm_borrowed {",
        "  ipv4;",
        *(f"  route {ip}/32 unreachable;" for ip in data.borrowed),
        "}",
        "",
        "template bgp calicnm_peer {",
        f"  local {me.ip} as {my_as};",
        *_session_security(data.config, multihop=True),
        "  graceful restart;",
        "  ipv4 {",
        "    gateway recursive;",
        "    import filter calicnm_import_bgp;",
        "    export filter calicnm_export_bgp;",
        "    next hop self;",
        "  };",
        "}",
        "",
    ]
    peers: dict[str, list[str]] = {}
    if data.config.node_mesh:
        for host in sorted(data.hosts, key=lambda h: h.name):
            if host.name == me.name or not host.ip or host.ip == me.ip:
                continue
            peers[host.ip] = _bgp_protocol("Mesh", host.ip, as_of(host, data.config))
    for kind, group in (("Global", data.global_peers), ("Node", data.node_peers)):
        for peer in sorted(group, key=lambda p: p.ip):
            if peer.ip != me.ip:
                peers[peer.ip] = _bgp_protocol(kind, peer.ip, peer.as_num)
    for ip in sorted(peers):
        lines += [*peers[ip], ""]
    return "\n".join(lines)


def render_route_reflector(
    ip: str,
    as_num: int,
    cluster_id: str,
    hosts: list[Host],
    config: BgpConfig,
    pools: list[Pool],
) -> str:
    """A standalone route reflector: every registered host is an rr client.
    It accepts from its clients what a host accepts from its peers (blocks
    of BGP-routed pools and longer prefixes in them), and its sessions use
    the hosts' password and TTL security."""
    lines = [
        "# Generated by calicnm route-reflector; do not edit.",
        f"router id {ip};",
        "protocol device { scan time 10; }",
        'protocol direct { ipv4; interface "*"; }',
        "",
        *_routed_filters(pools),
        "",
        "template bgp calicnm_client {",
        f"  local {ip} as {as_num};",
        *_session_security(config, multihop=False),
        f"  rr cluster id {cluster_id};",
        "  rr client;",
        "  ipv4 { import filter calicnm_import_bgp; export all; };",
        "}",
        "",
    ]
    for host in sorted(hosts, key=lambda h: h.name):
        if host.ip and host.ip != ip:
            lines += [
                f"protocol bgp {protocol_name('Client', host.ip)} from calicnm_client {{",
                f"  neighbor {host.ip} as {as_of(host, config)};",
                "}",
                "",
            ]
    return "\n".join(lines)


PEER_TYPES = {
    "Mesh": "node-to-node mesh",
    "Global": "global",
    "Node": "node specific",
    "Client": "rr client",
}


def parse_protocols(text: str) -> list[dict[str, Any]]:
    """``birdc show protocols`` -> rows for ``calicnm status``."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if not parts or "_" not in parts[0]:
            continue
        kind, _, rest = parts[0].partition("_")
        if kind not in PEER_TYPES or len(parts) < 5:
            continue
        ip = rest.replace("_", ".")
        info = " ".join(parts[5:]) if len(parts) > 5 else ""
        rows.append(
            {
                "peer": ip,
                "type": PEER_TYPES[kind],
                "state": parts[3],
                "since": parts[4],
                "info": info,
            }
        )
    return rows
