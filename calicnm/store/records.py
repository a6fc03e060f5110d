"""The records layer: the only code that classifies, lists and decodes what
is stored under ``/calicnm/v1``.

``keys`` spells keys; ``parse_key`` is its inverse, turning a key back into
its kind and parts.  Every stored value becomes a record through exactly one
validating constructor per kind (``decode``), so a check added there guards
every reader: the plugin, the agent, the CLI and other hosts' nodes alike.

Failure behaviour: a value or key that does not validate raises
``InvalidRequest`` naming the key when it is read on its own (``network``,
``endpoint``, ``decode_*``).  Listings (``networks``, ``endpoints`` ...)
skip an invalid record instead, and log it once: one bad record must never
stop the plugin, the agent or a command from serving the rest.
``read_snapshot``, which feeds the agent, also lists the skipped records in
``Snapshot.invalid``, which ``calicnm status`` shows.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from calicnm.blocks import Block
from calicnm.endpoint import host_ifname, peer_ifname
from calicnm.errors import CalicnmError, InvalidRequest
from calicnm.model import (
    BgpConfig,
    ClusterNetwork,
    Endpoint,
    Host,
    HostNetworkState,
    IPv4Network,
    Liveness,
    Network,
    Peer,
    Pool,
)
from calicnm.policy import Profile
from calicnm.store import keys
from calicnm.store.kv import KV, Reader
from calicnm.validation import check_host_ip, check_hostname, check_utf8

_log = logging.getLogger(__name__)
T = TypeVar("T")

POOL = "pool"
BLOCK = "block"
AFFINITY = "affinity"
NETWORK = "network"
PROFILE = "profile"
BGP_CONFIG = "bgp-config"
GLOBAL_PEER = "global-peer"
NODE_PEER = "node-peer"
CLUSTER_NETWORK = "cluster-network"
HOST_NETWORK_STATE = "host-network-state"
HOST = "host"
ENDPOINT = "endpoint"
CONFIG = "config"
HOST_ADDRESS = "host-address"
"""A host address's claim (``keys.host_address``): name is the address."""
LIVENESS = "liveness"
"""A running node's liveness record (``keys.liveness``): name is the host."""


@dataclass(frozen=True)
class KeyParts:
    """What a key names: its kind, the host it belongs to (host-scoped kinds
    and affinities) and its last part (a CIDR, an id, a name, a peer IP)."""

    kind: str
    name: str = ""
    host: str | None = None


_FLAT = (
    (keys.POOLS, POOL),
    (keys.BLOCKS, BLOCK),
    (keys.NETWORKS, NETWORK),
    (keys.CLUSTER_NETWORKS, CLUSTER_NETWORK),
    (keys.PROFILES, PROFILE),
    (keys.GLOBAL_PEERS, GLOBAL_PEER),
    (keys.HOST_ADDRESSES, HOST_ADDRESS),
    (keys.LIVENESS, LIVENESS),
    (keys.config(""), CONFIG),
)


def parse_key(key: str) -> KeyParts | None:
    """The kind and parts of ``key``; None for a key this release does not
    know (a newer release's addition, or a stray key)."""
    if key == keys.BGP_CONFIG:
        return KeyParts(BGP_CONFIG)
    for prefix, kind in _FLAT:
        if key.startswith(prefix):
            name = key[len(prefix) :]
            return KeyParts(kind, name) if name and "/" not in name else None
    if key.startswith(keys.AFFINITY):
        host, _, cidr = key[len(keys.AFFINITY) :].partition("/")
        return KeyParts(AFFINITY, cidr, host) if host and cidr and "/" not in cidr else None
    if key.startswith(keys.HOSTS):
        host, _, rest = key[len(keys.HOSTS) :].partition("/")
        if not host:
            return None
        if rest == "meta":
            return KeyParts(HOST, host, host)
        section, _, name = rest.partition("/")
        if not name or "/" in name:
            return None
        if section == "endpoints":
            return KeyParts(ENDPOINT, name, host)
        if section == "peers":
            return KeyParts(NODE_PEER, name, host)
        if section == "cluster-networks":
            return KeyParts(HOST_NETWORK_STATE, name, host)
    return None


def cidr_of(name: str) -> IPv4Network:
    """The CIDR a key part spells (``10.0.0.0-26``); InvalidRequest if none."""
    try:
        return IPv4Network(name.replace("-", "/"))
    except ValueError as exc:
        raise InvalidRequest(f"{name!r} is not a CIDR as keys spell it") from exc


