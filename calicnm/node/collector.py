"""The ownership collector: what crashes and lost Docker calls left behind.

It observes the four views ``calicnm.ownership`` compares (Docker's
endpoints, this host's endpoint records, its links, the allocations of the
blocks it looks after), finds what no live owner holds, and repairs the
findings that have stayed the same for a grace period.  The node runs it at
start and every ``CALICNM_RECONCILE_INTERVAL`` seconds; ``calicnm ipam check``
runs one observation (and ``--repair`` two, the grace apart).

Failure behaviour: it refuses to look at all (``InvalidRequest``) when the
datastore does not register this host (a wrong ``CALICNM_HOSTNAME`` would
make every link look orphaned), and callers pass the datastore guard, so a
foreign or empty etcd is never acted on.  Every repair re-checks what it is
about to remove under compare-and-swap (the record's revision, the
address's handle) and logs what it did; one failed repair is reported and
the others still run.  Docker not answering only holds back the records
Docker must judge.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from calicnm.endpoint import host_ifname
from calicnm.errors import CalicnmError, InvalidRequest
from calicnm.ipam import Allocator, is_pending, pending_since
from calicnm.model import Endpoint, IPv4Address
from calicnm.node.docker_api import UNREACHABLE
from calicnm.ownership import (
    DEAD_RESERVATION,
    ORPHAN_LINK,
    STALE_RECORD,
    Finding,
    Grace,
    Held,
    Observation,
    find,
    networks_to_ask,
)
from calicnm.store import keys, records
from calicnm.store.kv import Reader, Store, delete_if
from calicnm.store.records import Snapshot

_log = logging.getLogger(__name__)

MIN_GRACE_SECONDS = 5.0
"""The shortest grace the node uses, however short its interval.  A Docker
call in progress is protected by its in-flight marker however long it
takes; the grace covers the gaps between Docker's calls (DeleteEndpoint,
then ReleaseAddress), and a repair that loses such a race is harmless: the
second remover finds the thing gone."""


class Links(Protocol):
    """The host's links, as ``host.netlink.HostPlumbing`` sees them."""

    def links_with_prefix(self, *prefixes: str) -> list[str]: ...

    def remove(self, host_if: str, peer_if: str | None = None) -> bool: ...

    def exists(self, ifname: str) -> bool: ...


class DockerEndpoints(Protocol):
    def ping(self) -> None: ...

    def network_endpoints(self, network_id: str) -> frozenset[str] | None: ...


@dataclass
class SweepReport:
    observation: Observation
    findings: list[Finding]
    repaired: list[Finding] = field(default_factory=list)
    failed: list[tuple[Finding, str]] = field(default_factory=list)

    @property
    def docker_answered(self) -> bool:
        return self.observation.docker is not None

    def counts(self) -> dict[str, int]:
        obs = self.observation
        return {
            "endpoints": len(obs.records),
            "links": sum(1 for n in obs.links if n.startswith("cali")),
            "allocations": len(obs.held),
        }


