"""The per-host agent (Calico's Felix role): keep the kernel equal to etcd.

Level-triggered: each pass reads the whole desired state (profiles,
networks, endpoints of every host), compiles it, and applies the
difference to the kernel; it never acts on an event's content, only on the
fact that something changed.  So a lost watch event, a restart or a crash
mid-apply cannot leave the host wrong for longer than one pass.

Passes run when the etcd watch reports a change, at least every
``resync`` seconds as a full resync that also repairs drift, and every
second while the watch is down.  If etcd is unreachable a pass fails
before touching the kernel: the last good state stays programmed (nothing
is flushed because the datastore blinked) and the agent keeps retrying.

The agent is the only writer of calicnm's chains, ipsets and endpoint
routes on its host.  After an endpoint's route and chains are in place it
drops a marker file that the plugin's Join waits for, so a container
starts with its policy already enforced.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from calicnm.errors import CalicnmError, DatastoreUnavailable
from calicnm.host.markers import Markers
from calicnm.model import (
    effective_profiles,
)
from calicnm.profiles import CompiledPolicy, LocalEndpoint, compile_policy, tag_members
from calicnm.store import keys
from calicnm.store.kv import Store
from calicnm.store.records import Snapshot, read_snapshot

_log = logging.getLogger(__name__)
T = TypeVar("T")


class Routes(Protocol):
    """What the agent needs from ``host.netlink.HostPlumbing``."""

    def ensure_routes(self, host_if: str, ips: tuple[str, ...], mac: str) -> bool: ...


class Applier(Protocol):
    """What the agent needs from ``host.policy_applier.PolicyApplier``."""

    def apply(self, desired: CompiledPolicy, full: bool = False) -> object: ...


class Agent:
    def __init__(
        self,
        store: Store,
        host: str,
        dataplane: Applier,
        routes: Routes,
        markers: Markers,
        resync: float = 30.0,
        hooks: list[Callable[[Snapshot], bool]] | None = None,
    ) -> None:
        self._store = store
        self._host = host
        self._applier = dataplane
        self._routes = routes
        self._markers = markers
        self._resync = resync
        self._hooks = hooks or []
        self._routed: dict[str, tuple[str, tuple[str, ...], str]] = {}
        self._wake = threading.Event()
        self._cancel_watch: Callable[[], None] | None = None
        self._watch_ok = False
        self.passes = 0
        self.last_error: str | None = None

    # ---- one pass ----------------------------------------------------------

    def reconcile(self, full: bool = False) -> bool:
        """One pass; returns True when something still waits (a veth not
        there yet, a network not named yet), so the caller comes back soon."""
        snapshot = read_snapshot(self._store)
        waiting = False
        for hook in self._hooks:
            # Each hook (network naming, BGP) keeps its own state; one
            # failing must not stop the kernel from being programmed.
            try:
                waiting = hook(snapshot) or waiting
            except CalicnmError as exc:
                _log.warning("agent hook %s failed: %s", getattr(hook, "__name__", hook), exc)
                waiting = True
        local = [e for e in snapshot.endpoints if e.host == self._host]
        every = [
            (
                effective_profiles(e, snapshot.networks.get(e.network_id)),
                tuple(str(ip) for ip in e.ipv4),
            )
            for e in snapshot.endpoints
        ]
        members = tag_members({n: p for n, p in snapshot.profiles.items() if p}, every)
        compiled = [
            LocalEndpoint(
                id=e.id,
                interface=e.interface,
                ips=tuple(str(ip) for ip in e.ipv4),
                profiles=effective_profiles(e, snapshot.networks.get(e.network_id)),
            )
            for e in local
        ]
        used = {name for ep in compiled for name in ep.profiles}
        profiles = {name: snapshot.profiles.get(name) for name in used}
        desired = compile_policy(profiles, compiled, members, snapshot.pools)
        self._applier.apply(desired, full=full)

        programmed = set()
        routed = {} if full else self._routed
        for ep in local:
            want = (ep.interface, tuple(str(ip) for ip in ep.ipv4), ep.mac)
            if routed.get(ep.id) == want or self._routes.ensure_routes(*want):
                routed[ep.id] = want
                programmed.add(ep.id)
            else:
                waiting = True  # the veth is not there (yet)
        self._routed = {k: v for k, v in routed.items() if k in programmed}
        self._markers.sync(programmed)
        self.passes += 1
        return waiting

    # ---- the loop ------------------------------------------------------------

    def wake(self) -> None:
        """Run the next pass now (and notice a stop request at once)."""
        self._wake.set()

    def notify(self, healthy: bool) -> None:
        """Watch callback: a change (True) or a broken watch (False)."""
        if not healthy:
            self._watch_ok = False
        self._wake.set()

    def _ensure_watch(self, watch: Callable[..., Callable[[], None]] | None) -> None:
        if watch is None or self._watch_ok:
            return
        if self._cancel_watch is not None:
            self._cancel_watch()
            self._cancel_watch = None
        try:
            self._cancel_watch = watch(keys.ROOT + "/", self.notify)
            self._watch_ok = True
            _log.info("watching etcd for changes")
        except CalicnmError as exc:
            _log.warning("cannot watch etcd (%s); polling until it answers", exc)

    def run(
        self, stop: threading.Event, watch: Callable[..., Callable[[], None]] | None = None
    ) -> None:
        next_full = 0.0
        while not stop.is_set():
            self._ensure_watch(watch)
            now = time.monotonic()
            full = now >= next_full
            self._wake.clear()
            waiting = False
            try:
                waiting = self.reconcile(full=full)
                if full:
                    next_full = now + self._resync
                self.last_error = None
            except CalicnmError as exc:
                if self.last_error != str(exc):
                    _log.warning("agent pass failed; the kernel keeps its last state: %s", exc)
                self.last_error = str(exc)
                next_full = 0.0  # after any failure the next pass is a full one
                self._watch_ok = self._watch_ok and not isinstance(exc, DatastoreUnavailable)
            timeout = max(0.0, next_full - time.monotonic()) if next_full else 1.0
            if waiting:
                timeout = min(timeout, 0.25)
            if not self._watch_ok:
                timeout = min(timeout, 1.0)
            self._wake.wait(timeout)
        if self._cancel_watch is not None:
            self._cancel_watch()
