"""``calicnm route-reflector run``: a BGP route reflector configured from etcd.

It runs its own BIRD (in the namespace or on the machine it is started in)
with every registered host as a route-reflector client, and rewrites that
configuration whenever the hosts, the pools or the BGP settings change.
It accepts from its clients only what hosts accept from their peers
(blocks of BGP-routed pools and longer prefixes in them) and uses the
hosts' password and TTL security.  Hosts peer with it once the operator
adds it as a global peer (``calicnm bgp peer add <ip> as <as>``), usually
after switching the full mesh off.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from calicnm.errors import CalicnmError
from calicnm.routing.bgp import render_route_reflector
from calicnm.routing.bird import Bird
from calicnm.store import keys, records
from calicnm.store.kv import Store

_log = logging.getLogger(__name__)

POLL_SECONDS = 1.0


def reflect_once(store: Store, bird: Bird, ip: str, as_num: int | None, cluster_id: str) -> bool:
    """One pass: configure ``bird`` with every registered host as a client
    (``as_num`` None: the global default AS); True if BIRD's configuration
    changed.  An invalid host or pool record is skipped (and logged); the
    rest is served.  Raises ``CalicnmError`` when etcd cannot be read, the
    BGP settings are invalid, or BIRD refuses the configuration; BIRD then
    keeps running what it had."""
    config = records.bgp_config(store)
    hosts, bad_hosts = records.scan(store, keys.HOSTS, records.HOST, records.decode_host)
    pools, bad_pools = records.scan(store, keys.POOLS, records.POOL, records.decode_pool)
    for key, reason in sorted({**bad_hosts, **bad_pools}.items()):
        _log.warning("skipping invalid record %s: %s", key, reason)
    changed = bird.apply(
        render_route_reflector(ip, as_num or config.as_num, cluster_id, hosts, config, pools)
    )
    if changed:
        _log.info("route reflector clients=%d", len(hosts))
    return changed


def run(store: Store, ip: str, as_num: int | None, cluster_id: str, state_dir: str) -> int:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    bird = Bird(state_dir)
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    _log.info("route reflector starting ip=%s cluster_id=%s", ip, cluster_id)
    last_error = None
    try:
        while not stop.is_set():
            try:
                reflect_once(store, bird, ip, as_num, cluster_id)
                last_error = None
            except CalicnmError as exc:
                if str(exc) != last_error:
                    _log.warning("route reflector pass failed (BIRD keeps its state): %s", exc)
                last_error = str(exc)
            stop.wait(POLL_SECONDS)
    finally:
        bird.stop()
    return 0