def _parts(kv: KV, kind: str) -> KeyParts:
    parts = parse_key(kv.key)
    if parts is None or parts.kind != kind:
        raise InvalidRequest(f"key {kv.key} is not a key of kind {kind}")
    return parts


def _decoded(kv: KV, kind: str, build: Callable[[KeyParts], T]) -> T:
    parts = _parts(kv, kind)
    try:
        check_utf8(kv.key, "the key")
        check_utf8(kv.value, "the value")
        if parts.host is not None:
            check_hostname(parts.host, "the key's host")
        return build(parts)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{kind} record {kv.key} is invalid: {exc}") from exc


# ---- one validating constructor per kind -----------------------------------


def decode_pool(kv: KV) -> Pool:
    return _decoded(kv, POOL, lambda _p: Pool.from_json(kv.value))


def decode_block(kv: KV) -> Block:
    return _decoded(kv, BLOCK, lambda _p: Block.from_json(kv.value, revision=kv.revision))


def _identified(
    kv: KV, kind: str, parse: Callable[[str], T], identity: Callable[[T], tuple[str, str | None]]
) -> T:
    """Decode a record that names itself, and check it names what its key does
    (its id, and its host for host-scoped kinds)."""

    def build(parts: KeyParts) -> T:
        record = parse(kv.value)
        name, host = identity(record)
        if name != parts.name or (parts.host is not None and host != parts.host):
            raise InvalidRequest(f"it names {name!r}" + (f" on host {host!r}" if host else ""))
        return record

    return _decoded(kv, kind, build)


def decode_network(kv: KV) -> Network:
    return _identified(kv, NETWORK, Network.from_json, lambda n: (n.id, None))


def decode_cluster_network(kv: KV) -> ClusterNetwork:
    return _identified(kv, CLUSTER_NETWORK, ClusterNetwork.from_json, lambda n: (n.name, None))


def decode_host_network_state(kv: KV) -> HostNetworkState:
    return _identified(
        kv, HOST_NETWORK_STATE, HostNetworkState.from_json, lambda s: (s.name, s.host)
    )


def cluster_networks(store: Reader) -> dict[str, ClusterNetwork]:
    """Every cluster network definition, by name (invalid ones left out)."""
    found = _valid(store.list(keys.CLUSTER_NETWORKS), decode_cluster_network)
    return {n.name: n for n in found}


def host_network_states(store: Reader, host: str | None = None) -> list[HostNetworkState]:
    """The nodes' reports on cluster networks (of ``host``, or of all)."""
    return _valid(
        (kv for _, kv in _host_scoped(store, HOST_NETWORK_STATE, host)), decode_host_network_state
    )


def decode_profile(kv: KV) -> Profile:
    """The key, not the stored ``id``, names a profile."""
    return _decoded(kv, PROFILE, lambda p: Profile.from_json(kv.value, p.name))


def decode_endpoint(kv: KV) -> Endpoint:
    """An endpoint whose interface names are the ones its id derives: they
    go into routes, chains and ``iptables-restore`` lines."""

    def parse(raw: str) -> Endpoint:
        endpoint = Endpoint.from_json(raw)
        if (endpoint.interface, endpoint.peer) != (
            host_ifname(endpoint.id),
            peer_ifname(endpoint.id),
        ):
            raise InvalidRequest(
                f"its interfaces {endpoint.interface!r}/{endpoint.peer!r} are not the ones "
                f"its id gives ({host_ifname(endpoint.id)}/{peer_ifname(endpoint.id)})"
            )
        return endpoint

    return _identified(kv, ENDPOINT, parse, lambda e: (e.id, e.host))


def decode_host(kv: KV) -> Host:
    return _identified(kv, HOST, Host.from_json, lambda h: (h.name, h.name))


def decode_host_address(kv: KV) -> str:
    """The host that claims the address a claim's key names."""

    def build(parts: KeyParts) -> str:
        if check_host_ip(parts.name, "the key's address") != parts.name:
            raise InvalidRequest(f"{parts.name!r} is not an address in canonical form")
        return check_hostname(kv.value, "the claiming host")

    return _decoded(kv, HOST_ADDRESS, build)


