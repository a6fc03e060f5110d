"""Route distribution for one host: from the agent's snapshot to BIRD.

The agent calls ``BgpSync`` on every pass with the snapshot it read; the
BIRD configuration is a pure function of that snapshot (``bgp.render_bird``),
so a change anywhere (a host joining, a peer added, a block claimed, the
mesh switched off) reaches BIRD on the next pass, and nothing else does.
"""

from __future__ import annotations

import logging

from calicnm.agent import Snapshot
from calicnm.bgp import BirdInput, render_bird, routed_pools
from calicnm.bird import Bird
from calicnm.model import Host

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
        for ep in snapshot.endpoints
        if ep.host == host
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


__all__ = ["BgpSync", "Host", "bird_input"]
