"""The etcd key layout, version 1: the only place that spells a key.

``records.parse_key`` is the inverse: nothing else takes a key apart.

Every process (plugin, node, CLI, every host) reads and writes through these
builders, so the layout is a contract between hosts running different
releases.  Only backward-compatible additions belong here; a change of shape
means a new ``/calicnm/v2`` root and a migration, not an edit.

    /calicnm/v1/config/<name>                       global settings (JSON)
    /calicnm/v1/config/cluster-id                   this datastore's identity
    /calicnm/v1/ipam/v4/pools/<cidr>                Pool
    /calicnm/v1/ipam/v4/blocks/<cidr>               Block (one CAS unit)
    /calicnm/v1/ipam/v4/affinity/<host>/<cidr>      "" marker: host owns block
    /calicnm/v1/networks/<network id>               Network (CreateNetwork data)
    /calicnm/v1/profiles/<name>                     Profile (tags and rules)
    /calicnm/v1/bgp/config                          BgpConfig (node mesh, default AS)
    /calicnm/v1/bgp/peers/<ip>                      Peer every host peers with
    /calicnm/v1/hosts/<host>/peers/<ip>             Peer of that host only
    /calicnm/v1/hosts/<host>/meta                   Host registration
    /calicnm/v1/hosts/<host>/endpoints/<id>         Endpoint on that host
    /calicnm/v1/host-addresses/<ip>                 host name: the host claiming <ip>
    /calicnm/v1/liveness/<host>                     Liveness, on the node's etcd lease

The last two live outside ``hosts/`` so that checking one address reads one
key, and so that the agent's snapshot (which lists ``hosts/``) never sees
them.

CIDRs appear in keys with ``/`` replaced by ``-`` (``10.0.0.0-26``).
"""

from __future__ import annotations

import ipaddress

ROOT = "/calicnm/v1"


def _cidr(cidr: ipaddress.IPv4Network | str) -> str:
    return str(cidr).replace("/", "-")


def config(name: str) -> str:
    return f"{ROOT}/config/{name}"


CLUSTER_ID = f"{ROOT}/config/cluster-id"
POOLS = f"{ROOT}/ipam/v4/pools/"
BLOCKS = f"{ROOT}/ipam/v4/blocks/"
AFFINITY = f"{ROOT}/ipam/v4/affinity/"
NETWORKS = f"{ROOT}/networks/"
HOSTS = f"{ROOT}/hosts/"
CLUSTER_NETWORKS = f"{ROOT}/cluster-networks/"
HOST_ADDRESSES = f"{ROOT}/host-addresses/"
LIVENESS = f"{ROOT}/liveness/"
PROFILES = f"{ROOT}/profiles/"
BGP_CONFIG = f"{ROOT}/bgp/config"
GLOBAL_PEERS = f"{ROOT}/bgp/peers/"


def global_peer(ip: str) -> str:
    return GLOBAL_PEERS + ip


def node_peers_prefix(host: str) -> str:
    return f"{HOSTS}{host}/peers/"


def node_peer(host: str, ip: str) -> str:
    return node_peers_prefix(host) + ip


def profile(name: str) -> str:
    return PROFILES + name


def pool(cidr: ipaddress.IPv4Network | str) -> str:
    return POOLS + _cidr(cidr)


def block(cidr: ipaddress.IPv4Network | str) -> str:
    return BLOCKS + _cidr(cidr)


def affinity_prefix(host: str) -> str:
    return f"{AFFINITY}{host}/"


def affinity(host: str, cidr: ipaddress.IPv4Network | str) -> str:
    return affinity_prefix(host) + _cidr(cidr)


def network(network_id: str) -> str:
    return NETWORKS + network_id


def host_prefix(host: str) -> str:
    return f"{HOSTS}{host}/"


def host_meta(host: str) -> str:
    return f"{host_prefix(host)}meta"


def endpoints_prefix(host: str) -> str:
    return f"{host_prefix(host)}endpoints/"


def endpoint(host: str, endpoint_id: str) -> str:
    return endpoints_prefix(host) + endpoint_id


def cluster_network(name: str) -> str:
    return f"{CLUSTER_NETWORKS}{name}"


def host_network_state(host: str, name: str) -> str:
    return f"{HOSTS}{host}/cluster-networks/{name}"


def host_address(ip: str) -> str:
    """The claim on host address ``ip``: its value names the one host that
    registered it (see ``store.registration``)."""
    return HOST_ADDRESSES + ip


def liveness(host: str) -> str:
    """``host``'s liveness record, attached to its node's etcd lease: present
    exactly while that node runs (see ``node.liveness``)."""
    return LIVENESS + host
