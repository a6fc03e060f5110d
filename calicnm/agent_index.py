"""The agent's model of the datastore, kept by deltas (pure: no I/O).

The agent used to decode the whole datastore and recompute every tag's
members on each pass, so one endpoint created anywhere cost every host work
in proportion to the cluster.  ``AgentIndex`` holds the agent's input
decoded, one record per key, and the indexes derived from it:

- records by kind (profiles, networks, endpoints by host, hosts, pools,
  affinities, BGP settings and peers) and the invalid ones with the reason;
- each endpoint's effective profiles, and which endpoints each profile and
  each network govern;
- tag -> member addresses, as reference counts, with a frozen set per tag
  that is rebuilt only when that tag's members changed.

``apply`` takes the latest value of each changed key (None: deleted) and
touches only what that key feeds: a changed endpoint re-counts its own tag
memberships, a profile whose tags changed re-counts the endpoints it
governs, a network re-binds the endpoints on it.  Every record is decoded
by the records layer (``records.agent_record``) exactly as a fresh read
decodes it, so after any sequence of deltas the index equals one built by
``reset`` from a fresh read of the same keys; ``consistent`` checks that
for the derived indexes, and the unit tests check it for random sequences.

Invariants:

- ``_records`` holds every key of the agent's input seen last, decoded;
  every other structure is a function of it.
- A tag is in ``_members`` only while some address is in it.
- ``snapshot()`` and ``members()`` return the same objects until a change
  touches what they hold; callers must not mutate them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from calicnm.model import (
    BgpConfig,
    Endpoint,
    Host,
    IPv4Network,
    Network,
    Peer,
    Pool,
    effective_profiles,
)
from calicnm.policy import Profile
from calicnm.profiles import tag_members
from calicnm.store.kv import KV
from calicnm.store.records import (
    AFFINITY,
    BGP_CONFIG,
    GLOBAL_PEER,
    HOST,
    NODE_PEER,
    POOL,
    PROFILE,
    AgentRecord,
    Snapshot,
    agent_record,
)

TagRef = tuple[str, str]
"""(tag, address): one endpoint's contribution to one tag."""


