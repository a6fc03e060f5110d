"""The driver never leaks and never double-claims: what each Docker call
leaves behind when a step fails, when calls overlap, and when Docker's
undo calls come (or do not).  Through the real Flask app, over
``HookedStore`` and ``FakePlumbing``; assertions are on the resulting
datastore and host state.
"""

import ipaddress
import json

import pytest

from calicnm.driver import Driver
from calicnm.errors import DatastoreUnavailable
from calicnm.ipam import Allocator, pending_since
from calicnm.model import Endpoint, Network, Pool
from calicnm.plugin_api import build_app
from calicnm.store import keys
from calicnm.store.edits import update_endpoint_profiles
from tests.fakes import FakePlumbing, HookedStore

A = ipaddress.IPv4Address
NID = "6f49939a5d861b88bab9633a90df9206d74f387e13a58e07639c41910427ffb7"
EID = "629601b5fa245ddf93ea239eb288111b92d6781bedeebcb340ccdf43a081ea34"
EID2 = "8b8b6394a1dd0c1f2e3d4c5b6a79881726354433221100ffeeddccbbaa998877"
SANDBOX = "/var/run/docker/netns/837d34a2ff2b"
NOW = 1_700_000_000
GW_OPTS = {"RequestAddressType": "com.docker.network.gateway"}


class Rig:
    def __init__(self):
        self.store = HookedStore()
        self.plumbing = FakePlumbing()
        self.ipam = Allocator(self.store, "h1", sleep=lambda s: None)
        self.ipam.add_pool(Pool(ipaddress.IPv4Network("10.0.0.0/26")))
        self.now = float(NOW)
        self.driver = Driver(self.store, self.ipam, self.plumbing, "h1", clock=lambda: self.now)
        self.client = build_app(self.driver).test_client()

    def call(self, method, body=None):
        resp = self.client.post(f"/{method}", data=json.dumps(body or {}))
        return resp.status_code, json.loads(resp.data)

    def ok(self, method, body=None):
        status, payload = self.call(method, body)
        assert status == 200, payload
        return payload

    def network(self, pool="0.0.0.0/0", gateway="169.254.1.1/32", aux=None, nid=NID):
        data = {"AddressSpace": "CalicnmLocal", "Pool": pool, "Gateway": gateway}
        if aux is not None:
            data["AuxAddresses"] = aux
        return self.call("NetworkDriver.CreateNetwork", {"NetworkID": nid, "IPv4Data": [data]})

    def request(self, address="", pool_id="calicnm:any", options=None):
        body = {"PoolID": pool_id, "Address": address, "Options": options}
        return self.ok("IpamDriver.RequestAddress", body)["Address"].split("/")[0]

    def create(self, addr, eid=EID, mac=""):
        iface = {"Address": f"{addr}/32", "MacAddress": mac}
        body = {"NetworkID": NID, "EndpointID": eid, "Interface": iface}
        return self.call("NetworkDriver.CreateEndpoint", body)

    def holder(self, addr):
        held = self.ipam.info(A(addr)).holder
        return None if held is None else (held.handle, held.kind)

    def endpoint_keys(self):
        return [k for k in self.store.all_keys() if "/endpoints/" in k]


@pytest.fixture
def rig():
    return Rig()


# ---- 1: CreateEndpoint undoes what it made, whatever fails ---------------------


def fail_block_writes(rig):
    """Every write of an IPAM block fails (the claim cannot be made); other
    writes (the endpoint record, its removal) still work."""

    def hook(keys_written):
        if any("/blocks/" in k for k in keys_written):
            raise DatastoreUnavailable("etcd is unreachable: test")

    rig.store.before_write = hook


def test_a_failed_claim_takes_the_record_and_the_veth_away_again(rig):
    assert rig.network()[0] == 200
    addr = rig.request()
    fail_block_writes(rig)
    status, payload = rig.create(addr)
    assert status == 503, payload
    assert rig.endpoint_keys() == []
    assert rig.plumbing.links == {}
    rig.store.before_write = None
    # Docker releases the address after the failure: nothing is left.
    rig.ok("IpamDriver.ReleaseAddress", {"PoolID": "calicnm:any", "Address": addr})
    assert rig.holder(addr) is None


