"""IPAM under lost replies, concurrent threads, pool removal and pending
requests: never two owners for one address, never a leaked one.

Each test first reproduced its defect on the code before the fix; the
moments that matter (a reply lost after the write, another writer between
a read and a write) are made with ``HookedStore``.
"""

import ipaddress
import threading

import pytest

from calicnm.blocks import Allocation
from calicnm.errors import AddressInUse, DatastoreUnavailable, InvalidRequest
from calicnm.ipam import (
    AMBIGUOUS_RETRIES,
    Allocator,
    PoolRef,
    is_pending,
    pending_handle,
    pending_since,
)
from calicnm.model import Endpoint, Pool
from calicnm.store import keys
from tests.fakes import HookedStore

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
BLOCK = N("10.0.0.0/26")
EID = "629601b5fa245ddf93ea239eb288111b92d6781bedeebcb340ccdf43a081ea34"
NID = "6f49939a5d861b88bab9633a90df9206d74f387e13a58e07639c41910427ffb7"


@pytest.fixture
def store():
    return HookedStore()


@pytest.fixture
def ipam(store):
    allocator = Allocator(store, "h1", sleep=lambda s: None)
    allocator.add_pool(Pool(BLOCK))
    return allocator


def held(ipam):
    """Every allocation in the store: address -> (handle, kind)."""
    return {
        block.address(o): (a.handle, a.kind)
        for block in ipam.blocks()
        for o, a in block.allocations.items()
    }


def lose_replies(store, count, applied=True):
    """The next ``count`` block commits raise DatastoreUnavailable, after
    being applied (a lost reply) or before (a failed call)."""
    left = [count]

    def hook(keys_written):
        if left[0] and any("/blocks/" in k for k in keys_written):
            left[0] -= 1
            raise DatastoreUnavailable("etcd is unreachable: reply lost (test)")

    if applied:
        store.after_write = hook
    else:
        store.before_write = hook
    return left


# ---- 5: after an ambiguous commit, re-read before retrying ---------------------


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
@pytest.mark.parametrize("exact", [False, True], ids=["auto", "exact"])
def test_a_lost_commit_reply_allocates_exactly_once(ipam, store, applied, exact):
    ipam.assign(PoolRef(), "warm")  # the block exists and is cached
    lose_replies(store, 1, applied)
    handle = pending_handle(1000, "aa")
    address = A("10.0.0.40") if exact else None
    got = ipam.assign(PoolRef(), handle, address=address)
    assert held(ipam) == {A("10.0.0.1"): ("warm", "endpoint"), got: (handle, "endpoint")}


def test_a_lost_reply_on_the_claim_of_a_new_block_is_recognised(ipam, store):
    lose_replies(store, 1)
    got = ipam.assign(PoolRef(), "first")
    assert held(ipam) == {got: ("first", "endpoint")}
    assert ipam.affine_blocks() == [BLOCK]


def test_lost_replies_on_release_claim_and_set_handle_are_recognised(ipam, store):
    addr = ipam.assign(PoolRef(), "p")
    lose_replies(store, 1)
    assert ipam.set_handle(addr, "ep")
    lose_replies(store, 1)
    ipam.claim(addr, "ep2", takes_over=lambda h: h.handle == "ep")
    assert held(ipam) == {addr: ("ep2", "endpoint")}
    lose_replies(store, 1)
    assert ipam.release(addr)
    assert held(ipam) == {}


def test_a_store_that_never_answers_gives_up_with_the_error(ipam, store):
    ipam.assign(PoolRef(), "warm")
    left = lose_replies(store, 100, applied=False)
    with pytest.raises(DatastoreUnavailable):
        ipam.assign(PoolRef(), "x")
    assert 100 - left[0] == AMBIGUOUS_RETRIES + 1  # commits tried: bounded
    assert held(ipam) == {A("10.0.0.1"): ("warm", "endpoint")}


# ---- 6: the write cache only moves forward ---------------------------------------


def test_the_write_cache_never_goes_back_to_an_older_revision(ipam, store):
    """Two threads commit the same block; the one that committed first stores
    its (older) write in the cache last.  The cache must keep the newer."""
    ipam.assign(PoolRef(), "warm")
    first_committed = threading.Event()
    second_done = threading.Event()
    paused: list[bool] = []

    def pause_the_first(keys_written):
        if threading.current_thread().name == "first" and not paused:
            paused.append(True)
            first_committed.set()
            assert second_done.wait(5)

    store.after_write = pause_the_first
    first = threading.Thread(target=ipam.assign, args=(PoolRef(), "a"), name="first")
    first.start()
    assert first_committed.wait(5)
    ipam.assign(PoolRef(), "b")  # commits a later revision of the same block
    second_done.set()
    first.join(5)
    assert not first.is_alive()
    latest = store.get(keys.block(BLOCK)).revision
    assert ipam._written[BLOCK].revision == latest
    # So the next change compares against the block as stored: one commit.
    before = store.commits
    ipam.assign(PoolRef(), "c")
    assert store.commits == before + 1
    assert sorted(h for h, _ in held(ipam).values()) == ["a", "b", "c", "warm"]


# ---- 7: exact claims pass the pools guard ----------------------------------------


