"""Test doubles that model state, never call sequences.

``MemoryStore`` implements the ``Store`` protocol with etcd's revision
semantics (a global counter; each write stamps the key's mod_revision), so
compare-and-swap code behaves as it does against etcd.  ``FakePlumbing``
keeps the links it would have made, so tests assert the resulting host
state.
"""

from __future__ import annotations

import threading

from calicnm.endpoint import LinkPlan
from calicnm.errors import DataplaneError, DatastoreUnavailable
from calicnm.store.kv import ABSENT, KV, Txn


class MemoryStore:
    def __init__(self) -> None:
        self._data: dict[str, tuple[str, int]] = {}
        self._revision = 0
        self._lock = threading.Lock()
        self.down = False
        self.commits = 0

    def _check(self) -> None:
        if self.down:
            raise DatastoreUnavailable("etcd is unreachable at memory:0: test")

    def get(self, key: str) -> KV | None:
        self._check()
        with self._lock:
            item = self._data.get(key)
            return KV(key, *item) if item else None

    def list(self, prefix: str) -> list[KV]:
        self._check()
        with self._lock:
            return [KV(k, *v) for k, v in sorted(self._data.items()) if k.startswith(prefix)]

    def put(self, key: str, value: str) -> None:
        self._check()
        with self._lock:
            self._revision += 1
            self._data[key] = (value, self._revision)

    def delete(self, key: str) -> bool:
        self._check()
        with self._lock:
            return self._data.pop(key, None) is not None

    def commit(self, txn: Txn) -> int:
        self._check()
        with self._lock:
            self.commits += 1
            for key, revision in txn.compare:
                current = self._data.get(key)
                if revision == ABSENT and current is not None:
                    return 0
                if revision != ABSENT and (current is None or current[1] != revision):
                    return 0
            self._revision += 1
            for key, value in txn.puts:
                self._data[key] = (value, self._revision)
            for key in txn.deletes:
                self._data.pop(key, None)
            return self._revision

    def close(self) -> None:
        pass

    def all_keys(self) -> list[str]:
        return sorted(self._data)


class FakePlumbing:
    def __init__(self) -> None:
        self.links: dict[str, LinkPlan] = {}
        self.fail_create = False

    def create(self, plan: LinkPlan) -> None:
        if self.fail_create:
            raise DataplaneError(f"cannot create veth {plan.host_if}: test failure")
        self.links[plan.host_if] = plan

    def remove(self, host_if: str, peer_if: str | None = None) -> bool:
        return self.links.pop(host_if, None) is not None

    def exists(self, ifname: str) -> bool:
        return any(ifname in (p.host_if, p.peer_if) for p in self.links.values())
