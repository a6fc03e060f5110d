"""IPAM behaviour over the in-memory store (etcd semantics, no server)."""

import ipaddress

import pytest

from calicnm.errors import AddressInUse, Conflict, InvalidRequest, NotFound, PoolExhausted
from calicnm.ipam import Allocator, PoolRef
from calicnm.model import Pool
from calicnm.store import keys
from tests.fakes import MemoryStore

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address


@pytest.fixture
def store():
    return MemoryStore()


@pytest.fixture
def ipam(store):
    return Allocator(store, "h1", sleep=lambda s: None)


def test_overlapping_pools_are_refused(ipam):
    ipam.add_pool(Pool(N("10.0.0.0/24")))
    with pytest.raises(Conflict, match=r"overlaps existing pool 10\.0\.0\.0/24"):
        ipam.add_pool(Pool(N("10.0.0.128/25")))
    with pytest.raises(Conflict, match="already exists"):
        ipam.add_pool(Pool(N("10.0.0.0/24")))


def test_default_pool_only_when_none_exist(ipam):
    assert ipam.ensure_default_pool()
    assert not ipam.ensure_default_pool()
    assert [str(p.cidr) for p in ipam.pools()] == ["192.168.0.0/16"]


def test_auto_assign_claims_one_affine_block_and_fills_it(ipam, store):
    ipam.add_pool(Pool(N("10.0.0.0/24")))
    got = [ipam.assign(PoolRef(), "e") for _ in range(10)]
    assert len(set(got)) == 10
    assert ipam.affine_blocks() == [N(f"{got[0]}/26", strict=False)]
    assert all(a in ipam.affine_blocks()[0] for a in got)


def test_pool_first_and_last_addresses_are_not_auto_assigned(ipam):
    ipam.add_pool(Pool(N("10.0.0.0/26")))
    got = {ipam.assign(PoolRef(), "e") for _ in range(62)}
    assert A("10.0.0.0") not in got and A("10.0.0.63") not in got
    with pytest.raises(PoolExhausted, match="no free address left"):
        ipam.assign(PoolRef(), "e")


def test_subnet_and_range_limit_auto_assignment(ipam):
    ipam.add_pool(Pool(N("10.0.0.0/24")))
    ref = ipam.request_pool(N("10.0.0.64/26"), N("10.0.0.96/28"))
    got = {ipam.assign(ref, "e") for _ in range(16)}
    assert all(a in N("10.0.0.96/28") for a in got)
    with pytest.raises(PoolExhausted):
        ipam.assign(ref, "e")


def test_any_pool_networks_avoid_other_networks_subnets(ipam):
    ipam.add_pool(Pool(N("10.0.0.0/26")))
    ipam.add_pool(Pool(N("10.0.1.0/26")))
    got = {ipam.assign(PoolRef(), "e", exclude=(N("10.0.0.0/26"),)) for _ in range(5)}
    assert all(a in N("10.0.1.0/26") for a in got)


def test_static_address(ipam):
    ipam.add_pool(Pool(N("10.0.0.0/26")))
    ref = ipam.request_pool(N("10.0.0.0/26"), None)
    assert ipam.assign(ref, "e", address=A("10.0.0.48")) == A("10.0.0.48")
    with pytest.raises(AddressInUse):
        ipam.assign(ref, "e2", address=A("10.0.0.48"))
    with pytest.raises(InvalidRequest, match="outside every calicnm pool"):
        ipam.assign(ref, "e", address=A("172.31.0.1"))
    assert ipam.assign(PoolRef(), "x") != A("10.0.0.48")


def test_request_pool_errors(ipam):
    with pytest.raises(InvalidRequest, match="no calicnm pool exists"):
        ipam.request_pool(None, None)
    ipam.add_pool(Pool(N("10.0.0.0/26")))
    with pytest.raises(InvalidRequest, match="not inside any calicnm pool"):
        ipam.request_pool(N("172.16.0.0/24"), None)
    with pytest.raises(InvalidRequest, match="not inside --subnet"):
        ipam.request_pool(N("10.0.0.0/27"), N("10.0.0.32/28"))


def test_release_is_idempotent_and_handles_reown(ipam):
    ipam.add_pool(Pool(N("10.0.0.0/26")))
    addr = ipam.assign(PoolRef(), "pending")
    assert ipam.set_handle(addr, "ep1")
    assert ipam.info(addr).holder.handle == "ep1"
    assert ipam.release_by_handle("ep1") == [addr]
    assert ipam.release(addr) is False
    assert ipam.release(A("169.254.1.1")) is False


