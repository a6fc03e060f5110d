"""EtcdStore's leases against a real etcd: keepalives make no revision, an
expired lease takes its keys with it, a revoked one at once; and host
registration's address claims on the same etcd."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from calicnm.errors import Conflict, LeaseLost
from calicnm.model import Host, Liveness
from calicnm.node.liveness import Heartbeat
from calicnm.store import keys, records
from calicnm.store.etcd import EtcdStore
from calicnm.store.registration import register_host, unregister_host

pytestmark = pytest.mark.etcd

KEY = keys.liveness("h1")


def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s")
        time.sleep(0.1)


def revision(store: EtcdStore) -> int:
    return store.list_at("/calicnm/")[1]


def test_keepalives_make_no_revision(etcd_store: EtcdStore) -> None:
    lease = etcd_store.grant_lease(2)
    try:
        etcd_store.put_leased(KEY, "alive", lease)
        at = revision(etcd_store)
        # Four seconds: twice the TTL, so without the keepalives it would be gone.
        for _ in range(8):
            assert etcd_store.keep_alive(lease) > 0
            time.sleep(0.5)
        assert etcd_store.get(KEY).value == "alive"
        assert revision(etcd_store) == at
    finally:
        etcd_store.revoke_lease(lease)


def test_expiry_deletes_the_key(etcd_store: EtcdStore) -> None:
    lease = etcd_store.grant_lease(2)
    etcd_store.put_leased(KEY, "alive", lease)
    assert etcd_store.get(KEY) is not None
    wait_until(lambda: etcd_store.get(KEY) is None)
    assert etcd_store.keep_alive(lease) == 0
    with pytest.raises(LeaseLost):
        etcd_store.put_leased(KEY, "again", lease)
    assert etcd_store.revoke_lease(lease) is False


def test_revoke_deletes_the_key_at_once(etcd_store: EtcdStore) -> None:
    lease = etcd_store.grant_lease(30)
    etcd_store.put_leased(KEY, "alive", lease)
    assert etcd_store.revoke_lease(lease) is True
    assert etcd_store.get(KEY) is None


def test_a_heartbeat_comes_back_after_its_lease_expired(etcd_store: EtcdStore) -> None:
    record = Liveness("h1", 1, 1700000000.0, "test")
    heartbeat = Heartbeat(etcd_store, record, ttl=2)
    heartbeat.beat()
    assert records.liveness(etcd_store) == {"h1": record}
    wait_until(lambda: not records.liveness(etcd_store))  # no beats: it expires
    heartbeat.beat()
    assert heartbeat.grants == 2
    assert records.liveness(etcd_store) == {"h1": record}
    assert heartbeat.release() is True
    assert records.liveness(etcd_store) == {}


def test_address_claims_on_etcd(etcd_store: EtcdStore) -> None:
    register_host(etcd_store, Host("h1", "198.18.0.2"))
    with pytest.raises(Conflict, match=r"198\.18\.0\.2 is already registered by host h1"):
        register_host(etcd_store, Host("h2", "198.18.0.2"))
    register_host(etcd_store, Host("h1", "198.18.0.3"))
    assert records.address_holder(etcd_store, "198.18.0.2") is None
    register_host(etcd_store, Host("h2", "198.18.0.2"))
    assert unregister_host(etcd_store, "h1") is True
    assert records.address_holder(etcd_store, "198.18.0.3") is None
    assert records.address_holder(etcd_store, "198.18.0.2")[1] == "h2"
