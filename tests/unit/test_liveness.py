"""Leases in the MemoryStore (as etcd's: expiry and revocation delete the
lease's keys; keepalives make no revision) and the node's heartbeat on
them: a record that exists while the node beats, is rewritten on a new lease
after a lost one, and goes at once on a clean stop."""

from __future__ import annotations

import threading

import pytest

from calicnm.errors import DatastoreUnavailable, LeaseLost
from calicnm.model import Liveness
from calicnm.node.liveness import Heartbeat
from calicnm.store import keys, records
from calicnm.store.kv import Change
from tests.fakes import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryStore:
    return MemoryStore(clock=clock)


def revision(store: MemoryStore) -> int:
    return store.list_at("")[1]


# ---- MemoryStore leases ----------------------------------------------------------


def test_expiry_deletes_the_lease_keys_in_one_revision_seen_by_watches(store, clock):
    lease = store.grant_lease(10)
    store.put_leased("/calicnm/v1/liveness/a", "1", lease)
    store.put_leased("/calicnm/v1/liveness/b", "2", lease)
    store.put("/calicnm/v1/other", "x")
    seen: list[Change] = []
    store.watch_changes("/calicnm/v1/", revision(store), seen.extend, lambda _c: None)
    clock.now += 9.9
    assert store.get("/calicnm/v1/liveness/a") is not None
    clock.now += 0.1
    assert store.get("/calicnm/v1/liveness/a") is None
    assert store.all_keys() == ["/calicnm/v1/other"]
    assert [(c.key, c.value) for c in seen] == [
        ("/calicnm/v1/liveness/a", None),
        ("/calicnm/v1/liveness/b", None),
    ]
    assert len({c.revision for c in seen}) == 1
    assert store.keep_alive(lease) == 0
    with pytest.raises(LeaseLost):
        store.put_leased("/calicnm/v1/liveness/a", "1", lease)


def test_keepalives_keep_the_keys_and_make_no_revision(store, clock):
    lease = store.grant_lease(10)
    store.put_leased("/k", "v", lease)
    at = revision(store)
    for _ in range(10):
        clock.now += 6
        assert store.keep_alive(lease) == 10
    assert store.get("/k").value == "v"
    assert revision(store) == at


def test_revoke_deletes_at_once(store):
    lease = store.grant_lease(30)
    store.put_leased("/k", "v", lease)
    assert store.revoke_lease(lease) is True
    assert store.get("/k") is None
    assert store.revoke_lease(lease) is False
    assert store.leases() == {}


def test_a_plain_put_takes_a_key_off_its_lease(store, clock):
    lease = store.grant_lease(5)
    store.put_leased("/k", "leased", lease)
    store.put("/k", "plain")
    clock.now += 6
    assert store.get("/k").value == "plain"


def test_a_key_moved_to_a_new_lease_outlives_the_old_one(store, clock):
    old = store.grant_lease(5)
    store.put_leased("/k", "1", old)
    new = store.grant_lease(60)
    store.put_leased("/k", "2", new)
    clock.now += 6
    assert store.get("/k").value == "2"
    assert store.leases() == {new: ["/k"]}


# ---- the heartbeat ------------------------------------------------------------------

RECORD = Liveness("h1", 4242, 1700000000.0, "0.1")


def test_a_beat_writes_the_record_and_later_beats_write_nothing(store, clock):
    heartbeat = Heartbeat(store, RECORD, ttl=30)
    heartbeat.beat()
    assert records.liveness(store) == {"h1": RECORD}
    at = revision(store)
    for _ in range(20):
        clock.now += heartbeat.interval
        heartbeat.beat()
    assert revision(store) == at
    assert heartbeat.grants == 1
    assert "h1" in records.liveness(store)


def test_without_beats_the_record_expires(store, clock):
    heartbeat = Heartbeat(store, RECORD, ttl=30)
    heartbeat.beat()
    clock.now += 30
    assert records.liveness(store) == {}


def test_a_lost_lease_is_granted_again_and_the_record_rewritten(store, clock):
    heartbeat = Heartbeat(store, RECORD, ttl=30)
    heartbeat.beat()
    first = heartbeat.lease
    store.down = True  # etcd unreachable for longer than the TTL
    clock.now += 31
    with pytest.raises(DatastoreUnavailable):
        heartbeat.beat()
    store.down = False
    assert records.liveness(store) == {}  # expired meanwhile
    heartbeat.beat()
    assert heartbeat.lease != first and heartbeat.grants == 2
    assert records.liveness(store) == {"h1": RECORD}


def test_a_record_deleted_with_its_lease_by_etcd_comes_back(store, clock):
    heartbeat = Heartbeat(store, RECORD, ttl=30)
    heartbeat.beat()
    assert heartbeat.lease is not None
    store.revoke_lease(heartbeat.lease)  # as if etcd lost it
    heartbeat.beat()
    assert records.liveness(store) == {"h1": RECORD}


def test_release_removes_the_record_at_once(store):
    heartbeat = Heartbeat(store, RECORD, ttl=30)
    heartbeat.beat()
    assert heartbeat.release() is True
    assert records.liveness(store) == {}
    assert heartbeat.release() is False


def test_run_survives_an_unreachable_etcd_and_stops_when_told(store):
    heartbeat = Heartbeat(store, RECORD, ttl=2)
    store.down = True
    stop = threading.Event()
    thread = threading.Thread(target=heartbeat.run, args=(stop,))
    thread.start()
    try:
        stop.wait(0.2)
        assert thread.is_alive()
        store.down = False
        for _ in range(100):
            if records.liveness(store):
                break
            stop.wait(0.05)
        assert records.liveness(store) == {"h1": RECORD}
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()


# ---- the records layer ----------------------------------------------------------------


def test_the_new_kinds_parse_and_stay_out_of_the_snapshot(store):
    assert records.parse_key(keys.host_address("198.18.0.2")) == records.KeyParts(
        records.HOST_ADDRESS, "198.18.0.2"
    )
    assert records.parse_key(keys.liveness("h1")) == records.KeyParts(records.LIVENESS, "h1")
    store.put(keys.host_address("198.18.0.2"), "h1")
    Heartbeat(store, RECORD, ttl=30).beat()
    snapshot = records.read_snapshot(store)
    assert snapshot.invalid == {} and snapshot.hosts == []


def test_a_liveness_record_must_name_its_key_host(store):
    store.put(keys.liveness("h2"), RECORD.to_json())
    assert records.liveness(store) == {}


# ---- what operators see ---------------------------------------------------------------


def test_status_counts_the_hosts_alive_and_names_the_dead(store):
    from calicnm.cli.main import hosts_data, status_lines
    from calicnm.model import Host
    from calicnm.store.registration import register_host

    for i in (1, 2, 3):
        register_host(store, Host(f"h{i}", f"198.18.0.{i + 1}"))
    Heartbeat(store, RECORD, ttl=30).beat()
    Heartbeat(store, Liveness("h3", 7, 1700000000.0, "0.1"), ttl=30).beat()
    hosts = hosts_data(store)
    assert hosts == {"registered": 3, "alive": ["h1", "h3"], "dead": ["h2"]}
    data = {
        "host": "h1",
        "plugin": {"answering": True, "socket": "/s", "implements": ["NetworkDriver"]},
        "etcd": {"reachable": True, "endpoints": "memory"},
        "local_endpoints": 0,
        "hosts": hosts,
        "agent": {"reported": False},
    }
    assert "hosts: 3 registered, 2 alive; NOT alive: h2" in status_lines(data)
