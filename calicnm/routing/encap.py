"""Encapsulated pools: routes to other hosts' blocks through a tunnel.

For a pool marked ``vxlan`` (or ``ipip``) BGP carries nothing; instead each
host's agent derives, from etcd alone, a route for every block another host
holds in such a pool, via that host's address, through the tunnel device
("onlink": the next hop is the remote host itself, reached inside the
tunnel).  For VXLAN it also derives the forwarding entries: each host's
VTEP MAC (a stable function of its name) and the underlay address behind
it.  Pure; ``host.netlink`` programs the result and ``route_sync.EncapSync``
wires the two.  ``bgp.routed_pools`` leaves these pools out, so BGP never
carries them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from calicnm.model import VXLAN_DEVICE, Endpoint, Host, IPv4Network, Pool

VXLAN_OVERHEAD = 50
IPIP_DEVICE = "tunl0"
IPIP_OVERHEAD = 20


def vtep_mac(host: str) -> str:
    """A stable, locally administered unicast MAC for ``host``'s VTEP."""
    digest = hashlib.sha256(f"vtep:{host}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x66, *digest[:5]))


def pool_mode(pool: Pool) -> str:
    return "vxlan" if pool.vxlan else "ipip" if pool.ipip else "bgp"


def overhead(pool: Pool | None) -> int:
    if pool is None:
        return 0
    return VXLAN_OVERHEAD if pool.vxlan else IPIP_OVERHEAD if pool.ipip else 0


@dataclass(frozen=True)
class TunnelRoute:
    dst: IPv4Network
    via: str
    device: str


@dataclass(frozen=True)
class VtepPeer:
    host: str
    ip: str
    mac: str


def tunnel_routes(
    mode: str,
    me: str,
    hosts: Iterable[Host],
    pools: Iterable[Pool],
    affinity: dict[str, list[IPv4Network]],
    endpoints: Iterable[Endpoint],
) -> list[TunnelRoute]:
    """Routes this host needs for the ``mode`` ("vxlan" or "ipip") pools:
    every other host's blocks in them, plus any address such a host holds in
    them outside its own blocks (a borrowed /32)."""
    device = VXLAN_DEVICE if mode == "vxlan" else IPIP_DEVICE
    encap = [p for p in pools if pool_mode(p) == mode]
    if not encap:
        return []
    address = {h.name: h.ip for h in hosts if h.ip}
    routes: set[TunnelRoute] = set()
    for host, blocks in affinity.items():
        if host == me or host not in address:
            continue
        for block in blocks:
            if any(block.subnet_of(p.cidr) for p in encap):
                routes.add(TunnelRoute(block, address[host], device))
    for ep in endpoints:
        if ep.host == me or ep.host not in address:
            continue
        own = affinity.get(ep.host, [])
        for ip in ep.ipv4:
            if any(ip in p.cidr for p in encap) and not any(ip in b for b in own):
                routes.add(TunnelRoute(IPv4Network(f"{ip}/32"), address[ep.host], device))
    return sorted(routes, key=lambda r: (r.dst, r.via))


def vtep_peers(me: str, hosts: Iterable[Host]) -> list[VtepPeer]:
    return sorted(
        (VtepPeer(h.name, h.ip, vtep_mac(h.name)) for h in hosts if h.name != me and h.ip),
        key=lambda p: p.ip,
    )
