"""A commit whose answer is lost: applied by etcd, but the connection broke
before the reply came back.  ``EtcdStore.commit`` tries again and must then
report the earlier try as applied (with its revision), not as a lost compare,
even when other writers changed the keys in between; and report a try that
was not applied as not applied."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from calicnm.ipam import Allocator, PoolRef
from calicnm.model import Pool
from calicnm.store.etcd import EtcdStore, parse_endpoints
from calicnm.store.kv import ABSENT, Txn, create, delete_if, replace

pytestmark = pytest.mark.etcd


class Dropped(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "Stream removed (Socket closed)"


class LoseAnswers:
    """Stands in for a client's ``kvstub``: the next ``lose`` Txn calls reach
    etcd (``apply``: or not), then ``between()`` runs (another writer) and
    the call fails as if the connection had dropped."""

    def __init__(self, stub: Any, between: Callable[[], None], apply: bool = True) -> None:
        self.stub = stub
        self.between = between
        self.apply = apply
        self.lose = 1

    def Txn(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        if self.lose <= 0:
            return self.stub.Txn(request, *args, **kwargs)
        self.lose -= 1
        if self.apply:
            self.stub.Txn(request, *args, **kwargs)
        self.between()
        raise Dropped()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stub, name)


def lose_next_answer(
    store: EtcdStore, between: Callable[[], None] = lambda: None, apply: bool = True
) -> LoseAnswers:
    store.get("/calicnm/x")  # makes the client
    client = store._clients[0]
    proxy = LoseAnswers(client.kvstub, between, apply)
    client.kvstub = proxy
    return proxy


def test_replace_applied_then_changed_by_another(etcd_store: EtcdStore, etcd_server: Any) -> None:
    key = "/calicnm/v1/test/lost/a"
    etcd_store.put(key, "v0")
    r0 = etcd_store.get(key).revision  # type: ignore[union-attr]
    other = EtcdStore(parse_endpoints(etcd_server.url), timeout=3.0)
    lose_next_answer(etcd_store, lambda: other.put(key, "theirs"))
    revision = etcd_store.commit(Txn(compare=[(key, r0)], puts=[(key, "mine")]))
    assert revision > r0, "an applied txn was reported as a lost compare"
    assert etcd_store.get(key).value == "theirs"  # type: ignore[union-attr]
    other.close()


def test_not_applied_stays_not_applied(etcd_store: EtcdStore) -> None:
    key = "/calicnm/v1/test/lost/b"
    etcd_store.put(key, "v0")
    r0 = etcd_store.get(key).revision  # type: ignore[union-attr]
    lose_next_answer(etcd_store, lambda: None, apply=False)
    etcd_store.put(key, "theirs")  # the compare is stale before the first try
    assert not replace(etcd_store, key, "mine", r0)
    lose_next_answer(etcd_store, lambda: etcd_store.put(key, "mine"), apply=False)
    # The first change after the compared revision holds "mine" but was a
    # plain put, not this txn's: its other put key tells them apart.
    r1 = etcd_store.get(key).revision  # type: ignore[union-attr]
    txn = Txn(compare=[(key, r1)], puts=[(key, "mine"), (key + "/marker", "1")])
    assert etcd_store.commit(txn) == 0
    assert etcd_store.get(key + "/marker") is None


def test_create_applied_then_changed(etcd_store: EtcdStore) -> None:
    key = "/calicnm/v1/test/lost/c"
    lose_next_answer(etcd_store, lambda: etcd_store.put(key, "changed"))
    assert create(etcd_store, key, "created")
    lose_next_answer(etcd_store, lambda: None)
    assert not create(etcd_store, key, "again"), "create of an existing key succeeded"


def test_delete_applied(etcd_store: EtcdStore) -> None:
    key = "/calicnm/v1/test/lost/d"
    etcd_store.put(key, "v0")
    r0 = etcd_store.get(key).revision  # type: ignore[union-attr]
    lose_next_answer(etcd_store, lambda: etcd_store.put("/calicnm/v1/test/lost/e", "x"))
    assert delete_if(etcd_store, key, r0)
    assert etcd_store.get(key) is None


def test_assign_with_a_lost_answer_allocates_once(etcd_store: EtcdStore) -> None:
    ipam = Allocator(etcd_store, "h1")
    ipam.add_pool(Pool(ipaddress.IPv4Network("10.42.0.0/26")))
    ipam.assign(PoolRef(), "first")  # the block exists
    rival = Allocator(etcd_store, "h2")
    lose_next_answer(etcd_store, lambda: rival.assign(PoolRef(), "rival"))
    got = ipam.assign(PoolRef(), "mine")
    block = ipam.blocks()[0]
    assert block.addresses_of("mine") == [got], "the lost answer cost a second address"
    assert len(block.addresses_of("rival")) == 1
    assert ABSENT == 0