def test_an_address_taken_between_check_and_claim_undoes_the_endpoint(rig):
    rig.network()
    addr = rig.request()

    def someone_takes_it(keys_written):
        if keys.endpoint("h1", EID) in keys_written:
            rig.store.before_write = None
            rig.ipam.set_handle(A(addr), EID2)

    rig.store.before_write = someone_takes_it
    status, payload = rig.create(addr)
    assert status == 409 and f"endpoint {EID2}" in payload["Err"]
    assert rig.endpoint_keys() == [] and rig.plumbing.links == {}
    assert rig.holder(addr) == (EID2, "endpoint")


def test_a_failed_record_write_removes_the_veth(rig):
    rig.network()
    addr = rig.request()

    def fail_record(keys_written):
        if keys.endpoint("h1", EID) in keys_written:
            rig.store.after_write = None
            raise DatastoreUnavailable("etcd is unreachable: reply lost (test)")

    rig.store.after_write = fail_record  # the record is written, the reply lost
    status, _ = rig.create(addr)
    assert status == 503
    assert rig.endpoint_keys() == [] and rig.plumbing.links == {}
    assert pending_since(rig.holder(addr)[0]) == NOW


def test_an_address_held_by_someone_else_is_refused_before_anything_is_made(rig):
    rig.network()
    addr = rig.request()
    assert rig.create(addr, EID)[0] == 200
    before = rig.store.contents()
    status, payload = rig.create(addr, EID2)
    assert status == 409 and EID in payload["Err"]
    assert rig.store.contents() == before
    assert list(rig.plumbing.links) == ["cali629601b5fa2"]
    status, payload = rig.create("172.16.0.9", EID2)
    assert status == 400 and "outside every calicnm pool" in payload["Err"]


def test_a_free_address_is_claimed_by_create_endpoint(rig):
    """Nobody holds it (a pending request was reaped): the endpoint claims it,
    so its record never names an address IPAM could hand out again."""
    rig.network()
    assert rig.create("10.0.0.9")[0] == 200
    assert rig.holder("10.0.0.9") == (EID, "endpoint")


# ---- 2: ReleaseAddress while an endpoint holds the address ----------------------


def test_release_address_refuses_while_a_live_endpoint_holds_it(rig):
    rig.network()
    addr = rig.request()
    rig.create(addr)
    before = rig.store.contents()
    status, payload = rig.call(
        "IpamDriver.ReleaseAddress", {"PoolID": "calicnm:any", "Address": addr}
    )
    assert status == 409
    assert (
        f"endpoint {EID[:12]}" in payload["Err"] and "delete the endpoint first" in payload["Err"]
    )
    assert rig.store.contents() == before
    assert rig.holder(addr) == (EID, "endpoint")


def test_release_address_finishes_an_interrupted_delete_endpoint(rig):
    rig.network()
    addr = rig.request()
    rig.create(addr)
    rig.plumbing.links.clear()  # DeleteEndpoint removed the veth, then etcd failed
    rig.ok("IpamDriver.ReleaseAddress", {"PoolID": "calicnm:any", "Address": addr})
    assert rig.endpoint_keys() == []
    assert rig.holder(addr) is None


def test_a_requested_address_held_by_an_endpoint_is_refused_as_in_use(rig):
    rig.network()
    addr = rig.request()
    rig.create(addr)
    before = rig.store.contents()
    status, payload = rig.call(
        "IpamDriver.RequestAddress", {"PoolID": "calicnm:any", "Address": addr}
    )
    assert status == 409 and "already in use" in payload["Err"] and EID[:12] in payload["Err"]
    assert rig.store.contents() == before