class OwnershipCollector:
    def __init__(
        self,
        store: Store,
        host: str,
        links: Links,
        docker: DockerEndpoints,
        pending_max_age: float,
        guard: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        busy: Callable[[], frozenset[str]] = frozenset,
        reader: Callable[[], Reader] | None = None,
        decoded: Callable[[], Snapshot | None] | None = None,
    ) -> None:
        """``busy()`` names the ids Docker calls on this host are working on
        (``host.markers.InFlight.active``); they are never findings, and are
        asked again right before each repair.  ``reader()`` gives what a sweep
        reads the datastore through: the agent's in-memory copy while it is
        current (so a sweep costs etcd no read of the cluster), else the
        store.  A copy a moment behind etcd is safe: a finding must be seen
        twice, and every repair re-reads its key or compares its revision in
        etcd itself.  ``decoded()`` gives the agent's latest decoded view of
        the cluster when there is one, so a sweep does not decode every
        endpoint of every host again; the same argument makes it safe.  This
        host's own records are still read through ``reader`` with their
        revisions."""
        self._store = store
        self._reader = reader or (lambda: store)
        self._decoded = decoded or (lambda: None)
        self._host = host
        self._links = links
        self._docker = docker
        self._pending_max_age = pending_max_age
        self._guard = guard
        self._clock = clock
        self._ipam = Allocator(store, host)
        self._busy = busy

    def observe(self) -> Observation:
        """One look at the four views (records first, then links, then
        Docker, so a call in flight shows as a finding that grace holds)."""
        if self._guard is not None:
            self._guard()
        source = self._reader()
        cluster = self._decoded()
        registered = {h.name for h in (cluster.hosts if cluster else records.hosts(source))}
        if self._host not in registered:
            raise InvalidRequest(
                f"host {self._host} is not registered in this datastore; check "
                "CALICNM_HOSTNAME (nothing was checked or changed)"
            )
        mine: list[tuple[Endpoint, int]] = []
        claimed = set()
        for parts, kv in records.endpoint_kvs(source, self._host):
            claimed.add(host_ifname(parts.name))
            try:
                mine.append((records.decode_endpoint(kv), kv.revision))
            except InvalidRequest:
                continue  # the agent reports it; its link stays claimed
        everyone = cluster.endpoints if cluster else records.endpoints(source)
        named: dict[IPv4Address, list[str]] = {}
        for ep in everyone:
            for ip in ep.ipv4:
                named.setdefault(ip, []).append(ep.id)
        network_ids = frozenset(cluster.networks if cluster else records.networks(source))
        now = self._clock()
        held: list[Held] = []
        holders = {}
        for block in records.blocks(source):
            looked_after = block.affinity in (self._host, None) or block.affinity not in registered
            for ordinal, allocation in sorted(block.allocations.items()):
                address = block.address(ordinal)
                holders[address] = allocation
                if not looked_after:
                    continue
                since = pending_since(allocation.handle) if is_pending(allocation.handle) else None
                held.append(Held(address, allocation, None if since is None else now - since))
        busy = self._busy()
        links = frozenset(self._links.links_with_prefix("cali", "tmp"))
        docker: dict[str, frozenset[str] | None] | None = None
        try:
            self._docker.ping()
            docker = {
                network_id: self._docker.network_endpoints(network_id)
                for network_id in sorted(networks_to_ask(tuple(mine), links))
            }
        except UNREACHABLE as exc:
            _log.debug("docker did not answer: %s", exc)
        return Observation(
            host=self._host,
            records=tuple(mine),
            links=links,
            docker=docker,
            held=tuple(held),
            holders=holders,
            endpoint_ids=frozenset(ep.id for ep in everyone),
            named={ip: tuple(ids) for ip, ids in named.items()},
            network_ids=network_ids,
            pending_max_age=self._pending_max_age,
            claimed_links=frozenset(claimed),
            busy=busy,
        )

    def check(self) -> SweepReport:
        """One observation's findings; changes nothing."""
        obs = self.observe()
        return SweepReport(obs, find(obs))

    def sweep(self, grace: Grace) -> SweepReport:
        """Observe, then repair the findings ``grace`` says are due."""
        report = self.check()
        for finding in grace.due(report.findings, self._clock()):
            try:
                if self._guard is not None:
                    self._guard()
                if self._started_since(finding, report.observation):
                    continue
                if self.repair(finding, report.observation):
                    report.repaired.append(finding)
            except CalicnmError as exc:
                _log.warning("could not repair %s %s: %s", finding.kind, finding.subject, exc)
                report.failed.append((finding, str(exc)))
        return report

    def _started_since(self, finding: Finding, obs: Observation) -> bool:
        """Has a Docker call begun working on what ``finding`` is about since
        ``obs`` was taken?"""
        busy = self._busy() - obs.busy
        if not busy:
            return False
        about = {finding.subject, finding.version.split(":", 1)[-1]}
        about |= {h for _a, h in finding.addresses}
        return bool(about & busy) or any(host_ifname(i) == finding.subject for i in busy)

    def repair(self, finding: Finding, obs: Observation) -> bool:
        """Remove what ``finding`` names, if it is still exactly as observed.
        True if something was removed (each step is logged)."""
        if finding.kind == STALE_RECORD:
            return self._remove_record(finding, obs)
        if finding.kind == ORPHAN_LINK:
            return self._remove_link(finding.subject)
        if (
            finding.kind == DEAD_RESERVATION
            and self._store.get(keys.network(_network_of(finding))) is not None
        ):
            return False  # its network's record appeared since (valid or not)
        return self._free(finding)

    def _remove_record(self, finding: Finding, obs: Observation) -> bool:
        seen = obs.record(finding.subject)
        if seen is None:
            return False
        endpoint, revision = seen
        if self._links.exists(endpoint.interface) and not self._links.exists(endpoint.peer):
            return False  # a container took it since: live
        if not delete_if(self._store, keys.endpoint(self._host, endpoint.id), revision):
            return False  # rewritten or deleted since: not the record that was judged
        _log.warning(
            "stale endpoint record removed endpoint=%s network=%s ip=%s (%s)",
            endpoint.id[:12],
            endpoint.network_id[:12],
            ",".join(map(str, endpoint.ipv4)),
            finding.detail,
        )
        if self._links.remove(endpoint.interface, endpoint.peer):
            _log.warning("its veth removed if=%s", endpoint.interface)
        self._free(finding)
        return True

    def _remove_link(self, link: str) -> bool:
        if any(
            host_ifname(parts.name) == link
            for parts, _kv in records.endpoint_kvs(self._store, self._host)
        ):
            return False  # its record appeared since
        if not self._links.remove(link):
            return False
        _log.warning("orphan veth removed if=%s (no endpoint record names it)", link)
        return True

    def _free(self, finding: Finding) -> bool:
        freed = False
        for address, handle in finding.addresses:
            if self._ipam.release_if_held(address, handle):
                _log.warning(
                    "address released ip=%s handle=%s (%s: %s)",
                    address,
                    handle,
                    finding.kind,
                    finding.detail,
                )
                freed = True
        return freed


def _network_of(finding: Finding) -> str:
    return finding.version.split(":", 1)[1]


def node_grace(interval: float) -> Grace:
    """The node's grace: one interval (two sweeps apart), at least
    ``MIN_GRACE_SECONDS``."""
    return Grace(max(interval, MIN_GRACE_SECONDS))