def test_other_hosts_blocks_are_borrowed_only_when_nothing_else_is_free(store):
    h1 = Allocator(store, "h1", sleep=lambda s: None)
    h2 = Allocator(store, "h2", sleep=lambda s: None)
    h1.add_pool(Pool(N("10.0.0.0/25")))
    a1 = h1.assign(PoolRef(), "a")
    a2 = h2.assign(PoolRef(), "b")
    assert N(f"{a1}/26", strict=False) != N(f"{a2}/26", strict=False)
    # Fill h2's own block and the last free block: h2 then borrows from h1's.
    for _ in range(200):
        try:
            h2.assign(PoolRef(), "b")
        except PoolExhausted:
            break
    used = sum(len(b.allocations) for b in h1.blocks())
    assert used == 126


def test_remove_pool_refuses_while_in_use(ipam, store):
    ipam.add_pool(Pool(N("10.0.0.0/26")))
    addr = ipam.assign(PoolRef(), "e")
    with pytest.raises(Conflict, match="still has 1 address"):
        ipam.remove_pool(N("10.0.0.0/26"))
    ipam.release(addr)
    ipam.remove_pool(N("10.0.0.0/26"))
    assert not [k for k in store.all_keys() if "/ipam/" in k]
    with pytest.raises(NotFound):
        ipam.remove_pool(N("10.0.0.0/26"))


def test_cas_loser_rereads_instead_of_overwriting(store):
    """A writer that read a block before another writer changed it must not
    overwrite that change."""
    ipam = Allocator(store, "h1", sleep=lambda s: None)
    ipam.add_pool(Pool(N("10.0.0.0/26")))
    first = ipam.assign(PoolRef(), "a")
    key = keys.block(N("10.0.0.0/26"))
    stale = store.get(key)
    second = ipam.assign(PoolRef(), "b")
    from calicnm.store.kv import replace

    assert not replace(store, key, stale.value, stale.revision)
    assert {first, second} <= {ipam.info(a).address for a in (first, second)}
    assert ipam.info(second).holder.handle == "b"


def test_pool_ids_are_self_describing():
    ref = PoolRef(N("10.0.0.0/26"), N("10.0.0.32/27"))
    assert PoolRef.parse(ref.pool_id) == ref
    assert PoolRef.parse(PoolRef().pool_id) == PoolRef()
    assert PoolRef().docker_pool == "0.0.0.0/0"
    for bad in ["", "other:10.0.0.0/26", "calicnm:x", 7, None, "calicnm:1:2:3"]:
        with pytest.raises(InvalidRequest):
            PoolRef.parse(bad)


def test_interleaved_allocators_with_stale_caches_never_share_an_address(store):
    first = Allocator(store, "h1", sleep=lambda s: None)
    second = Allocator(store, "h1", sleep=lambda s: None)
    first.add_pool(Pool(N("10.0.0.0/24")))
    held: set = set()
    for i in range(150):
        addr = (first if i % 3 else second).assign(PoolRef(), f"e{i}")
        assert addr not in held, f"{addr} handed out twice"
        held.add(addr)
        if i % 7 == 0:
            victim = sorted(held)[len(held) // 2]
            assert (second if i % 2 else first).release(victim)
            held.discard(victim)
    assert sum(len(b.allocations) for b in first.blocks()) == len(held)


def test_a_cached_pool_list_never_claims_from_a_removed_pool(store):
    ipam = Allocator(store, "h1", sleep=lambda s: None)
    other = Allocator(store, "h2", sleep=lambda s: None)
    ipam.add_pool(Pool(N("10.0.0.0/26")))
    ipam.add_pool(Pool(N("10.0.1.0/26")))
    a = ipam.assign(PoolRef(subnet=N("10.0.0.0/26")), "e")
    ipam.release(a)
    other.remove_pool(N("10.0.1.0/26"))  # behind ipam's back
    got = {ipam.assign(PoolRef(), "x") for _ in range(62)}
    assert all(a in N("10.0.0.0/26") for a in got)
    with pytest.raises(PoolExhausted):
        ipam.assign(PoolRef(), "x")
    assert not [k for k in store.all_keys() if "10.0.1.0" in k]
