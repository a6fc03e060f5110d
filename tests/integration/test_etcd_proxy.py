"""``lab.etcd_proxy``: its HPACK decoder, and the proxy in front of a real etcd.

What the end-to-end test of ambiguous commits relies on: a reply the proxy
loses belongs to a write etcd applied; reads are never lost; the calicnm
client, through the proxy, reports such a commit as applied; the proxy
stops in bounded time with connections open; and run as a process it takes
a new policy and reports its counters through its files.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from calicnm.errors import CalicnmError, DatastoreUnavailable
from calicnm.store.etcd import EtcdStore, parse_endpoints
from calicnm.store.kv import ABSENT, Txn
from lab.etcd import EtcdServer, free_port
from lab.etcd_proxy import (
    DropPolicy,
    EtcdProxy,
    HeaderDecoder,
    HpackError,
    HuffmanCoded,
    ProxyProcess,
)

# ---- HPACK -------------------------------------------------------------------------------


def test_hpack_examples_of_rfc_7541_without_huffman() -> None:
    """The three requests of RFC 7541 appendix C.3, decoded by one context."""
    decoder = HeaderDecoder()
    first = bytes.fromhex("828684410f7777772e6578616d706c652e636f6d")
    assert decoder.decode(first) == [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/"),
        (b":authority", b"www.example.com"),
    ]
    assert decoder.table_size == 57
    second = bytes.fromhex("828684be58086e6f2d6361636865")
    assert decoder.decode(second)[-1] == (b"cache-control", b"no-cache")
    assert decoder.table_size == 110
    third = bytes.fromhex("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565")
    assert decoder.decode(third) == [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":path", b"/index.html"),
        (b":authority", b"www.example.com"),
        (b"custom-key", b"custom-value"),
    ]
    assert decoder.table_size == 164
    assert decoder.table[0] == (b"custom-key", b"custom-value")


def literal(name: bytes, value: bytes) -> bytes:
    """A literal header field with incremental indexing and a new name (short strings)."""
    return bytes([0x40, len(name)]) + name + bytes([len(value)]) + value


def test_hpack_eviction_and_size_update() -> None:
    decoder = HeaderDecoder(max_size=100)
    decoder.decode(literal(b"aa", b"1" * 20))  # 54 bytes
    decoder.decode(literal(b"bb", b"2" * 20))  # 54 more: the first is evicted
    assert decoder.table == [(b"bb", b"2" * 20)]
    assert decoder.decode(bytes([0x80 | 62])) == [(b"bb", b"2" * 20)]
    with pytest.raises(HpackError):
        decoder.decode(bytes([0x80 | 63]))
    decoder.decode(bytes([0x20]))  # size update to 0 empties the table
    assert decoder.table == [] and decoder.table_size == 0
    # Index 262 (62 + 200: the oldest of 201 entries) needs two continuation bytes.
    decoder = HeaderDecoder(max_size=16384)
    for i in range(201):
        decoder.decode(literal(b"k", str(i).encode()))
    assert decoder.decode(bytes([0xFF, 0x87, 0x01])) == [(b"k", b"0")]


def test_hpack_refuses_huffman_and_truncation() -> None:
    with pytest.raises(HuffmanCoded):
        HeaderDecoder().decode(bytes.fromhex("4082aaaa8141"))
    with pytest.raises(HpackError):
        HeaderDecoder().decode(bytes.fromhex("400a6375"))
    with pytest.raises(HpackError):
        HeaderDecoder().decode(bytes([0xFF]))


# ---- against etcd ------------------------------------------------------------------------


@pytest.fixture
def proxy(etcd_server: EtcdServer) -> Iterator[EtcdProxy]:
    with EtcdProxy(etcd_server.url) as p:
        yield p


def store_at(url: str) -> EtcdStore:
    return EtcdStore(parse_endpoints(url), timeout=5.0)


def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.etcd
def test_a_lost_reply_belongs_to_an_applied_write(proxy: EtcdProxy, etcd_store: EtcdStore) -> None:
    import etcd3

    host, port = proxy.address
    client = etcd3.client(host=host, port=port, timeout=30)  # only the drop fails it
    try:
        client.get("/calicnm/v1/test/proxy/warm")  # reads pass
        proxy.set_policy(DropPolicy(every=1, limit=1))
        with pytest.raises(etcd3.exceptions.ConnectionFailedError):
            client.put("/calicnm/v1/test/proxy/a", "applied")
    finally:
        client.close()
    kv = etcd_store.get("/calicnm/v1/test/proxy/a")
    assert kv is not None and kv.value == "applied"
    deadline = time.monotonic() + 10  # the proxy counts the drop as it closes up
    while (stats := proxy.stats())["dropped"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["dropped"] == 1, stats
    assert stats["recent_drops"][0]["method"] == "/etcdserverpb.KV/Put"
    assert stats["methods"]["/etcdserverpb.KV/Range"] >= 1


@pytest.mark.etcd
def test_the_calicnm_client_reports_the_lost_commit_as_applied(
    proxy: EtcdProxy, etcd_store: EtcdStore
) -> None:
    key = "/calicnm/v1/test/proxy/b"
    store = store_at(proxy.url)
    try:
        store.get(key)
        proxy.set_policy(DropPolicy(every=1, limit=1))
        revision = store.commit(Txn(compare=[(key, ABSENT)], puts=[(key, "mine")]))
        kv = etcd_store.get(key)
        assert kv is not None and revision == kv.revision, "the lost commit was not recognised"
        assert store.commit(Txn(compare=[(key, ABSENT)], puts=[(key, "again")])) == 0
    finally:
        store.close()
    stats = proxy.stats()
    assert stats["dropped"] == 1 and stats["chosen"] >= 3, stats


@pytest.mark.etcd
def test_reads_are_never_lost_and_every_nth_write_is(proxy: EtcdProxy) -> None:
    store = store_at(proxy.url)
    try:
        proxy.set_policy(DropPolicy(every=1))
        for _ in range(20):
            store.get("/calicnm/v1/test/proxy/c")
        store.list("/calicnm/v1/test/proxy/")
        assert proxy.stats()["dropped"] == 0
        proxy.set_policy(DropPolicy(every=4))
        for i in range(12):
            store.put(f"/calicnm/v1/test/proxy/d{i}", str(i))  # a retried put is harmless
        for i in range(12):
            kv = store.get(f"/calicnm/v1/test/proxy/d{i}")
            assert kv is not None and kv.value == str(i)
    finally:
        store.close()
    stats = proxy.stats()
    # Each lost put is retried (and counted again): the 4th, 8th and 12th of 15 writes.
    assert stats["dropped"] == 3, stats
    assert stats["requests"] >= 21 + 16
    assert stats["blind_connections"] == 0


@pytest.mark.etcd
def test_a_blackout_keeps_the_outcome_unknown(proxy: EtcdProxy, etcd_store: EtcdStore) -> None:
    key = "/calicnm/v1/test/proxy/f"
    store = EtcdStore(parse_endpoints(proxy.url), timeout=1.0)
    try:
        store.get(key)
        proxy.set_policy(DropPolicy(every=1, limit=1, blackouts=(3.0,)))
        began = time.monotonic()
        with pytest.raises(DatastoreUnavailable):
            store.commit(Txn(compare=[(key, ABSENT)], puts=[(key, "mine")]))
        kv = etcd_store.get(key)
        assert kv is not None and kv.value == "mine", "the write was not applied"
        stats = proxy.stats()
        assert stats["blackouts"] == 1 and stats["blackout_refused"] >= 1, stats
        assert time.monotonic() - began < 3.0, "the blackout should outlast the client"

        def answers() -> bool:
            try:
                return store.get(key) is not None
            except DatastoreUnavailable:
                return False

        wait_for(answers, timeout=15)  # after the blackout (and gRPC's reconnect backoff)
    finally:
        store.close()


@pytest.mark.etcd
def test_stop_is_bounded_with_a_watch_open(etcd_server: EtcdServer) -> None:
    proxy = EtcdProxy(etcd_server.url).start()
    store = store_at(proxy.url)
    broke = threading.Event()
    try:
        store.watch("/calicnm/v1/test/proxy/", lambda healthy: healthy or broke.set())
        began = time.monotonic()
        proxy.stop()
        assert time.monotonic() - began < 5
        assert broke.wait(10), "the watch did not notice the proxy stopping"
        late = EtcdStore(parse_endpoints(proxy.url), timeout=1.0)
        with pytest.raises(CalicnmError):
            late.get("/x")  # nobody listens any more
        late.close()
    finally:
        proxy.stop()
        store.close()


@pytest.mark.etcd
def test_proxy_process(etcd_server: EtcdServer, tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    with ProxyProcess(etcd_server.url, listen, tmp_path / "proxy") as proc:
        store = store_at(proc.url)
        try:
            store.put("/calicnm/v1/test/proxy/e", "0")
            proc.set_policy(DropPolicy(every=1, limit=2))
            for i in range(4):
                store.put("/calicnm/v1/test/proxy/e", str(i))
            wait_for(lambda: (proc.stats() or {}).get("dropped") == 2)
            kv = store.get("/calicnm/v1/test/proxy/e")
            assert kv is not None and kv.value == "3"
        finally:
            store.close()
    final = proc.stats()
    assert final is not None and final["stopped"] and final["dropped"] == 2, final
    assert "lost the reply to /etcdserverpb.KV/Put" in proc.log_path.read_text()
