"""Route distribution for one host: from the agent's snapshot to BIRD.

The agent calls ``BgpSync`` on every pass with the snapshot it read; the
BIRD configuration is a pure function of that snapshot (``bgp.render_bird``),
so a change anywhere (a host joining, a peer added, a block claimed, the
mesh switched off) reaches BIRD on the next pass, and nothing else does.
"""

from __future__ import annotations

import logging
from typing import Protocol

from calicnm.host import netlink
from calicnm.model import VXLAN_DEVICE, VXLAN_PORT, VXLAN_VNI, Host
from calicnm.routing.bgp import BirdInput, render_bird, routed_pools
from calicnm.routing.bird import Bird
from calicnm.routing.encap import (
    IPIP_DEVICE,
    VXLAN_OVERHEAD,
    pool_mode,
    tunnel_routes,
    vtep_mac,
    vtep_peers,
)
from calicnm.store.records import Snapshot

_log = logging.getLogger(__name__)


def bird_input(snapshot: Snapshot, host: str, log_path: str | None = None) -> BirdInput | None:
    """None until this host is registered with an address."""
    me = next((h for h in snapshot.hosts if h.name == host), None)
    if me is None or me.ip is None:
        return None
    pools = routed_pools(snapshot.pools)
    blocks = sorted(
        b for b in snapshot.affinity.get(host, []) if any(b.subnet_of(p.cidr) for p in pools)
    )
    borrowed = sorted(
        ip
        for ep in snapshot.endpoints_of(host)
        for ip in ep.ipv4
        if not any(ip in b for b in blocks) and any(ip in p.cidr for p in pools)
    )
    return BirdInput(
        me=me,
        hosts=snapshot.hosts,
        config=snapshot.bgp,
        global_peers=snapshot.global_peers,
        node_peers=snapshot.node_peers.get(host, []),
        pools=snapshot.pools,
        blocks=blocks,
        borrowed=borrowed,
        log_path=log_path,
    )


class BgpSync:
    """Agent hook: keep BIRD's configuration equal to the snapshot."""

    __name__ = "bgp"

    def __init__(self, bird: Bird, host: str) -> None:
        self._bird = bird
        self._host = host

    def __call__(self, snapshot: Snapshot) -> bool:
        data = bird_input(snapshot, self._host, self._bird.log)
        if data is None:
            return True
        self._bird.apply(render_bird(data))
        return False


class Tunnels(Protocol):
    """The kernel operations ``EncapSync`` needs; the ``calicnm.host.netlink``
    module (this host's namespace) is the production one."""

    def kernel_supports(self, kind: str) -> bool: ...

    def host_addresses(self) -> list[tuple[str, str]]: ...

    def link_mtu(self, ifname: str) -> int | None: ...

    def ensure_vxlan(
        self, device: str, vni: int, port: int, local_ip: str, underlay: str, mtu: int, mac: str
    ) -> None: ...

    def sync_tunnel(
        self,
        device: str,
        routes: list[tuple[str, str]],
        peers: list[tuple[str, str]] | None = None,
    ) -> int: ...

    def delete_link(self, ifname: str) -> bool: ...


class EncapSync:
    """Agent hook: the VXLAN device, its forwarding entries and the routes to
    other hosts' blocks in encapsulated pools; IPIP routes likewise where the
    kernel has IPIP.  A pool mode this kernel lacks is reported (log and the
    problems file ``calicnm status`` shows) instead of failing later.

    ``tunnels`` carries the kernel operations (default: ``host.netlink``)."""

    __name__ = "encap"

    def __init__(self, host: str, problems_path: str, tunnels: Tunnels = netlink) -> None:
        self._host = host
        self._problems_path = problems_path
        self._tunnels = tunnels
        self._support: dict[str, bool] = {}
        self._reported: tuple[str, ...] | None = None
        """What the problems file says; None until this process first wrote it,
        so a file left by an earlier run is always rewritten."""

    def supported(self, kind: str) -> bool:
        if kind not in self._support:
            self._support[kind] = self._tunnels.kernel_supports(kind)
        return self._support[kind]

    def __call__(self, snapshot: Snapshot) -> bool:
        me = next((h for h in snapshot.hosts if h.name == self._host), None)
        if me is None or me.ip is None:
            return True
        problems = []
        for mode, device in (("vxlan", VXLAN_DEVICE), ("ipip", IPIP_DEVICE)):
            pools = [p for p in snapshot.pools if pool_mode(p) == mode]
            if not pools:
                if mode == "vxlan":
                    self._tunnels.delete_link(VXLAN_DEVICE)
                continue
            if not self.supported(mode):
                names = ", ".join(str(p.cidr) for p in pools)
                problems.append(
                    f"pool(s) {names} use {mode}, which this kernel does not have; "
                    "their addresses are not routed between hosts"
                )
                continue
            routes = tunnel_routes(
                mode,
                self._host,
                snapshot.hosts,
                snapshot.pools,
                snapshot.affinity,
                snapshot.endpoints,
            )
            pairs = [(str(r.dst), r.via) for r in routes]
            if mode == "vxlan":
                underlay = next(
                    (ifname for ifname, ip in self._tunnels.host_addresses() if ip == me.ip), None
                )
                if underlay is None:
                    problems.append(f"no interface holds this host's address {me.ip}")
                    continue
                mtu = (self._tunnels.link_mtu(underlay) or 1500) - VXLAN_OVERHEAD
                self._tunnels.ensure_vxlan(
                    VXLAN_DEVICE, VXLAN_VNI, VXLAN_PORT, me.ip, underlay, mtu, vtep_mac(self._host)
                )
                peers = [(p.ip, p.mac) for p in vtep_peers(self._host, snapshot.hosts)]
                self._tunnels.sync_tunnel(device, pairs, peers)
            else:
                self._tunnels.sync_tunnel(device, pairs)
        self._report(problems)
        return False

    def _report(self, problems: list[str]) -> None:
        if tuple(problems) == self._reported:
            return
        for problem in problems:
            _log.error("%s", problem)
        with open(self._problems_path, "w") as fh:
            fh.write("".join(f"{p}\n" for p in problems))
        self._reported = tuple(problems)


__all__ = ["BgpSync", "EncapSync", "Host", "Tunnels", "bird_input"]