def decode_liveness(kv: KV) -> Liveness:
    return _identified(kv, LIVENESS, Liveness.from_json, lambda live: (live.host, None))


def decode_peer(kv: KV) -> Peer:
    parts = parse_key(kv.key)
    kind = parts.kind if parts is not None and parts.kind == NODE_PEER else GLOBAL_PEER
    return _decoded(kv, kind, lambda _p: Peer.from_json(kv.value))


def decode_bgp_config(kv: KV | None) -> BgpConfig:
    """The global BGP settings; their defaults while none are stored."""
    if kv is None:
        return BgpConfig()
    return _decoded(kv, BGP_CONFIG, lambda _p: BgpConfig.from_json(kv.value))


def decode_affinity(kv: KV) -> tuple[str, IPv4Network]:
    """(host, block) of an affinity marker: the host owns the block."""

    def build(parts: KeyParts) -> tuple[str, IPv4Network]:
        return parts.host or "", cidr_of(parts.name)

    return _decoded(kv, AFFINITY, build)


# ---- listings ------------------------------------------------------------------


_warned: dict[str, str] = {}
"""Invalid records already logged by a listing (key -> reason)."""


def _valid(kvs: Iterable[KV], decode: Callable[[KV], T]) -> list[T]:
    """The records that decode; each invalid one is logged once per reason."""
    found: list[T] = []
    for kv in kvs:
        try:
            found.append(decode(kv))
        except CalicnmError as exc:
            if _warned.get(kv.key) != str(exc):
                _warned[kv.key] = str(exc)
                _log.warning("a listing left out invalid record %s: %s", kv.key, exc)
    return found


def pools(store: Reader) -> list[Pool]:
    return _valid(store.list(keys.POOLS), decode_pool)


def blocks(store: Reader) -> list[Block]:
    return _valid(store.list(keys.BLOCKS), decode_block)


def block(store: Reader, cidr: IPv4Network) -> Block | None:
    kv = store.get(keys.block(cidr))
    return decode_block(kv) if kv else None


def networks(store: Reader) -> dict[str, Network]:
    """Every network record by id."""
    return {n.id: n for n in _valid(store.list(keys.NETWORKS), decode_network)}


def network(store: Reader, network_id: str) -> Network | None:
    kv = store.get(keys.network(network_id))
    return decode_network(kv) if kv else None


def profiles(store: Reader) -> list[Profile]:
    """Every profile, sorted by name."""
    return sorted(_valid(store.list(keys.PROFILES), decode_profile), key=lambda p: p.name)


def _host_scoped(store: Reader, kind: str, host: str | None) -> Iterator[tuple[KeyParts, KV]]:
    prefix = keys.host_prefix(host) if host else keys.HOSTS
    for kv in store.list(prefix):
        parts = parse_key(kv.key)
        if parts is not None and parts.kind == kind:
            yield parts, kv


def endpoint_kvs(store: Reader, host: str | None = None) -> list[tuple[KeyParts, KV]]:
    """The stored endpoints (of ``host``, or of every host), undecoded."""
    return list(_host_scoped(store, ENDPOINT, host))


def endpoints(store: Reader, host: str | None = None) -> list[Endpoint]:
    """Every endpoint of ``host``, or of every host."""
    return _valid((kv for _, kv in _host_scoped(store, ENDPOINT, host)), decode_endpoint)


def endpoint(store: Reader, host: str, endpoint_id: str) -> tuple[KV, Endpoint] | None:
    kv = store.get(keys.endpoint(host, endpoint_id))
    return (kv, decode_endpoint(kv)) if kv else None


def hosts(store: Reader) -> list[Host]:
    """Every registered host.  Reads the whole ``hosts/`` prefix, endpoints
    included, and keeps the host records: a cost that grows with the
    cluster, so the node never calls it periodically (registration checks an
    address with ``address_holder``, one key, and lists only when that
    address has no claim yet: see ``store.registration``)."""
    return _valid((kv for _, kv in _host_scoped(store, HOST, None)), decode_host)


def host(store: Reader, name: str) -> Host | None:
    kv = store.get(keys.host_meta(name))
    return decode_host(kv) if kv else None


def address_holder(store: Reader, ip: str) -> tuple[KV, str] | None:
    """The claim on host address ``ip`` and the host it names; None while
    unclaimed.  One key read, whatever the cluster's size.  InvalidRequest
    for a claim that does not decode."""
    kv = store.get(keys.host_address(ip))
    return (kv, decode_host_address(kv)) if kv else None


