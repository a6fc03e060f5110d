"""Who owns what on one host: finding what no live owner holds (pure).

Four views of a host are compared (``Observation``):
- Docker's endpoints on each network a suspect record names, read through
  the Docker API, or ``None`` when dockerd did not answer;
- this host's endpoint records (with their etcd revisions);
- this host's links in the host namespace (``cali*`` and ``tmp*``);
- the IPAM allocations of the blocks this host looks after: those affine to
  it, and those nobody registered owns.

``find`` turns one observation into ``Finding`` s.  Repairable kinds:
- ``stale-record``: an endpoint record that no container uses: its host
  interface is gone, or its peer is still in the host namespace (no
  container holds it), and Docker answered and has no such endpoint;
- ``orphan-link``: a ``cali`` link that no endpoint record of this host
  names (a CreateEndpoint cut short before its record);
- ``stale-pending``: an address Docker requested longer ago than the bound
  that no endpoint or network claimed and no record names;
- ``dead-handle``: an address held for an endpoint that has no record on
  any host;
- ``dead-reservation``: a ``--gateway`` or ``--aux-address`` reservation of
  a network that has no record.

Report-only kinds (nothing here can prove who is right):
``waiting-for-docker`` (a record without its interface while dockerd does
not answer), ``shared-address`` (two records name one address) and
``unheld-address`` (a record names an address not allocated to it).

Invariant: nothing is found dead on a guess.  Nothing a Docker call on this
host is working on right now (``Observation.busy``) is a finding.  A record whose interface is
in a container is never a finding, whatever Docker says; a record is only
found stale when Docker answered; everything else is proven by the
datastore itself.  Races with calls in flight are the caller's to exclude
with ``Grace``: a finding is acted on only once the same finding (the same
record revision, the same handle) has been seen at least the grace period
apart, longer than any one Docker call.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from calicnm.blocks import Allocation
from calicnm.endpoint import host_ifname
from calicnm.model import Endpoint, IPv4Address

STALE_RECORD = "stale-record"
ORPHAN_LINK = "orphan-link"
STALE_PENDING = "stale-pending"
DEAD_HANDLE = "dead-handle"
DEAD_RESERVATION = "dead-reservation"
WAITING_FOR_DOCKER = "waiting-for-docker"
SHARED_ADDRESS = "shared-address"
UNHELD_ADDRESS = "unheld-address"

REPAIRABLE = (STALE_RECORD, ORPHAN_LINK, STALE_PENDING, DEAD_HANDLE, DEAD_RESERVATION)
REPORTED = (WAITING_FOR_DOCKER, SHARED_ADDRESS, UNHELD_ADDRESS)

HOST_LINK = re.compile(r"cali[0-9a-f]{11}\Z")
"""A calicnm endpoint's host interface (``endpoint.host_ifname``); other
links named ``cali...`` are not endpoints and never findings."""
_ID = re.compile(r"[0-9a-f]{64}\Z")
_PENDING = "docker-pending"
_RESERVATION = re.compile(r"(gateway|aux):([0-9a-f]{64})\Z")


class Held(NamedTuple):
    """One allocated address of a block this host looks after."""

    address: IPv4Address
    allocation: Allocation
    age: float | None
    """Seconds since a pending handle was made (None: not pending, or a
    legacy pending handle without a time)."""


@dataclass(frozen=True)
class Observation:
    host: str
    records: tuple[tuple[Endpoint, int], ...]
    """This host's endpoint records, each with its etcd revision."""
    links: frozenset[str]
    """Names of this host's ``cali*`` and ``tmp*`` links (host namespace)."""
    docker: Mapping[str, frozenset[str] | None] | None
    """For each network id asked about: the endpoint ids Docker has on it,
    or None if Docker does not know the network.  None: dockerd did not
    answer, so no record is judged by Docker's view."""
    held: tuple[Held, ...]
    """Allocations in the blocks this host looks after."""
    holders: Mapping[IPv4Address, Allocation]
    """Every allocated address of every block (for the records' check)."""
    endpoint_ids: frozenset[str]
    """Ids of the endpoint records of every host."""
    named: Mapping[IPv4Address, tuple[str, ...]]
    """Address -> ids of the endpoint records (any host) that name it."""
    network_ids: frozenset[str]
    pending_max_age: float
    claimed_links: frozenset[str] = frozenset()
    """Host interfaces named by this host's endpoint keys, valid records or
    not: a record that cannot be read still protects its link."""
    busy: frozenset[str] = frozenset()
    """Endpoint and network ids a Docker call on this host is working on
    right now (``host.markers.InFlight``): never findings, however long the
    call takes."""

    def record(self, endpoint_id: str) -> tuple[Endpoint, int] | None:
        return next((r for r in self.records if r[0].id == endpoint_id), None)


@dataclass(frozen=True)
class Finding:
    kind: str
    subject: str
    """What it is about: an endpoint id, a link name or an address."""
    detail: str
    version: str = ""
    """What must not have changed for the finding to be the same one: a
    record's revision, an address's handle."""
    addresses: tuple[tuple[IPv4Address, str], ...] = field(default=())
    """Addresses to free with it, each with the handle that must still hold it."""

    @property
    def repairable(self) -> bool:
        return self.kind in REPAIRABLE

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.subject, self.version)

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "detail": self.detail,
            "repairable": self.repairable,
        }


