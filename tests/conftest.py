"""Shared fixtures: a real etcd for the whole session, started and stopped here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from calicnm.store.etcd import EtcdStore, parse_endpoints
from lab.etcd import EtcdServer
from lab.procs import HarnessError


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    try:
        server = EtcdServer().start()
    except HarnessError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def etcd_store(etcd_server: EtcdServer) -> Iterator[EtcdStore]:
    """A store on the session etcd, emptied of calicnm keys before each test."""
    store = EtcdStore(parse_endpoints(etcd_server.url), timeout=3.0)
    for kv in store.list("/calicnm/"):
        store.delete(kv.key)
    try:
        yield store
    finally:
        store.close()