def liveness(store: Reader) -> dict[str, Liveness]:
    """The hosts whose node is running now (its lease is alive), by name:
    one listing of ``liveness/``, a key per running node."""
    return {live.host: live for live in _valid(store.list(keys.LIVENESS), decode_liveness)}


def node_peers(store: Reader, host: str | None = None) -> dict[str, list[Peer]]:
    """Host-specific BGP peers by host."""
    found: dict[str, list[Peer]] = {}
    for parts, kv in _host_scoped(store, NODE_PEER, host):
        for peer in _valid([kv], decode_peer):
            found.setdefault(parts.host or "", []).append(peer)
    return found


def global_peers(store: Reader) -> list[Peer]:
    return _valid(store.list(keys.GLOBAL_PEERS), decode_peer)


def bgp_config(store: Reader) -> BgpConfig:
    return decode_bgp_config(store.get(keys.BGP_CONFIG))


def affinities(store: Reader, host: str | None = None) -> dict[str, list[IPv4Network]]:
    """Blocks by the host that holds affinity for them."""
    prefix = keys.affinity_prefix(host) if host else keys.AFFINITY
    found: dict[str, list[IPv4Network]] = {}
    for owner, cidr in _valid(store.list(prefix), decode_affinity):
        found.setdefault(owner, []).append(cidr)
    return found


def host_counts(store: Reader) -> dict[str, int]:
    """Endpoints per host, counted from keys alone (nothing decoded)."""
    counts: dict[str, int] = {}
    for parts, _kv in _host_scoped(store, ENDPOINT, None):
        counts[parts.host or ""] = counts.get(parts.host or "", 0) + 1
    return counts


def scan(
    store: Reader, prefix: str, kind: str, decode: Callable[[KV], T]
) -> tuple[list[T], dict[str, str]]:
    """Every valid record of ``kind`` under ``prefix``, and the invalid ones
    by key with the reason: for long-running readers that must keep serving
    what is valid (the reflector), where a listing would stop at the first
    bad record."""
    found: list[T] = []
    invalid: dict[str, str] = {}
    for kv in store.list(prefix):
        parts = parse_key(kv.key)
        if parts is not None and parts.kind != kind:
            continue
        try:
            found.append(decode(kv))
        except CalicnmError as exc:
            invalid[kv.key] = str(exc)
    return found, invalid


# ---- the agent's view ------------------------------------------------------------


AGENT_PREFIXES = (
    (keys.PROFILES, PROFILE),
    (keys.NETWORKS, NETWORK),
    (keys.HOSTS, HOST),
    (keys.POOLS, POOL),
    (keys.AFFINITY, AFFINITY),
    (keys.GLOBAL_PEERS, GLOBAL_PEER),
)
"""The listings the agent's input is read from (with the BGP settings key),
and the kind each one holds; under ``keys.HOSTS`` the key says which of host,
endpoint or node peer."""


@dataclass(frozen=True)
class AgentRecord:
    """One key of the agent's input, classified and decoded (``agent_record``).

    ``kind`` is one of PROFILE, NETWORK, HOST, ENDPOINT, NODE_PEER, POOL,
    AFFINITY, GLOBAL_PEER, BGP_CONFIG.  ``value`` is the decoded record
    (for AFFINITY the (host, block) pair), or None when it did not validate;
    ``error`` then says why.  ``name`` is what the key names (a profile's
    name, a peer's host...), empty when the key itself is malformed.
    """

    key: str
    kind: str
    value: object
    error: str | None = None
    name: str = ""
    host: str = ""


_DECODERS: dict[str, Callable[[KV], object]] = {
    PROFILE: decode_profile,
    NETWORK: decode_network,
    HOST: decode_host,
    ENDPOINT: decode_endpoint,
    NODE_PEER: decode_peer,
    POOL: decode_pool,
    AFFINITY: decode_affinity,
    GLOBAL_PEER: decode_peer,
    BGP_CONFIG: decode_bgp_config,
}