def networks_to_ask(records: tuple[tuple[Endpoint, int], ...], links: frozenset[str]) -> set[str]:
    """The networks whose Docker view can decide a record: those of records
    no container holds (see ``find``).  Live records cost no Docker call."""
    return {ep.network_id for ep, _rev in records if not _in_container(ep, links)}


def _in_container(endpoint: Endpoint, links: frozenset[str]) -> bool:
    """The host interface exists and its peer left the host namespace."""
    return endpoint.interface in links and endpoint.peer not in links


def find(obs: Observation) -> list[Finding]:
    """Every finding of one observation, sorted by kind then subject."""
    found: list[Finding] = []
    stale_ids: set[str] = set()
    for endpoint, revision in obs.records:
        if _in_container(endpoint, obs.links) or endpoint.id in obs.busy:
            continue
        gone = endpoint.interface not in obs.links
        where = "its interface is gone" if gone else "no container holds its interface"
        if obs.docker is None:
            if gone:
                found.append(
                    Finding(
                        WAITING_FOR_DOCKER,
                        endpoint.id,
                        f"{where}; Docker does not answer, so the record is kept",
                        str(revision),
                    )
                )
            continue
        known = obs.docker.get(endpoint.network_id)
        if known is not None and endpoint.id in known:
            continue  # Docker still has it (it will delete it itself)
        docker_view = (
            f"Docker has no such endpoint on network {endpoint.network_id[:12]}"
            if known is not None
            else f"Docker does not know its network {endpoint.network_id[:12]}"
        )
        frees = tuple(
            (ip, obs.holders[ip].handle)
            for ip in endpoint.ipv4
            if ip in obs.holders
            and (obs.holders[ip].handle == endpoint.id or _is_pending(obs.holders[ip].handle))
        )
        stale_ids.add(endpoint.id)
        found.append(
            Finding(
                STALE_RECORD,
                endpoint.id,
                f"{where}, and {docker_view}",
                str(revision),
                frees,
            )
        )
    named_here = {ep.interface for ep, _rev in obs.records} | obs.claimed_links
    named_here |= {host_ifname(ident) for ident in obs.busy}
    for link in sorted(obs.links):
        if HOST_LINK.match(link) and link not in named_here:
            found.append(Finding(ORPHAN_LINK, link, "no endpoint record of this host names it"))
    for endpoint, _revision in obs.records:
        if endpoint.id in stale_ids or endpoint.id in obs.busy:
            continue
        for ip in endpoint.ipv4:
            held = obs.holders.get(ip)
            if held is None or (held.handle != endpoint.id and not _is_pending(held.handle)):
                holder = f"held by {held.handle}" if held else "free"
                found.append(
                    Finding(
                        UNHELD_ADDRESS,
                        str(ip),
                        f"endpoint {endpoint.id[:12]} names it, but it is {holder}",
                        held.handle if held else "",
                    )
                )
    for ip, ids in sorted(obs.named.items()):
        if len(ids) > 1 and any(obs.record(i) for i in ids):
            found.append(
                Finding(
                    SHARED_ADDRESS,
                    str(ip),
                    f"named by endpoints {', '.join(sorted(i[:12] for i in ids))}",
                    ",".join(sorted(ids)),
                )
            )
    found += _allocation_findings(obs)
    return sorted(found, key=lambda f: (f.kind, f.subject))


def _allocation_findings(obs: Observation) -> list[Finding]:
    found = []
    for held in obs.held:
        handle = held.allocation.handle
        ip = held.address
        free = ((ip, handle),)
        if _is_pending(handle):
            if held.age is not None and held.age > obs.pending_max_age and ip not in obs.named:
                found.append(
                    Finding(
                        STALE_PENDING,
                        str(ip),
                        f"requested {held.age:.0f}s ago and never claimed",
                        handle,
                        free,
                    )
                )
        elif (reservation := _RESERVATION.match(handle)) is not None:
            network_id = reservation.group(2)
            if network_id not in obs.network_ids and network_id not in obs.busy:
                found.append(
                    Finding(
                        DEAD_RESERVATION,
                        str(ip),
                        f"{reservation.group(1)} of network {network_id[:12]}, which has no record",
                        handle,
                        free,
                    )
                )
        elif _ID.match(handle) and handle not in obs.endpoint_ids and handle not in obs.busy:
            found.append(
                Finding(
                    DEAD_HANDLE,
                    str(ip),
                    f"held for endpoint {handle[:12]}, which has no record on any host",
                    handle,
                    free,
                )
            )
    return found


def _is_pending(handle: str) -> bool:
    return handle == _PENDING or handle.startswith(_PENDING + ":")


class Grace:
    """Findings become due once seen at least ``seconds`` apart.

    A finding that disappears, or changes version (the record was rewritten,
    the address changed hands), starts again.  ``seconds`` must exceed the
    longest a Docker call can hold a half-made state (a CreateEndpoint
    between its veth and its record, a DeleteEndpoint before ReleaseAddress),
    so an in-flight call is never raced."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._first: dict[tuple[str, str, str], float] = {}

    def due(self, findings: list[Finding], now: float) -> list[Finding]:
        current = {f.key for f in findings}
        self._first = {k: t for k, t in self._first.items() if k in current}
        for f in findings:
            self._first.setdefault(f.key, now)
        return [f for f in findings if f.repairable and now - self._first[f.key] >= self.seconds]