def test_the_normal_order_releases_after_delete_endpoint(rig):
    rig.network()
    addr = rig.request()
    rig.create(addr)
    rig.ok("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID})
    rig.ok("IpamDriver.ReleaseAddress", {"PoolID": "calicnm:any", "Address": addr})
    assert rig.holder(addr) is None


# ---- 3: pending requests carry their time ---------------------------------------


def test_request_address_stamps_the_pending_handle_and_stale_ones_are_reaped(rig):
    rig.network()
    lost = rig.request()  # Docker never heard back
    rig.now += 30
    used = rig.request()
    rig.create(used)
    assert [(str(p.address), p.age) for p in rig.ipam.pending(NOW + 100)] == [(lost, 100)]
    assert rig.ipam.release_stale_pending(NOW + 100, max_age=60) == [A(lost)]
    assert rig.holder(lost) is None and rig.holder(used) == (EID, "endpoint")


# ---- 4: gateway and aux reservations belong to their network --------------------


def test_gateway_and_aux_reservations_are_freed_with_their_network(rig):
    pool_id = rig.ok("IpamDriver.RequestPool", {"Pool": "10.0.0.0/26"})["PoolID"]
    assert rig.request("10.0.0.1", pool_id, GW_OPTS) == "10.0.0.1"
    assert rig.request("10.0.0.5", pool_id) == "10.0.0.5"  # --aux-address
    status, payload = rig.network("10.0.0.0/26", "10.0.0.1/26", {"host1": "10.0.0.5/26"})
    assert status == 200, payload
    assert rig.holder("10.0.0.1") == (f"gateway:{NID}", "gateway")
    assert rig.holder("10.0.0.5") == (f"aux:{NID}", "aux")
    assert rig.ipam.pending(NOW) == []
    rig.ok("NetworkDriver.DeleteNetwork", {"NetworkID": NID})
    assert rig.holder("10.0.0.1") is None and rig.holder("10.0.0.5") is None
    # Docker's own releases afterwards find them free.
    rig.ok("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": "10.0.0.1"})
    rig.ok("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": "10.0.0.5"})
    rig.ok("IpamDriver.ReleasePool", {"PoolID": pool_id})


def test_a_legacy_gateway_handle_is_freed_with_its_network(rig):
    rig.ipam.assign(rig.ipam.request_pool(None, None), "gateway:10.0.0.1", "gateway", A("10.0.0.1"))
    network = Network(NID, ipv4_pools=("10.0.0.0/26",), ipv4_gateway="10.0.0.1/26")
    rig.store.put(keys.network(NID), network.to_json())
    rig.ok("NetworkDriver.DeleteNetwork", {"NetworkID": NID})
    assert rig.holder("10.0.0.1") is None


def test_a_network_refused_for_a_taken_gateway_writes_nothing(rig):
    rig.network()
    rig.create("10.0.0.1")
    before = rig.store.contents()
    status, payload = rig.network("10.0.0.0/26", "10.0.0.1/26", {"a": "10.0.0.7/26"}, nid=EID2)
    assert status == 409 and "already in use" in payload["Err"]
    assert rig.store.contents() == before


def test_create_network_again_is_idempotent_for_its_reservations(rig):
    pool_id = rig.ok("IpamDriver.RequestPool", {"Pool": "10.0.0.0/26"})["PoolID"]
    rig.request("10.0.0.1", pool_id, GW_OPTS)
    assert rig.network("10.0.0.0/26", "10.0.0.1/26")[0] == 200
    assert rig.network("10.0.0.0/26", "10.0.0.1/26")[0] == 200
    assert rig.holder("10.0.0.1") == (f"gateway:{NID}", "gateway")


# ---- 8: endpoint edits are compare-and-swapped ----------------------------------


def profile_set_lands_before(rig, key):
    """``calicnm endpoint profile set`` lands between the driver's read of
    the record and its write."""
    done: list[bool] = []

    def hook(keys_written):
        if key in keys_written and not done:
            done.append(True)
            update_endpoint_profiles(rig.store, EID, lambda _: ("ops",), host="h1")

    rig.store.before_write = hook
    return done


@pytest.mark.parametrize("call", ["Join", "Leave", "CreateEndpoint"])
def test_an_overlapping_profile_set_is_not_reverted(rig, call):
    rig.network()
    addr = rig.request()
    rig.create(addr)
    if call == "Leave":
        rig.ok("NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX})
    landed = profile_set_lands_before(rig, keys.endpoint("h1", EID))
    if call == "CreateEndpoint":  # Docker repeats it (the retry path), with a MAC this time
        assert rig.create(addr, mac="ee:01:02:03:04:05")[0] == 200
    else:
        body = {"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX}
        rig.ok(f"NetworkDriver.{call}", body)
    assert landed
    stored = Endpoint.from_json(rig.store.get(keys.endpoint("h1", EID)).value)
    assert stored.profiles == ("ops",)
    assert stored.sandbox == (SANDBOX if call == "Join" else None)
    if call == "CreateEndpoint":
        assert stored.mac == "ee:01:02:03:04:05"
