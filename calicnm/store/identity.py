"""Which datastore a host serves: a cluster id, written once into etcd at the
first start of the first node, and remembered by every node in its state
directory.

A node never applies a datastore whose id differs from the one it last
served, or that has none: an etcd restored empty, or an ``ETCD_ENDPOINTS``
pointing at another cluster, would otherwise be taken as the truth, and
every chain, route and address of the running containers would be wiped
or handed out again.  ``DatastoreGuard`` is the check the agent makes
before each pass and the plugin before each call that allocates; the
operator confirms a new datastore with ``calicnm node run
--accept-new-datastore``.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from calicnm.errors import ForeignDatastore
from calicnm.store import keys
from calicnm.store.kv import KV, Store, create

_ID_RE = re.compile(r"\A[0-9a-f]{32}\Z")


def new_cluster_id() -> str:
    return uuid.uuid4().hex


def is_cluster_id(text: str | None) -> bool:
    return text is not None and _ID_RE.match(text) is not None


class KeyGetter(Protocol):
    """Anything that reads one key: a ``Store``, or the agent's in-memory copy."""

    def get(self, key: str) -> KV | None: ...


def read_cluster_id(store: KeyGetter) -> str | None:
    """The datastore's id; None when it has none (or an invalid one)."""
    kv = store.get(keys.CLUSTER_ID)
    value = kv.value if kv is not None else None
    return value if is_cluster_id(value) else None


def claim_cluster_id(store: Store, candidate: str) -> str:
    """The datastore's id, writing ``candidate`` first if it has none (only
    if still absent: two nodes starting at once agree on one id)."""
    if not is_cluster_id(candidate):
        raise ValueError(f"{candidate!r} is not a cluster id")
    create(store, keys.CLUSTER_ID, candidate)
    found = read_cluster_id(store)
    if found is None:
        raise ForeignDatastore(f"the datastore's cluster id at {keys.CLUSTER_ID} is invalid")
    return found


class DatastoreGuard:
    """``check()`` raises ``ForeignDatastore`` unless the datastore carries
    ``expected``.  The answer is kept for ``ttl`` seconds, so the plugin's
    hot path pays one read per ``ttl``, not one per call."""

    def __init__(
        self,
        store: Store,
        expected: str,
        ttl: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._expected = expected
        self._ttl = ttl
        self._clock = clock
        self._good_until = 0.0

    def check(self, source: KeyGetter | None = None) -> None:
        """``source``: where to read the id instead of the store (the agent's
        in-memory copy, whose id belongs to the records it is applying)."""
        now = self._clock()
        if now < self._good_until:
            return
        found = read_cluster_id(source if source is not None else self._store)
        if found != self._expected:
            raise ForeignDatastore(
                f"the datastore is not the one this host served (cluster id "
                f"{self._expected}, found {found or 'none'}); the kernel state is left as it "
                "was. If this datastore is meant to replace the old one, restart the node "
                "with 'calicnm node run --accept-new-datastore'"
            )
        self._good_until = now + self._ttl
