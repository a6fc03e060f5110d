"""The per-host agent (Calico's Felix role): keep the kernel equal to etcd.

Level-triggered: each pass compiles the whole desired state (profiles,
networks, endpoints of every host) from a snapshot of the datastore and
applies the difference to the kernel; it never acts on an event's content,
only on the fact that something changed.  So a lost watch event, a restart
or a crash mid-apply cannot leave the host wrong for longer than one pass.

The snapshot comes from a copy of the datastore kept in memory
(``store.mirror.PrefixMirror``): read whole once, then kept current by
etcd's change stream, whose events carry each change's key and value.  A
change therefore costs each agent one event, not a read of the cluster.
The copy is read whole again only at start, when the stream's history has
been compacted away (a stream that merely broke resumes from its revision),
and the snapshot is decoded from it again only after the stream reported
something: the periodic drift repair compiles the kept snapshot and costs
etcd nothing.  While there is no stream (etcd down, or a store without one)
every pass reads the datastore itself.  Passes run when the stream reports
a change, at least every ``resync`` seconds as a full resync that also
repairs drift, and every second while the stream is down.  Twice a second the agent also checks,
cheaply, that its jumps are still rule 1 of FORWARD, INPUT, POSTROUTING and
dockerd's DOCKER-USER and that its chains still hold rules; if anything
moved (an outside ``iptables -F``, a dockerd restart) a full pass follows at
once.  If etcd is unreachable a pass fails before touching the kernel: the
last good state stays programmed (nothing is flushed because the datastore
blinked) and the agent keeps retrying.

The agent cannot die quietly.  Every pass catches every exception, logs
it (once per distinct failure), backs off (1 s doubling to 8 s) and
records the outcome in its status file (``host.markers.AgentStatus``):
the time of the last good pass, the last error and the stored records it
skipped as invalid.  Join and ``calicnm status`` read that file; the node
restarts the agent thread if it ever ends.

The agent is the only writer of calicnm's chains, ipsets and endpoint
routes on its host.  After an endpoint's route and chains are in place it
drops a marker file that the plugin's Join waits for, so a container
starts with its policy already enforced.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from calicnm.errors import CalicnmError, DatastoreUnavailable
from calicnm.host.markers import AgentStatus, Markers, StatusFile
from calicnm.model import Network, effective_profiles
from calicnm.profiles import (
    CompiledPolicy,
    HostFacts,
    LocalEndpoint,
    compile_policy,
    tag_members,
)
from calicnm.routing.encap import tunnel_routes
from calicnm.store import keys
from calicnm.store.identity import DatastoreGuard
from calicnm.store.kv import ChangeSource, Reader, Store
from calicnm.store.mirror import PrefixMirror
from calicnm.store.records import Snapshot, read_snapshot

_log = logging.getLogger(__name__)
T = TypeVar("T")


class Routes(Protocol):
    """What the agent needs from ``host.netlink.HostPlumbing``."""

    def ensure_routes(self, host_if: str, ips: tuple[str, ...], mac: str) -> bool: ...


class Applier(Protocol):
    """What the agent needs from ``host.policy_applier.PolicyApplier``."""

    def apply(self, desired: CompiledPolicy, full: bool = False) -> object: ...

    def jumps_in_place(self) -> bool: ...


CHECK_SECONDS = 0.5
"""How often the jumps and top chains are checked between passes."""
BACKOFF_LIMIT = 8.0
"""Longest wait between retries of a failing pass."""


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
        endpoint_to_host: str = "drop",
        status: StatusFile | None = None,
        clock: Callable[[], float] = time.time,
        guard: DatastoreGuard | None = None,
        on_pass: Callable[[float, bool], None] | None = None,
    ) -> None:
        """``on_pass(seconds, ok)`` is told of every pass (metrics)."""
        self._store = store
        self._on_pass = on_pass or (lambda _seconds, _ok: None)
        self._host = host
        self._applier = dataplane
        self._routes = routes
        self._markers = markers
        self._resync = resync
        self._hooks = hooks or []
        self._routed: dict[str, tuple[str, tuple[str, ...], str]] = {}
        self._wake = threading.Event()
        self._watch_ok = False
        self.passes = 0
        self.last_error: str | None = None
        self._endpoint_to_host = endpoint_to_host
        self._status = status
        self._clock = clock
        self._last_good: float | None = None
        self._busy_since: float | None = None
        self._invalid: dict[str, str] = {}
        self._guard = guard
        # What the watch has reported (changes, breaks, a new watch), and the
        # snapshot read after the last of them: while the watch is up and
        # reports nothing, a pass (the periodic drift repair included)
        # compiles that snapshot again instead of re-reading etcd.
        self._events = 0
        self._events_lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._snapshot_events = -1
        self._mirror: PrefixMirror | None = None
        self.reads = 0
        """Passes that read the datastore itself (no change stream running)."""

    # ---- one pass ----------------------------------------------------------

    @property
    def local_endpoints(self) -> int:
        """Endpoints of this host that the last pass routed and programmed."""
        return len(self._routed)

    def reconcile(self, full: bool = False) -> bool:
        """One pass; returns True when something still waits (a veth not
        there yet, a network not named yet), so the caller comes back soon."""
        started = time.monotonic()
        ok = False
        try:
            waiting = self._reconcile(full)
            ok = True
            return waiting
        finally:
            self._on_pass(time.monotonic() - started, ok)

    def _reconcile(self, full: bool) -> bool:
        # The datastore must be the one this host serves, before and after
        # the read: an empty or foreign etcd is never taken as the truth.
        if self._guard is not None:
            self._guard.check()
        snapshot = self._current_snapshot()
        self._note_invalid(snapshot.invalid)
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
                internal=_internal(snapshot.networks.get(e.network_id)),
            )
            for e in local
        ]
        used = {name for ep in compiled for name in ep.profiles}
        profiles = {name: snapshot.profiles.get(name) for name in used}
        facts = host_facts(snapshot, self._host, self._endpoint_to_host)
        desired = compile_policy(profiles, compiled, members, snapshot.pools, facts)
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

    def _current_snapshot(self) -> Snapshot:
        """The datastore as of the last stream report: the kept snapshot when
        the stream runs and has reported nothing since; else decoded from the
        in-memory copy when it is current, or read from etcd when it is not
        (checked against the datastore guard once more after the read).  A
        report that arrives meanwhile leaves the counter ahead of the
        snapshot, so the next pass takes a newer one."""
        with self._events_lock:
            events = self._events
        mirror = self._mirror
        fresh = self._watch_ok and mirror is not None and mirror.fresh
        if fresh and self._snapshot is not None and self._snapshot_events == events:
            return self._snapshot
        if fresh and mirror is not None:
            snapshot = read_snapshot(mirror.view())
        else:
            snapshot = read_snapshot(self._store)
            if self._guard is not None:
                self._guard.check()
            self.reads += 1
        self._snapshot, self._snapshot_events = snapshot, events
        return snapshot

    def datastore_reader(self) -> Reader:
        """What another reader on this host (the ownership collector) can read
        the datastore through: the in-memory copy, frozen, while its stream
        runs; else the store itself."""
        mirror = self._mirror
        if self._watch_ok and mirror is not None and mirror.fresh:
            return mirror.view()
        return self._store

    @property
    def full_reads(self) -> int:
        """Whole reads of the datastore: the copy's loads plus passes without it."""
        return self.reads + (self._mirror.reloads if self._mirror is not None else 0)

    def _count_event(self) -> None:
        with self._events_lock:
            self._events += 1

    def first_pass(self) -> None:
        """One full pass before the node serves Docker; recorded in the status
        file like any other.  Raises what the pass raises."""
        self.reconcile(full=True)
        self._last_good = self._clock()
        self._report()

    # ---- the loop ------------------------------------------------------------

    def wake(self) -> None:
        """Run the next pass now (and notice a stop request at once)."""
        self._wake.set()

    def _mirror_changed(self) -> None:
        """The copy's callback: a batch applied, or its stream ended."""
        mirror = self._mirror
        if mirror is not None and not mirror.fresh:
            self._watch_ok = False
        self._count_event()
        self._wake.set()

    def _ensure_stream(self, changes: ChangeSource | None) -> None:
        """Keep the in-memory copy current: start it, or resume or reload it
        after its stream ended.  On failure the pass reads etcd itself and
        the next loop tries again."""
        if changes is None or self._watch_ok:
            return
        if self._mirror is None:
            self._mirror = PrefixMirror(changes, keys.ROOT + "/", self._mirror_changed)
        try:
            self._mirror.start()
        except CalicnmError as exc:
            _log.warning("cannot follow etcd's changes (%s); polling until it answers", exc)
            return
        self._watch_ok = True
        self._count_event()
        self._wake.set()
        _log.info("following etcd's changes from revision %d", self._mirror.revision)

    def run(self, stop: threading.Event, changes: ChangeSource | None = None) -> None:
        """Passes until ``stop`` is set.  Never raises: every failure is
        logged, backed off and recorded in the status file."""
        next_full = 0.0
        next_check = 0.0
        next_pass = 0.0  # sooner than the timers: something was waiting
        failures = 0
        moved = 0  # checks in a row that found the jumps out of place
        reported: str | None = None
        while not stop.is_set():
            self._ensure_stream(changes)
            now = time.monotonic()
            if now >= next_check:
                # First, whatever else is due: a stream of passes (every etcd
                # write wakes one) must never postpone the check.
                next_check = now + CHECK_SECONDS
                if self._safe_check():
                    moved = 0
                else:
                    moved += 1
                    if moved <= 3:
                        _log.warning(
                            "calicnm's jumps or chains were moved or flushed from outside; "
                            "re-asserting them"
                        )
                        next_full = 0.0
                    else:
                        # Still out of place right after re-asserting: something
                        # keeps undoing it.  Say so, and retry at the resync pace
                        # rather than twice a second.
                        _log.error("calicnm's jumps keep being moved; re-asserting on each resync")
                        next_check = now + self._resync
                self._report()
            if self._wake.is_set() or now >= min(next_full, next_pass) or failures:
                full = now >= next_full
                self._wake.clear()
                waiting = False
                self._busy_since = self._clock()
                self._report()
                try:
                    waiting = self.reconcile(full=full)
                    if full:
                        # From the pass's end: a slow full pass is followed by
                        # cheap ones, never by another full one at once.
                        next_full = time.monotonic() + self._resync
                    self.last_error = None
                    self._last_good = self._clock()
                    failures = 0
                    reported = None
                except Exception as exc:  # the agent must never die of a pass
                    failures += 1
                    next_full = 0.0  # after any failure the next pass is a full one
                    self.last_error = (
                        f"{type(exc).__name__}: {exc}"
                        if not isinstance(exc, CalicnmError)
                        else str(exc)
                    )
                    if reported != self.last_error:
                        if isinstance(exc, CalicnmError):
                            _log.warning(
                                "agent pass failed; the kernel keeps its last state: %s", exc
                            )
                        else:
                            _log.exception("agent pass failed unexpectedly; retrying")
                        reported = self.last_error
                    if isinstance(exc, DatastoreUnavailable):
                        self._watch_ok = False
                finally:
                    self._busy_since = None
                self._report()
                if failures:
                    # Back off; an etcd event (or a stop) cuts the wait short.
                    self._wake.wait(min(BACKOFF_LIMIT, 2.0 ** (failures - 1)))
                    continue
                # A veth not there yet, or a watch that is down: come back
                # soon without waiting for an event.
                soon = 0.25 if waiting else 1.0 if not self._watch_ok else None
                next_pass = time.monotonic() + soon if soon is not None else float("inf")
                continue
            deadline = min(next_check, next_full, next_pass)
            self._wake.wait(max(0.0, deadline - time.monotonic()))
        if self._mirror is not None:
            self._mirror.stop()
        self._watch_ok = False  # a later run starts the stream again

    # ---- health -----------------------------------------------------------------

    def _safe_check(self) -> bool:
        try:
            return self._applier.jumps_in_place()
        except Exception:
            _log.exception("checking calicnm's jumps failed")
            return False

    def _note_invalid(self, invalid: dict[str, str]) -> None:
        """Log each invalid record once (and once more when it changes or is
        fixed), however often passes see it."""
        for key, reason in invalid.items():
            if self._invalid.get(key) != reason:
                _log.error("skipping invalid record %s: %s", key, reason)
        for key in set(self._invalid) - set(invalid):
            _log.info("record %s is valid again (or gone)", key)
        self._invalid = dict(invalid)

    def status(self) -> AgentStatus:
        return AgentStatus(
            pid=os.getpid(),
            updated=self._clock(),
            last_good=self._last_good,
            busy_since=self._busy_since,
            last_error=self.last_error,
            passes=self.passes,
            invalid=dict(self._invalid),
        )

    def _report(self) -> None:
        if self._status is None:
            return
        try:
            self._status.write(self.status())
        except OSError as exc:
            _log.warning("cannot write the agent status %s: %s", self._status.path, exc)


def _internal(network: Network | None) -> bool:
    return network is not None and network.internal


def host_facts(snapshot: Snapshot, host: str, endpoint_to_host: str) -> HostFacts:
    """How this host protects itself, from the snapshot: which hosts may
    send it tunnel traffic, and which inner sources the VXLAN device may
    carry (other hosts' blocks and borrowed addresses, and their addresses)."""
    vxlan = any(p.vxlan for p in snapshot.pools)
    ipip = any(p.ipip for p in snapshot.pools)
    peers = frozenset(h.ip for h in snapshot.hosts if h.name != host and h.ip)
    sources: frozenset[str] = frozenset()
    if vxlan:
        routes = tunnel_routes(
            "vxlan", host, snapshot.hosts, snapshot.pools, snapshot.affinity, snapshot.endpoints
        )
        sources = frozenset({str(r.dst) for r in routes} | {f"{ip}/32" for ip in peers})
    return HostFacts(
        endpoint_to_host=endpoint_to_host,
        vxlan=vxlan,
        ipip=ipip,
        peer_hosts=peers,
        tunnel_sources=sources,
    )