def agent_record(kv: KV) -> AgentRecord | None:
    """``kv`` as part of the agent's input, or None when it is not part of it
    (another kind, or a cluster network's per-host state).  Never raises: an
    invalid record comes back with ``value`` None and the reason."""
    key = kv.key
    if key == keys.BGP_CONFIG:
        kind = BGP_CONFIG
    else:
        found = next((k for prefix, k in AGENT_PREFIXES if key.startswith(prefix)), None)
        if found is None:
            return None
        kind = found
    parts = parse_key(key)
    if kind == HOST:
        if parts is None:
            return AgentRecord(key, HOST, None, f"key {key!r} is not a host, endpoint or peer key")
        if parts.kind not in (HOST, ENDPOINT, NODE_PEER):
            return None
        kind = parts.kind
    name = parts.name if parts is not None and parts.kind == kind else ""
    host = (parts.host or "") if parts is not None else ""
    try:
        return AgentRecord(key, kind, _DECODERS[kind](kv), None, name, host)
    except CalicnmError as exc:
        return AgentRecord(key, kind, None, str(exc), name, host)


@dataclass(frozen=True)
class Snapshot:
    """Everything a host's kernel and BGP state derive from, read in one pass.

    ``profiles`` maps a name to None when its record exists but is invalid
    (its chains then drop everything); ``invalid`` lists every record that
    was skipped, with the reason.  Endpoints are kept by host
    (``endpoints_of``); ``endpoints``, every host's, is made on first use,
    so a reader that needs only its own host's never pays for the cluster's.
    Never changed once made: any thread may read it.
    """

    profiles: dict[str, Profile | None]
    networks: dict[str, Network]
    by_host: dict[str, list[Endpoint]]
    hosts: list[Host] = field(default_factory=list)
    pools: list[Pool] = field(default_factory=list)
    affinity: dict[str, list[IPv4Network]] = field(default_factory=dict)
    bgp: BgpConfig = field(default_factory=BgpConfig)
    global_peers: list[Peer] = field(default_factory=list)
    node_peers: dict[str, list[Peer]] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)

    def endpoints_of(self, host: str) -> list[Endpoint]:
        return self.by_host.get(host, [])

    @functools.cached_property
    def endpoints(self) -> list[Endpoint]:
        """Every host's endpoints (in no significant order)."""
        return [e for on_host in self.by_host.values() for e in on_host]


def snapshot_of(found: Iterable[AgentRecord]) -> Snapshot:
    """The snapshot the records make (each key once, in any order)."""
    invalid: dict[str, str] = {}
    profiles_: dict[str, Profile | None] = {}
    networks_: dict[str, Network] = {}
    by_host: dict[str, list[Endpoint]] = {}
    hosts_: list[Host] = []
    node_peers_: dict[str, list[Peer]] = {}
    pools_: list[Pool] = []
    affinity: dict[str, list[IPv4Network]] = {}
    peers: list[Peer] = []
    bgp = BgpConfig()
    for record in found:
        value = record.value
        if record.error is not None:
            invalid[record.key] = record.error
        if record.kind == PROFILE:
            if record.name:
                profiles_[record.name] = value if isinstance(value, Profile) else None
        elif isinstance(value, Network):
            networks_[value.id] = value
        elif isinstance(value, Endpoint):
            by_host.setdefault(value.host, []).append(value)
        elif isinstance(value, Host):
            hosts_.append(value)
        elif isinstance(value, Peer):
            if record.kind == NODE_PEER:
                node_peers_.setdefault(record.host, []).append(value)
            else:
                peers.append(value)
        elif isinstance(value, Pool):
            pools_.append(value)
        elif isinstance(value, BgpConfig):
            bgp = value
        elif isinstance(value, tuple):
            affinity.setdefault(value[0], []).append(value[1])
    return Snapshot(
        profiles_, networks_, by_host, hosts_, pools_, affinity, bgp, peers, node_peers_, invalid
    )


def agent_kvs(store: Reader) -> list[KV]:
    """Every stored key of the agent's input, read from ``store``."""
    found = [kv for prefix, _kind in AGENT_PREFIXES for kv in store.list(prefix)]
    bgp = store.get(keys.BGP_CONFIG)
    return found + ([bgp] if bgp is not None else [])


def read_snapshot(store: Reader) -> Snapshot:
    """The agent's whole input.  Invalid records, and keys of no known shape
    under the prefixes read, are skipped and listed in ``invalid`` (the
    agent logs them, once each)."""
    return snapshot_of(r for kv in agent_kvs(store) if (r := agent_record(kv)) is not None)
