"""``calicnm route-reflector run``: a BGP route reflector configured from etcd.

It runs its own BIRD (in the namespace or on the machine it is started in)
with every registered host as a route-reflector client, and rewrites that
configuration whenever the hosts, the pools or the BGP settings change.
It follows etcd's change stream through an in-memory copy
(``store.mirror.PrefixMirror``) and reconfigures only after a change to a
host, pool or BGP settings record, and every ``RESYNC_SECONDS``; an idle
cluster costs it no etcd request, and an endpoint created anywhere costs it
one watch event and no work.  While the stream is down it reads etcd itself
every ``POLL_SECONDS``.
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
import time
from types import FrameType

from calicnm.errors import CalicnmError
from calicnm.routing.bgp import render_route_reflector
from calicnm.routing.bird import Bird
from calicnm.store import keys, records
from calicnm.store.kv import ChangeSource, Reader, Store
from calicnm.store.mirror import PrefixMirror

_log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
"""Pace of passes while there is no change stream (etcd unreachable)."""
RESYNC_SECONDS = 30.0
"""A pass at least this often, so BIRD's configuration is re-asserted."""
_INPUT = (records.HOST, records.POOL, records.BGP_CONFIG)


def _matters(key: str) -> bool:
    """Does a change of ``key`` change what the reflector configures?  Hosts,
    pools and the BGP settings, and a malformed key under their prefixes
    (it is logged as invalid)."""
    parts = records.parse_key(key)
    if parts is None:
        return key.startswith((keys.HOSTS, keys.POOLS))
    return parts.kind in _INPUT


def reflect_once(store: Reader, bird: Bird, ip: str, as_num: int | None, cluster_id: str) -> bool:
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


class ReflectorLoop:
    """The reflector's passes: ``step`` makes one if something it configures
    changed (or the resync is due, or there is no stream), and says how long
    to wait for the next; ``serve`` repeats it until stopped."""

    def __init__(
        self,
        store: Store,
        bird: Bird,
        ip: str,
        as_num: int | None,
        cluster_id: str,
        changes: ChangeSource | None = None,
    ) -> None:
        self._store = store
        self._bird = bird
        self._args = (ip, as_num, cluster_id)
        self.woken = threading.Event()
        self._mirror = PrefixMirror(changes, keys.ROOT + "/", self.woken.set) if changes else None
        self._last_error: str | None = None
        self._next_pass = 0.0
        self.passes = 0

    def step(self) -> float:
        """One round; the seconds until the next one is due.  Never raises a
        ``CalicnmError``: a failed pass is logged once and retried."""
        fresh = self._follow()
        source: Reader = self._store
        due = True
        if fresh and self._mirror is not None:
            delta = self._mirror.take_delta()
            due = (
                delta.reset
                or any(_matters(key) for key in delta.changes)
                or time.monotonic() >= self._next_pass
            )
            source = self._mirror.view()
        if due:
            try:
                reflect_once(source, self._bird, *self._args)
                self.passes += 1
                self._last_error = None
                self._next_pass = time.monotonic() + RESYNC_SECONDS
            except CalicnmError as exc:
                if str(exc) != self._last_error:
                    _log.warning("route reflector pass failed (BIRD keeps its state): %s", exc)
                self._last_error = str(exc)
                self._next_pass = 0.0
        if fresh and self._last_error is None:
            return max(0.0, self._next_pass - time.monotonic())
        return POLL_SECONDS

    def serve(self, stop: threading.Event) -> None:
        """Rounds until ``stop`` is set (set ``woken`` too, to stop at once)."""
        try:
            while not stop.is_set():
                wait = self.step()
                self.woken.wait(wait)
                self.woken.clear()
        finally:
            if self._mirror is not None:
                self._mirror.stop()

    def _follow(self) -> bool:
        """Is the copy current?  Starts, resumes or reloads it when it is not."""
        mirror = self._mirror
        if mirror is None:
            return False
        if mirror.fresh:
            return True
        try:
            mirror.start()
        except CalicnmError as exc:
            _log.debug("cannot follow etcd's changes (%s); reading etcd instead", exc)
            return False
        return mirror.fresh


def run(
    store: Store,
    ip: str,
    as_num: int | None,
    cluster_id: str,
    state_dir: str,
    changes: ChangeSource | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT.  ``changes``: the stream to follow
    (normally ``store`` itself); without it every pass reads etcd."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    bird = Bird(state_dir)
    stop = threading.Event()
    loop = ReflectorLoop(store, bird, ip, as_num, cluster_id, changes)

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()
        loop.woken.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    _log.info("route reflector starting ip=%s cluster_id=%s", ip, cluster_id)
    try:
        loop.serve(stop)
    finally:
        bird.stop()
    return 0