@pytest.mark.parametrize("how", ["assign", "claim"])
def test_an_exact_claim_never_creates_a_block_in_a_pool_removed_meanwhile(store, how):
    ipam = Allocator(store, "h1", sleep=lambda s: None)
    other = Allocator(store, "h2", sleep=lambda s: None)
    ipam.add_pool(Pool(N("10.0.0.0/26")))
    ipam.add_pool(Pool(N("10.0.1.0/26")))
    ipam.assign(PoolRef(), "warm")  # the pool list is cached
    removed: list[bool] = []

    def remove_the_pool_first(keys_written):
        if not removed and keys.block(N("10.0.1.0/26")) in keys_written:
            removed.append(True)
            other.remove_pool(N("10.0.1.0/26"))

    store.before_write = remove_the_pool_first
    with pytest.raises(InvalidRequest, match="outside every calicnm pool"):
        if how == "assign":
            ipam.assign(PoolRef(), "x", address=A("10.0.1.9"))
        else:
            ipam.claim(A("10.0.1.9"), "x")
    assert removed
    assert not [k for k in store.all_keys() if "10.0.1.0" in k]


def test_an_exact_claim_with_a_stale_pool_list_finds_a_pool_added_meanwhile(store):
    ipam = Allocator(store, "h1", sleep=lambda s: None)
    other = Allocator(store, "h2", sleep=lambda s: None)
    ipam.add_pool(Pool(N("10.0.0.0/26")))
    ipam.assign(PoolRef(), "warm")
    other.add_pool(Pool(N("10.0.1.0/26")))
    assert ipam.assign(PoolRef(), "x", address=A("10.0.1.9")) == A("10.0.1.9")


# ---- claims --------------------------------------------------------------------------


def test_claim_takes_over_only_what_it_is_allowed_to(ipam):
    pending = pending_handle(1000, "01")
    addr = ipam.assign(PoolRef(), pending)
    ipam.claim(addr, EID, takes_over=lambda h: is_pending(h.handle))
    assert held(ipam) == {addr: (EID, "endpoint")}
    ipam.claim(addr, EID)  # idempotent
    with pytest.raises(AddressInUse, match=f"in use \\(endpoint {EID}\\)"):
        ipam.claim(addr, "other", takes_over=lambda h: is_pending(h.handle))
    ipam.claim(A("10.0.0.50"), f"gateway:{NID}", kind="gateway")  # a free one
    assert held(ipam)[A("10.0.0.50")] == (f"gateway:{NID}", "gateway")
    with pytest.raises(InvalidRequest, match="outside every calicnm pool"):
        ipam.claim(A("172.16.0.1"), EID)
    with pytest.raises(AddressInUse):
        ipam.check_claim(addr, "other")
    ipam.check_claim(addr, EID)


# ---- 3: pending requests carry their time ---------------------------------------


def test_pending_handles_say_when_and_are_listed_with_their_age(ipam, store):
    assert pending_since("docker-pending") is None
    assert pending_since(pending_handle(1700000000.9, "ab")) == 1700000000
    assert pending_since("docker-pending:junk") is None
    assert not is_pending("docker-pendingx") and not is_pending(EID)
    with pytest.raises(InvalidRequest):
        pending_since(EID)
    old = ipam.assign(PoolRef(), pending_handle(1000, "01"))
    young = ipam.assign(PoolRef(), pending_handle(1990, "02"), kind="gateway")
    legacy = ipam.assign(PoolRef(), "docker-pending")
    ipam.assign(PoolRef(), EID)
    got = [(p.address, p.age, p.kind) for p in ipam.pending(now=2000)]
    assert got == [(old, 1000, "endpoint"), (young, 10, "gateway"), (legacy, None, "endpoint")]


def test_stale_pending_addresses_are_freed_unless_a_record_names_them(ipam, store):
    stale = ipam.assign(PoolRef(), pending_handle(1000, "01"))
    recorded = ipam.assign(PoolRef(), pending_handle(1000, "02"))
    young = ipam.assign(PoolRef(), pending_handle(1950, "03"))
    legacy = ipam.assign(PoolRef(), "docker-pending")
    # A CreateEndpoint cut short after its record, before its claim:
    record = Endpoint(
        EID, "h2", NID, "cali629601b5fa2", "tmp629601b5fa2", "ee:00:00:00:00:01", (recorded,)
    )
    store.put(keys.endpoint("h2", EID), record.to_json())
    assert ipam.release_stale_pending(now=2000, max_age=60) == [stale]
    assert set(held(ipam)) == {recorded, young, legacy}


def test_release_if_held_compares_the_handle_not_just_the_address(ipam):
    seen = pending_handle(1000, "01")
    addr = ipam.assign(PoolRef(), seen)
    ipam.claim(addr, EID, takes_over=lambda h: is_pending(h.handle))  # claimed meanwhile
    assert not ipam.release_if_held(addr, seen)
    assert held(ipam) == {addr: (EID, "endpoint")}
    assert ipam.release_if_held(addr, EID)
    assert not ipam.release_if_held(addr, EID)
    assert ipam.release_handles({"nobody"}) == []


def test_a_pending_address_claimed_between_listing_and_release_is_kept(ipam, store):
    handle = pending_handle(1000, "01")
    addr = ipam.assign(PoolRef(), handle)

    def claim_it_first(keys_written):
        store.before_write = None
        ipam.claim(addr, EID, takes_over=lambda h: h == Allocation(handle))

    store.before_write = claim_it_first
    assert ipam.release_stale_pending(now=5000, max_age=60) == []
    assert held(ipam) == {addr: (EID, "endpoint")}
