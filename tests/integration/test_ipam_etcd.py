"""IPAM against a real etcd: pools, blocks, exhaustion, release, and races."""

from __future__ import annotations

import ipaddress
import multiprocessing
import time

import pytest

from calicnm.errors import Conflict, DatastoreUnavailable, PoolExhausted
from calicnm.ipam import Allocator, PoolRef
from calicnm.model import Pool
from calicnm.store import keys
from calicnm.store.etcd import EtcdStore, parse_endpoints

pytestmark = pytest.mark.etcd

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address


def test_pools_blocks_and_affinity(etcd_store):
    ipam = Allocator(etcd_store, "h1")
    ipam.add_pool(Pool(N("10.10.0.0/24")))
    with pytest.raises(Conflict):
        ipam.add_pool(Pool(N("10.10.0.0/16")))
    first = ipam.assign(PoolRef(), "e1")
    block = N(f"{first}/26", strict=False)
    assert etcd_store.get(keys.block(block)) is not None
    assert etcd_store.get(keys.affinity("h1", block)) is not None
    assert ipam.affine_blocks() == [block]


def test_exhaustion_and_idempotent_release(etcd_store):
    ipam = Allocator(etcd_store, "h1")
    ipam.add_pool(Pool(N("10.11.0.0/26")))
    got = [ipam.assign(PoolRef(), "e") for _ in range(62)]
    assert len(set(got)) == 62
    with pytest.raises(PoolExhausted):
        ipam.assign(PoolRef(), "e")
    assert ipam.release(got[0]) is True
    assert ipam.release(got[0]) is False
    assert ipam.assign(PoolRef(), "again") == got[0]


def _allocate(url: str, host: str, count: int, queue) -> None:
    store = EtcdStore(parse_endpoints(url))
    ipam = Allocator(store, host)
    got = [str(ipam.assign(PoolRef(), f"{host}-{i}")) for i in range(count)]
    queue.put(got)
    store.close()


@pytest.mark.parametrize("hosts", [["same", "same"], ["h1", "h2", "h3"]])
def test_concurrent_allocators_never_share_an_address(etcd_store, etcd_server, hosts):
    """Separate processes (one host or several) race on one small pool."""
    ipam = Allocator(etcd_store, "setup")
    ipam.add_pool(Pool(N("10.12.0.0/25")))  # 2 blocks, 126 usable addresses
    per = 120 // len(hosts)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_allocate, args=(etcd_server.url, h, per, queue)) for h in hosts]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    everything = [ip for result in results for ip in result]
    assert len(everything) == per * len(hosts)
    assert len(set(everything)) == len(everything), "an address was handed out twice"
    stored = sum(len(b.allocations) for b in ipam.blocks())
    assert stored == len(everything)


def test_unreachable_etcd_is_a_quick_clear_error():
    dead = EtcdStore(parse_endpoints("http://127.0.0.1:1"), timeout=2.0)
    start = time.monotonic()
    with pytest.raises(DatastoreUnavailable, match=r"etcd is unreachable at 127\.0\.0\.1:1"):
        dead.get("/x")
    assert time.monotonic() - start < 10
    dead.close()


def test_failover_to_the_next_endpoint(etcd_server):
    store = EtcdStore(parse_endpoints(f"http://127.0.0.1:1,{etcd_server.url}"), timeout=2.0)
    store.put("/calicnm/v1/config/failover", "ok")
    assert store.get("/calicnm/v1/config/failover").value == "ok"
    store.delete("/calicnm/v1/config/failover")
    store.close()


def test_two_hosts_cannot_claim_one_address(etcd_store):
    from calicnm.model import Host
    from calicnm.node.daemon import register_host

    register_host(etcd_store, Host("h1", "198.18.0.2"))
    register_host(etcd_store, Host("h1", "198.18.0.2", as_num=64512))  # a restart: fine
    with pytest.raises(Conflict, match=r"198\.18\.0\.2 is already registered by host h1"):
        register_host(etcd_store, Host("h2", "198.18.0.2"))


def test_release_affinity_of_a_gone_host(etcd_store):
    ipam = Allocator(etcd_store, "gone")
    ipam.add_pool(Pool(N("10.13.0.0/24")))
    kept = ipam.assign(PoolRef(), "still-used")
    other = Allocator(etcd_store, "other")
    # Fill the gone host's first block so it claims a second, then free the second.
    for _ in range(70):
        ipam.assign(PoolRef(), "x")
    assert len(ipam.affine_blocks()) == 2
    for block in ipam.blocks():
        for addr in block.addresses_of("x"):
            ipam.release(addr)
    assert ipam.release_affinity("gone") == (1, 1)
    assert ipam.affine_blocks() == []
    assert ipam.info(kept).holder.handle == "still-used"
    assert ipam.info(kept).block.affinity is None
    assert other.assign(PoolRef(), "y") is not None
