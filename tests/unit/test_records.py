"""The records layer: every key parsed back into its kind and parts, every
value decoded through its one validating constructor, bad records named."""

import ipaddress

import pytest

from calicnm.blocks import Block
from calicnm.errors import InvalidRequest
from calicnm.model import BgpConfig, Endpoint, Host, Network, Peer, Pool
from calicnm.policy import Profile
from calicnm.store import keys, records
from calicnm.store.kv import KV
from tests.fakes import MemoryStore

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
EID = "ab" * 32
NID = "cd" * 32


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (keys.pool(N("10.0.0.0/16")), records.KeyParts("pool", "10.0.0.0-16")),
        (keys.block(N("10.0.0.0/26")), records.KeyParts("block", "10.0.0.0-26")),
        (keys.affinity("h1", N("10.0.0.0/26")), records.KeyParts("affinity", "10.0.0.0-26", "h1")),
        (keys.network(NID), records.KeyParts("network", NID)),
        (keys.profile("web"), records.KeyParts("profile", "web")),
        (keys.BGP_CONFIG, records.KeyParts("bgp-config")),
        (keys.global_peer("10.1.1.1"), records.KeyParts("global-peer", "10.1.1.1")),
        (keys.node_peer("h1", "10.1.1.1"), records.KeyParts("node-peer", "10.1.1.1", "h1")),
        (keys.host_meta("h1"), records.KeyParts("host", "h1", "h1")),
        (keys.endpoint("h1", EID), records.KeyParts("endpoint", EID, "h1")),
        (keys.config("ready"), records.KeyParts("config", "ready")),
    ],
)
def test_every_key_kind_parses_back(key, expected):
    assert records.parse_key(key) == expected


@pytest.mark.parametrize(
    "key",
    [
        "/calicnm/v1/hosts/h1/endpoints/a/b",
        "/calicnm/v1/hosts/h1/other/x",
        "/calicnm/v1/hosts//meta",
        "/calicnm/v1/profiles/",
        "/calicnm/v1/profiles/a/b",
        "/calicnm/v2/profiles/web",
        "/elsewhere",
    ],
)
def test_unknown_or_malformed_keys_are_not_classified(key):
    assert records.parse_key(key) is None


def test_decoders_check_the_key_against_the_value():
    ep = Endpoint(
        EID, "h1", NID, "cali" + EID[:11], "tmp" + EID[:11], "ee:00:00:00:00:01", (A("10.0.0.2"),)
    )
    assert records.decode_endpoint(KV(keys.endpoint("h1", EID), ep.to_json(), 3)) == ep
    with pytest.raises(InvalidRequest, match=r"endpoint record .* is invalid"):
        records.decode_endpoint(KV(keys.endpoint("h2", EID), ep.to_json(), 3))
    with pytest.raises(InvalidRequest, match="not a key of kind endpoint"):
        records.decode_endpoint(KV(keys.host_meta("h1"), ep.to_json(), 3))
    host = Host("h1", "10.1.1.1")
    assert records.decode_host(KV(keys.host_meta("h1"), host.to_json(), 1)) == host
    with pytest.raises(InvalidRequest):
        records.decode_host(KV(keys.host_meta("h9"), host.to_json(), 1))
    net = Network(NID)
    with pytest.raises(InvalidRequest):
        records.decode_network(KV(keys.network("ef" * 32), net.to_json(), 1))


def test_a_profile_is_named_by_its_key():
    kv = KV(keys.profile("web"), Profile.default("other").to_json(), 1)
    assert records.decode_profile(kv).name == "web"


def test_block_keeps_its_revision_and_bgp_config_has_defaults():
    block = Block.new(N("10.0.0.0/26"), "h1")
    assert records.decode_block(KV(keys.block(block.cidr), block.to_json(), 7)).revision == 7
    assert records.decode_bgp_config(None) == BgpConfig()


def _filled_store() -> MemoryStore:
    store = MemoryStore()
    store.put(keys.pool(N("10.0.0.0/16")), Pool(N("10.0.0.0/16")).to_json())
    store.put(keys.host_meta("h1"), Host("h1", "10.1.1.1").to_json())
    store.put(keys.host_meta("h2"), Host("h2", "10.1.1.2").to_json())
    store.put(keys.node_peer("h1", "10.9.9.9"), Peer("10.9.9.9", 65000).to_json())
    store.put(keys.affinity("h1", N("10.0.0.0/26")), "")
    store.put(keys.profile("web"), Profile.default("web").to_json())
    store.put(keys.network(NID), Network(NID, docker_name="web").to_json())
    for host, eid in (("h1", "a" * 64), ("h1", "b" * 64), ("h2", "c" * 64)):
        ep = Endpoint(
            eid,
            host,
            NID,
            "cali" + eid[:11],
            "tmp" + eid[:11],
            "ee:00:00:00:00:01",
            (A("10.0.0.2"),),
        )
        store.put(keys.endpoint(host, eid), ep.to_json())
    return store


def test_listings_by_kind():
    store = _filled_store()
    assert sorted(h.name for h in records.hosts(store)) == ["h1", "h2"]
    assert [e.id[0] for e in records.endpoints(store, "h1")] == ["a", "b"]
    assert len(records.endpoints(store)) == 3
    assert records.host_counts(store) == {"h1": 2, "h2": 1}
    assert records.node_peers(store) == {"h1": [Peer("10.9.9.9", 65000)]}
    assert records.affinities(store) == {"h1": [N("10.0.0.0/26")]}
    assert [p.name for p in records.profiles(store)] == ["web"]


def test_snapshot_skips_and_lists_invalid_records_and_serves_the_rest():
    store = _filled_store()
    store.put(keys.profile("bad"), '{"inbound_rules": [{"protocol": "bogus"}]}')
    store.put(keys.host_meta("h3"), "not json")
    store.put(keys.affinity("h1", "nonsense"), "")
    snap = records.read_snapshot(store)
    assert snap.profiles["bad"] is None
    assert snap.profiles["web"] == Profile.default("web")
    assert sorted(h.name for h in snap.hosts) == ["h1", "h2"]
    assert len(snap.endpoints) == 3
    assert set(snap.invalid) == {
        keys.profile("bad"),
        keys.host_meta("h3"),
        keys.affinity("h1", "nonsense"),
    }
    # Listings skip the invalid record too, and serve the rest.
    assert sorted(h.name for h in records.hosts(store)) == ["h1", "h2"]
    with pytest.raises(InvalidRequest, match=keys.host_meta("h3")):
        records.host(store, "h3")
