"""The per-host agent (Calico's Felix role): keep the kernel equal to etcd.

Level-triggered in what it guarantees: each pass compiles the whole desired
state of this host (its endpoints' chains, the tag ipsets and top chains
they need, routes, BIRD's configuration) from the agent's model of the
datastore and applies the difference to the kernel, so a lost event, a
restart or a crash mid-apply cannot leave the host wrong for longer than
one pass.  Incremental in what it costs: the model (``agent_index.AgentIndex``)
is kept by deltas, so a change anywhere in the cluster costs each host the
decoding of that one record, the re-count of the tags it touches and the
recompilation of this host's chains whose inputs changed
(``profiles.CompileCache``); the applier then writes only what differs.

The deltas come from a copy of the datastore kept in memory
(``store.mirror.PrefixMirror``): read whole once, then kept current by
etcd's change stream, whose events carry each change's key and value.  The
copy is read whole again only at start and when the stream's history has
been compacted away (a stream that merely broke resumes from its
revision); the model then takes the whole copy again, decoding only the
records whose values changed.  While there is no stream (etcd down, or a
store without one) every pass reads the datastore itself.  The periodic
drift repair compares the kernel with the model and reads nothing; it
also checks the model's derived indexes against a computation from
scratch and rebuilds them, logging an error, if they ever differ.

Passes run when the stream reports a change, at least every ``resync``
seconds as a full resync that also repairs drift, and every second while
the stream is down.  Twice a second the agent also checks,
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
routes on its host, and of the same-host fast path (``host.fastpath``:
its map and its tc attachments) when the node runs one.  After an
endpoint's route and chains are in place it drops a marker file that the
plugin's Join waits for, so a container starts with its policy already
enforced.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

from calicnm import faults
from calicnm.agent_index import AgentIndex
from calicnm.errors import CalicnmError, DatastoreUnavailable
from calicnm.host.markers import AgentStatus, Markers, StatusFile
from calicnm.model import Network
from calicnm.profiles import (
    CompileCache,
    CompiledPolicy,
    FastPathEntry,
    HostFacts,
    LocalEndpoint,
    compile_policy,
)
from calicnm.routing.encap import tunnel_routes
from calicnm.store import keys
from calicnm.store.identity import DatastoreGuard
from calicnm.store.kv import ChangeSource, Reader, Store
from calicnm.store.mirror import PrefixMirror
from calicnm.store.records import Snapshot, agent_kvs

_log = logging.getLogger(__name__)
T = TypeVar("T")


class Routes(Protocol):
    """What the agent needs from ``host.netlink.HostPlumbing``."""

    def ensure_routes(self, host_if: str, ips: tuple[str, ...], mac: str) -> bool: ...


class FastPathPort(Protocol):
    """What the agent needs from ``host.fastpath.FastPath``."""

    def withdraw(self, plan: Mapping[str, FastPathEntry]) -> int: ...

    def apply(self, plan: Mapping[str, FastPathEntry], full: bool) -> int: ...


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
        fast_path: FastPathPort | None = None,
    ) -> None:
        """``on_pass(seconds, ok)`` is told of every pass (metrics).  ``fast_path``, if
        given, is kept equal to each pass's plan: its entries are withdrawn before the
        chains are written and added after (see ``host.fastpath``)."""
        self._store = store
        self._fast_path = fast_path
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
        # The datastore decoded and indexed, kept by the stream's deltas; and
        # whether it was last filled from etcd itself (the copy then hands
        # over all it holds once it is current again).
        self._index = AgentIndex()
        self._index_from_store = True
        self._compile_cache = CompileCache()
        self._decoded: Snapshot | None = None
        self._decoded_revision = -1
        self._index_revision = -1
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
        self._refresh_index()
        index = self._index
        if full and not index.consistent():
            _log.error("the agent's indexes differ from a full computation; rebuilding them")
            index.rebuild()
        snapshot = index.snapshot()
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
        local = snapshot.endpoints_of(self._host)
        compiled = [
            LocalEndpoint(
                id=e.id,
                interface=e.interface,
                ips=tuple(str(ip) for ip in e.ipv4),
                profiles=index.effective(e),
                internal=_internal(snapshot.networks.get(e.network_id)),
                mac=e.mac,
            )
            for e in local
        ]
        used = {name for ep in compiled for name in ep.profiles}
        profiles = {name: snapshot.profiles.get(name) for name in used}
        facts = host_facts(snapshot, self._host, self._endpoint_to_host)
        if full:
            self._compile_cache = CompileCache()  # a full pass compiles everything anew
        desired = compile_policy(
            profiles, compiled, index.members(), snapshot.pools, facts, self._compile_cache
        )
        if self._fast_path is not None and self._fast_path.withdraw(desired.fast_path):
            faults.point("after-fast-path-withdraw")
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
        if self._fast_path is not None:
            self._fast_path.apply(desired.fast_path, full)
        self.passes += 1
        self._decoded, self._decoded_revision = snapshot, self._index_revision
        return waiting

    def _refresh_index(self) -> None:
        """Bring the index up to the datastore as of the last stream report:
        the copy's changes since the last pass while the stream runs (none at
        all for a drift repair with nothing new), or the whole copy after the
        index was last filled from etcd; a read of etcd itself while the copy
        is not current.  A report that arrives meanwhile wakes the next pass.

        The datastore must be the one this host serves (``DatastoreGuard``):
        an empty or foreign etcd is never taken as the truth.  The copy's
        cluster id is checked once its changes are taken (it is as new as
        they are, or newer; no etcd read); etcd's before and after reading
        it.  A failed check raises before anything reaches the kernel."""
        mirror = self._mirror
        if self._watch_ok and mirror is not None and mirror.fresh:
            delta = mirror.take_delta(whole=self._index_from_store)
            self._index_revision = delta.revision
            if delta.reset:
                self._index.reset(kv for kv in delta.changes.values() if kv is not None)
            else:
                self._index.apply(delta.changes)
            self._index_from_store = False
            if self._guard is not None:
                self._guard.check(mirror)
            return
        if self._guard is not None:
            self._guard.check()
        kvs = agent_kvs(self._store)
        if self._guard is not None:
            self._guard.check()
        self._index.reset(kvs)
        self._index_from_store = True
        self._index_revision = -1
        self.reads += 1

    def datastore_reader(self) -> Reader:
        """What another reader on this host (the ownership collector) can read
        the datastore through: the in-memory copy, frozen, while its stream
        runs; else the store itself."""
        mirror = self._mirror
        if self._watch_ok and mirror is not None and mirror.fresh:
            return mirror.view()
        return self._store

    def current_copy(self) -> PrefixMirror | None:
        """The in-memory copy while its stream keeps it current, else None:
        for a one-key read (the datastore's cluster id) that need not go to
        etcd."""
        mirror = self._mirror
        return mirror if self._watch_ok and mirror is not None and mirror.fresh else None

    def decoded_view(self) -> Snapshot | None:
        """The cluster as the last completed pass decoded it, for another
        reader on this host (the ownership collector): only while it is as
        current as the in-memory copy (the copy has applied nothing since the
        pass took its changes, and its stream runs); else None, and the
        reader decodes the copy itself.  A snapshot is never changed once
        made, so any thread may read it."""
        mirror = self._mirror
        if (
            self._watch_ok
            and mirror is not None
            and mirror.fresh
            and self._decoded_revision == mirror.revision
        ):
            return self._decoded
        return None

    @property
    def full_reads(self) -> int:
        """Whole reads of the datastore: the copy's loads plus passes without it."""
        return self.reads + (self._mirror.reloads if self._mirror is not None else 0)

    @property
    def decoded(self) -> int:
        """Records decoded so far: what deltas, resets and reads cost."""
        return self._index.decoded

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
        self._wake.set()

    def follow(self, changes: ChangeSource | None) -> bool:
        """Keep the in-memory copy current: start it, or resume or reload it
        after its stream ended (``run`` calls this before each pass).  False
        when it cannot: passes then read etcd themselves, and the next call
        tries again."""
        if changes is None:
            return False
        if self._watch_ok:
            return True
        if self._mirror is None:
            self._mirror = PrefixMirror(changes, keys.ROOT + "/", self._mirror_changed)
        try:
            self._mirror.start()
        except CalicnmError as exc:
            _log.warning("cannot follow etcd's changes (%s); polling until it answers", exc)
            return False
        self._watch_ok = True
        self._wake.set()
        _log.info("following etcd's changes from revision %d", self._mirror.revision)
        return True

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
            self.follow(changes)
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
            datapath=self.datapath,
        )

    @property
    def datapath(self) -> str:
        if self._fast_path is None:
            return "iptables"
        return "iptables, with the tc/BPF same-host fast path"

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
