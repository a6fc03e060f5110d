"""One node per host, and one datastore per node: the checks a node makes
before it touches anything."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from calicnm.config import Config
from calicnm.errors import ForeignDatastore
from calicnm.node.daemon import AnotherNode, NodeLock, adopt_datastore, refuse_live_socket
from calicnm.store import keys
from calicnm.store.identity import DatastoreGuard, claim_cluster_id, read_cluster_id
from calicnm.wiring import remembered_cluster_id
from tests.fakes import MemoryStore


def test_a_first_start_writes_the_id_and_later_starts_need_the_same(tmp_path):
    config = Config(state_dir=str(tmp_path))
    store = MemoryStore()
    first = adopt_datastore(store, config, "memory")
    assert read_cluster_id(store) == first == remembered_cluster_id(config)
    assert adopt_datastore(store, config, "memory") == first

    empty = MemoryStore()
    with pytest.raises(ForeignDatastore, match="not the one this host served"):
        adopt_datastore(empty, config, "memory")
    assert empty.all_keys() == [], "a refused datastore is not written to"

    accepted = Config(state_dir=str(tmp_path), accept_new_datastore="true")
    second = adopt_datastore(empty, accepted, "memory")
    assert second != first and remembered_cluster_id(config) == second


def test_a_new_host_adopts_the_clusters_id(tmp_path):
    store = MemoryStore()
    cluster = claim_cluster_id(store, "ab" * 16)
    config = Config(state_dir=str(tmp_path / "new-host"))
    os.makedirs(config.state_dir)
    assert adopt_datastore(store, config, "memory") == cluster


def test_the_guard_refuses_a_swapped_datastore_and_caches_for_its_ttl():
    store = MemoryStore()
    claim_cluster_id(store, "cd" * 16)
    clock = [0.0]
    guard = DatastoreGuard(store, "cd" * 16, ttl=2.0, clock=lambda: clock[0])
    guard.check()
    store.delete(keys.CLUSTER_ID)
    guard.check()  # within the ttl: the last answer stands
    clock[0] = 3.0
    with pytest.raises(ForeignDatastore, match="found none"):
        guard.check()


def test_only_one_node_lock_at_a_time(tmp_path):
    path = str(tmp_path / "node.lock")
    lock = NodeLock(path)
    with pytest.raises(AnotherNode, match=f"pid {os.getpid()}"):
        NodeLock(path)
    lock.release()
    NodeLock(path).release()


def test_a_live_socket_is_refused_and_a_stale_one_is_not(tmp_path):
    path = str(tmp_path / "p.sock")
    refuse_live_socket(path)  # nothing there
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()[0]))
    thread.start()
    try:
        with pytest.raises(AnotherNode, match="already serving"):
            refuse_live_socket(path)
    finally:
        thread.join(timeout=2)
        for conn in accepted:
            conn.close()
        server.close()
    refuse_live_socket(path)  # the file is left, but nobody answers: stale
