"""Host registration with address claims: one address, one host, even when
two hosts race; an address change releases the old claim in the same
transaction; removal releases it; the check reads one key, never a listing,
once every host has claimed its address."""

from __future__ import annotations

import threading

import pytest

from calicnm.errors import Conflict
from calicnm.model import Host
from calicnm.store import keys, records
from calicnm.store.registration import register_host, unregister_host
from tests.fakes import HookedStore, MemoryStore


class ListingStore(MemoryStore):
    """A MemoryStore that remembers every prefix listed."""

    def __init__(self) -> None:
        super().__init__()
        self.listed: list[str] = []

    def list(self, prefix: str):  # type: ignore[override]
        self.listed.append(prefix)
        return super().list(prefix)


def holder(store: MemoryStore, ip: str) -> str | None:
    found = records.address_holder(store, ip)
    return found[1] if found else None


def test_a_registration_claims_its_address_with_its_record():
    store = MemoryStore()
    assert register_host(store, Host("h1", "198.18.0.2")) is True
    assert holder(store, "198.18.0.2") == "h1"
    assert records.host(store, "h1") == Host("h1", "198.18.0.2")
    # Both keys were written in one transaction: one revision.
    assert (
        store.get(keys.host_meta("h1")).revision
        == store.get(keys.host_address("198.18.0.2")).revision
    )


def test_registering_again_unchanged_writes_nothing_and_reads_two_keys():
    store = ListingStore()
    register_host(store, Host("h1", "198.18.0.2"))
    for i in range(50):  # endpoints of this host do not matter to the check
        eid = f"{i:064x}"
        store.put(keys.endpoint("h1", eid), "{}")
    before = store.list_at("")
    store.listed.clear()
    reads = store.reads
    assert register_host(store, Host("h1", "198.18.0.2")) is False
    assert store.reads - reads == 2  # the record and the claim
    assert store.listed == []
    assert store.list_at("") == before  # nothing written: no revision


def test_another_host_cannot_take_a_claimed_address():
    store = ListingStore()
    register_host(store, Host("h1", "198.18.0.2"))
    store.listed.clear()
    with pytest.raises(Conflict, match=r"198\.18\.0\.2 is already registered by host h1"):
        register_host(store, Host("h2", "198.18.0.2"))
    assert store.listed == []  # one key read, no listing
    assert records.host(store, "h2") is None


def test_two_hosts_racing_for_one_address_cannot_both_win():
    """h2 registers the address between h1's read and h1's commit: h1's
    compare fails, it reads again, finds h2's claim and is refused."""
    store = HookedStore()
    raced: list[bool] = []

    def race(_keys: list[str]) -> None:
        if not raced:
            raced.append(True)
            register_host(store, Host("h2", "198.18.0.9"))

    store.before_write = race
    with pytest.raises(Conflict, match="already registered by host h2"):
        register_host(store, Host("h1", "198.18.0.9"))
    assert holder(store, "198.18.0.9") == "h2"
    assert records.host(store, "h1") is None
    assert records.host(store, "h2") == Host("h2", "198.18.0.9")


def race(ip: str, names: list[str]) -> tuple[MemoryStore, list[str], list[str]]:
    """Every host in ``names`` registers ``ip`` at once, each in its thread."""
    store = MemoryStore()
    won: list[str] = []
    refused: list[str] = []
    start = threading.Barrier(len(names))

    def register(name: str) -> None:
        start.wait(timeout=10)
        try:
            register_host(store, Host(name, ip))
            won.append(name)
        except Conflict:
            refused.append(name)

    threads = [threading.Thread(target=register, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    return store, won, refused


def test_threads_racing_leave_exactly_one_holder():
    for round_ in range(20):
        ip = f"198.18.1.{round_ + 1}"
        store, won, refused = race(ip, ["h1", "h2", "h3", "h4"])
        assert len(won) == 1 and len(refused) == 3
        assert holder(store, ip) == won[0]
        assert [h.name for h in records.hosts(store)] == won


def test_an_address_change_releases_the_old_claim_in_the_same_transaction():
    store = MemoryStore()
    register_host(store, Host("h1", "198.18.0.2"))
    register_host(store, Host("h1", "198.18.0.3"))
    assert holder(store, "198.18.0.2") is None
    assert holder(store, "198.18.0.3") == "h1"
    changes = [c for c in store._history if c.revision == store.list_at("")[1]]
    assert sorted((c.key, c.value is None) for c in changes) == [
        (keys.host_address("198.18.0.2"), True),
        (keys.host_address("198.18.0.3"), False),
        (keys.host_meta("h1"), False),
    ]
    # The old address is free for another host now.
    register_host(store, Host("h2", "198.18.0.2"))
    assert holder(store, "198.18.0.2") == "h2"


def test_an_address_change_to_a_claimed_address_changes_nothing():
    store = MemoryStore()
    register_host(store, Host("h1", "198.18.0.2"))
    register_host(store, Host("h2", "198.18.0.3"))
    before = store.list_at("")
    with pytest.raises(Conflict, match="already registered by host h2"):
        register_host(store, Host("h1", "198.18.0.3"))
    assert store.list_at("") == before


def test_removal_releases_the_claim():
    store = MemoryStore()
    register_host(store, Host("h1", "198.18.0.2"))
    assert unregister_host(store, "h1") is True
    assert records.host(store, "h1") is None
    assert holder(store, "198.18.0.2") is None
    assert unregister_host(store, "h1") is False
    register_host(store, Host("h2", "198.18.0.2"))
    assert holder(store, "198.18.0.2") == "h2"


def test_removal_leaves_a_claim_that_names_another_host():
    store = MemoryStore()
    # A stale record from before claims, whose address h2 has claimed since:
    # removing h1 must not free h2's address.
    store.put(keys.host_meta("h1"), Host("h1", "198.18.0.2").to_json())
    store.put(keys.host_address("198.18.0.2"), "h2")
    unregister_host(store, "h1")
    assert holder(store, "198.18.0.2") == "h2"


def test_migration_a_record_without_a_claim_still_holds_its_address():
    """A cluster registered before claims: h1's record has no claim.  h2 is
    refused by the one-time fallback over host records; h1 registering again
    claims its address without rewriting its record."""
    store = ListingStore()
    store.put(keys.host_meta("h1"), Host("h1", "198.18.0.2").to_json())
    with pytest.raises(Conflict, match=r"198\.18\.0\.2 is already registered by host h1"):
        register_host(store, Host("h2", "198.18.0.2"))
    assert store.listed == [keys.HOSTS]  # the fallback: once, because no claim
    record_revision = store.get(keys.host_meta("h1")).revision
    assert register_host(store, Host("h1", "198.18.0.2")) is True
    assert holder(store, "198.18.0.2") == "h1"
    assert store.get(keys.host_meta("h1")).revision == record_revision
    store.listed.clear()
    with pytest.raises(Conflict):
        register_host(store, Host("h2", "198.18.0.2"))
    assert store.listed == []  # claimed now: one key read


def test_an_unreadable_claim_is_refused_not_taken_over():
    store = MemoryStore()
    store.put(keys.host_address("198.18.0.2"), "not a host name!")
    with pytest.raises(Conflict, match="unreadable"):
        register_host(store, Host("h1", "198.18.0.2"))


def test_a_malformed_record_is_replaced():
    store = MemoryStore()
    store.put(keys.host_meta("h1"), "{not json")
    assert register_host(store, Host("h1", "198.18.0.2")) is True
    assert records.host(store, "h1") == Host("h1", "198.18.0.2")