class AgentIndex:
    """The agent's input, decoded and indexed, kept current by deltas."""

    def __init__(self) -> None:
        self._records: dict[str, AgentRecord] = {}
        self._raw: dict[str, str] = {}
        self._clear()
        self.decoded = 0
        """Records decoded so far (a measure of the work deltas cost)."""

    def _clear(self) -> None:
        self._profiles: dict[str, Profile | None] = {}
        self._networks: dict[str, Network] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._by_host: dict[str, dict[str, Endpoint]] = {}
        self._hosts: dict[str, Host] = {}
        self._node_peers: dict[str, tuple[str, Peer]] = {}
        self._global_peers: dict[str, Peer] = {}
        self._pools: dict[str, Pool] = {}
        self._affinity: dict[str, tuple[str, IPv4Network]] = {}
        self._bgp: BgpConfig | None = None
        self._invalid: dict[str, str] = {}
        self._effective: dict[str, tuple[str, ...]] = {}
        self._governed: dict[str, set[str]] = {}  # profile name -> endpoint keys
        self._on_network: dict[str, set[str]] = {}  # network id -> endpoint keys
        self._refs: dict[str, tuple[TagRef, ...]] = {}  # endpoint key -> its tag refs
        self._members: dict[str, dict[str, int]] = {}  # tag -> address -> count
        self._frozen: dict[str, frozenset[str]] = {}
        self._stale_tags: set[str] = set()
        self._snapshot: Snapshot | None = None
        self._host_lists: dict[str, list[Endpoint]] = {}
        self._stale_hosts: set[str] = set()

    # ---- input ----------------------------------------------------------------

    def reset(self, kvs: Iterable[KV]) -> None:
        """Take ``kvs`` as the whole input.  A record whose stored value is
        unchanged is not decoded again."""
        previous, raw = self._records, self._raw
        self._records, self._raw = {}, {}
        self._clear()
        for kv in kvs:
            old = previous.get(kv.key)
            if old is not None and raw.get(kv.key) == kv.value:
                self._records[kv.key] = old
                self._raw[kv.key] = kv.value
                self._add(old)
            else:
                self._put(kv)

    def apply(self, changes: Mapping[str, KV | None]) -> None:
        """Apply the latest value of each changed key (None: deleted)."""
        for key, kv in changes.items():
            if kv is not None and self._raw.get(key) == kv.value:
                continue  # a repeat (a resumed stream sends some changes again)
            old = self._records.pop(key, None)
            self._raw.pop(key, None)
            if old is not None and old.kind == PROFILE and kv is not None:
                # A new version of a profile: its endpoints are re-counted
                # once, and only if its tags changed.
                self._invalid.pop(key, None)
                self._put(kv)
                continue
            if old is not None:
                self._remove(old)
            if kv is not None:
                self._put(kv)

    def _put(self, kv: KV) -> None:
        record = agent_record(kv)
        if record is None:
            return
        self.decoded += 1
        self._records[kv.key] = record
        self._raw[kv.key] = kv.value
        self._add(record)

    # ---- records by kind --------------------------------------------------------

    def _add(self, record: AgentRecord) -> None:
        self._snapshot = None
        key, value = record.key, record.value
        if record.error is not None:
            self._invalid[key] = record.error
        if record.kind == PROFILE:
            if record.name:
                self._set_profile(record.name, value if isinstance(value, Profile) else None)
        elif isinstance(value, Endpoint):
            self._add_endpoint(key, value)
        elif isinstance(value, Network):
            self._networks[value.id] = value
            self._rebind(value.id)
        elif isinstance(value, Host):
            self._hosts[key] = value
        elif isinstance(value, Peer):
            if record.kind == NODE_PEER:
                self._node_peers[key] = (record.host, value)
            else:
                self._global_peers[key] = value
        elif isinstance(value, Pool):
            self._pools[key] = value
        elif isinstance(value, BgpConfig):
            self._bgp = value
        elif isinstance(value, tuple):
            self._affinity[key] = value

    def _remove(self, record: AgentRecord) -> None:
        self._snapshot = None
        key, value = record.key, record.value
        self._invalid.pop(key, None)
        if record.kind == PROFILE:
            if record.name:
                self._set_profile(record.name, None, gone=True)
        elif isinstance(value, Endpoint):
            self._remove_endpoint(key, value)
        elif isinstance(value, Network):
            if self._networks.get(value.id) is value:
                del self._networks[value.id]
                self._rebind(value.id)
        elif record.kind == HOST:
            self._hosts.pop(key, None)
        elif record.kind == NODE_PEER:
            self._node_peers.pop(key, None)
        elif record.kind == GLOBAL_PEER:
            self._global_peers.pop(key, None)
        elif record.kind == POOL:
            self._pools.pop(key, None)
        elif record.kind == BGP_CONFIG:
            self._bgp = None
        elif record.kind == AFFINITY:
            self._affinity.pop(key, None)

    def _set_profile(self, name: str, profile: Profile | None, gone: bool = False) -> None:
        before = self._profiles.get(name)
        if gone:
            self._profiles.pop(name, None)
        else:
            self._profiles[name] = profile
        old_tags = before.tags if before is not None else ()
        new_tags = profile.tags if profile is not None and not gone else ()
        if old_tags != new_tags:
            for endpoint_key in list(self._governed.get(name, ())):
                self._recount(endpoint_key)

    # ---- endpoints and their tags ----------------------------------------------

    def _add_endpoint(self, key: str, endpoint: Endpoint) -> None:
        self._endpoints[key] = endpoint
        self._by_host.setdefault(endpoint.host, {})[key] = endpoint
        self._stale_hosts.add(endpoint.host)
        self._on_network.setdefault(endpoint.network_id, set()).add(key)
        self._bind(key, endpoint)

    def _remove_endpoint(self, key: str, endpoint: Endpoint) -> None:
        self._unbind(key)
        self._endpoints.pop(key, None)
        on_host = self._by_host.get(endpoint.host, {})
        on_host.pop(key, None)
        if not on_host:
            self._by_host.pop(endpoint.host, None)
        self._stale_hosts.add(endpoint.host)
        _discard(self._on_network, endpoint.network_id, key)

    def _bind(self, key: str, endpoint: Endpoint) -> None:
        """Work out the endpoint's profiles from its network, then its tags."""
        names = effective_profiles(endpoint, self._networks.get(endpoint.network_id))
        self._effective[key] = names
        for name in names:
            self._governed.setdefault(name, set()).add(key)
        self._recount(key)

    def _unbind(self, key: str) -> None:
        for name in self._effective.pop(key, ()):
            _discard(self._governed, name, key)
        self._count(self._refs.pop(key, ()), -1)

    def _rebind(self, network_id: str) -> None:
        """The network changed: its endpoints may be governed by other profiles."""
        for key in list(self._on_network.get(network_id, ())):
            self._unbind(key)
            self._bind(key, self._endpoints[key])

    def _recount(self, key: str) -> None:
        """Replace the endpoint's tag references with what its profiles give now."""
        endpoint = self._endpoints[key]
        addresses = [str(ip) for ip in endpoint.ipv4]
        refs = tuple(
            (tag, ip)
            for name in self._effective.get(key, ())
            if (profile := self._profiles.get(name)) is not None
            for tag in profile.tags
            for ip in addresses
        )
        old = self._refs.get(key, ())
        if refs == old:
            return
        self._count(old, -1)
        self._count(refs, +1)
        self._refs[key] = refs

    def _count(self, refs: Iterable[TagRef], step: int) -> None:
        for tag, ip in refs:
            counts = self._members.setdefault(tag, {})
            left = counts.get(ip, 0) + step
            if left > 0:
                counts[ip] = left
            else:
                counts.pop(ip, None)
                if not counts:
                    del self._members[tag]
            self._stale_tags.add(tag)

    # ---- output -----------------------------------------------------------------

    def members(self) -> dict[str, frozenset[str]]:
        """tag -> the addresses of every endpoint (any host) one of whose
        valid profiles carries the tag; a tag without members is absent.
        Each set stays the same object until its members change."""
        for tag in self._stale_tags:
            counts = self._members.get(tag)
            if counts is None:
                self._frozen.pop(tag, None)
            elif self._frozen.get(tag) != counts.keys():
                self._frozen[tag] = frozenset(counts)
        self._stale_tags.clear()
        return self._frozen

    def effective(self, endpoint: Endpoint) -> tuple[str, ...]:
        """The profiles governing ``endpoint`` (which must be in the index)."""
        return effective_profiles(endpoint, self._networks.get(endpoint.network_id))

    def snapshot(self) -> Snapshot:
        """The input as a ``records.Snapshot`` (what a fresh ``read_snapshot``
        of the same keys gives, but for the order of the records in its
        lists); the same object until something changes.  Costs the copy of
        what changed kinds hold, and of each changed host's endpoint list:
        never a list of every endpoint."""
        for host in self._stale_hosts:
            on_host = self._by_host.get(host)
            if on_host:
                self._host_lists[host] = list(on_host.values())
            else:
                self._host_lists.pop(host, None)
        self._stale_hosts.clear()
        if self._snapshot is None:
            node_peers: dict[str, list[Peer]] = {}
            for host, peer in self._node_peers.values():
                node_peers.setdefault(host, []).append(peer)
            affinity: dict[str, list[IPv4Network]] = {}
            for host, block in self._affinity.values():
                affinity.setdefault(host, []).append(block)
            self._snapshot = Snapshot(
                profiles=dict(self._profiles),
                networks=dict(self._networks),
                by_host=dict(self._host_lists),
                hosts=list(self._hosts.values()),
                pools=list(self._pools.values()),
                affinity=affinity,
                bgp=self._bgp or BgpConfig(),
                global_peers=list(self._global_peers.values()),
                node_peers=node_peers,
                invalid=dict(self._invalid),
            )
        return self._snapshot

    def consistent(self) -> bool:
        """Do the derived tag members equal a computation from scratch?  (The
        agent asks on each full resync, as a guard against a bug here.)"""
        every = [
            (self.effective(e), tuple(str(ip) for ip in e.ipv4)) for e in self._endpoints.values()
        ]
        valid = {name: p for name, p in self._profiles.items() if p is not None}
        fresh = {tag: frozenset(ips) for tag, ips in tag_members(valid, every).items() if ips}
        return fresh == self.members()

    def rebuild(self) -> None:
        """Derive everything again from the decoded records."""
        records = list(self._records.values())
        self._clear()
        for record in records:
            self._add(record)

    def __len__(self) -> int:
        return len(self._records)


def _discard(index: dict[str, set[str]], name: str, key: str) -> None:
    keys = index.get(name)
    if keys is not None:
        keys.discard(key)
        if not keys:
            del index[name]


__all__ = ["AgentIndex", "TagRef"]
