"""The datastore boundary as calicnm sees it: a small key-value protocol.

``Store`` offers string keys, string values and the etcd ``mod_revision`` of
each value, plus one atomic ``commit`` that compares revisions and applies
puts and deletes together.  Compare-and-swap everywhere is built on
``commit``; ``update`` is the one retry loop every read-modify-write uses.
``store.etcd.EtcdStore`` is the production implementation and
``tests/fakes.MemoryStore`` the in-memory one; both keep etcd's revision
semantics.

Two reads serve a reader that keeps its own copy of a prefix
(``store.mirror``): ``list_at`` returns the keys with the revision they were
read at, and ``watch_changes`` streams every later change with its value,
from a given revision on, or says the history is no longer there.

``Leases`` is etcd's lease API, for records that must vanish when their
writer does (a node's liveness): keys put on a lease are deleted when it
expires or is revoked, and keeping a lease alive writes nothing (no
revision, no watch event).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar

from calicnm.errors import DatastoreConflict

T = TypeVar("T")

ABSENT = 0
"""Revision to compare against in ``Txn.compare`` for "key must not exist"."""


class KV(NamedTuple):
    key: str
    value: str
    revision: int


class Change(NamedTuple):
    """One write a watch saw: ``value`` is None for a delete; ``revision`` is
    the revision the write made."""

    key: str
    value: str | None
    revision: int


OnChanges = Callable[[list["Change"]], None]
OnEnd = Callable[[bool], None]
"""Called once when a change stream ends by itself: True when etcd no longer
holds the history it was asked to start from (compacted), False when the
stream broke (the member went away, the store was closed)."""


@dataclass
class Txn:
    """An all-or-nothing change: applied only if every compared key is still
    at its revision (``ABSENT`` meaning it must not exist)."""

    compare: list[tuple[str, int]] = field(default_factory=list)
    puts: list[tuple[str, str]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)


class Reader(Protocol):
    """The reads a decoder needs: what ``store.mirror.MirrorView`` offers too."""

    def get(self, key: str) -> KV | None: ...

    def list(self, prefix: str) -> list[KV]: ...


class Store(Reader, Protocol):
    def put(self, key: str, value: str) -> None: ...

    def delete(self, key: str) -> bool: ...

    def commit(self, txn: Txn) -> int:
        """Apply ``txn`` if its compares hold: the new revision, else 0."""
        ...

    def close(self) -> None: ...


class ChangeSource(Protocol):
    """A store that can feed a copy of a prefix kept elsewhere."""

    def list_at(self, prefix: str) -> tuple[list[KV], int]:
        """The keys under ``prefix`` and the store's revision they were read at."""
        ...

    def current_revision(self) -> int:
        """The store's revision now (one cheap read)."""
        ...

    def watch_changes(
        self, prefix: str, after: int, on_changes: OnChanges, on_end: OnEnd
    ) -> Callable[[], None]:
        """Stream every change under ``prefix`` made after revision ``after``,
        in revision order, in batches (``on_changes``), until cancelled (the
        function returned; idempotent) or ended (``on_end``, called once, in
        any thread, possibly before this returns: a compacted history may be
        reported either way).  Raises ``DatastoreUnavailable`` if no endpoint
        starts the stream."""
        ...


class Leases(Protocol):
    """etcd leases.  A lease lives ``ttl`` seconds after its grant or its last
    keepalive; when it expires or is revoked, etcd deletes every key put on
    it (one revision, and a delete event for each key).  Calls raise
    ``DatastoreUnavailable`` when etcd cannot be reached."""

    def grant_lease(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (etcd's minimum is 2): its id."""
        ...

    def keep_alive(self, lease: int) -> int:
        """Restart ``lease``'s time to live: the seconds it now has left, 0
        when etcd no longer holds it (expired or revoked: its keys are
        gone).  Makes no revision."""
        ...

    def revoke_lease(self, lease: int) -> bool:
        """End ``lease`` now, deleting its keys; False if it was already gone."""
        ...

    def put_leased(self, key: str, value: str, lease: int) -> int:
        """Write ``key`` on ``lease`` (moving it off any lease it was on): the
        revision of the write.  ``LeaseLost`` if etcd no longer holds the
        lease (nothing is written then)."""
        ...


def create(store: Store, key: str, value: str) -> bool:
    """Write ``key`` only if it does not exist."""
    return store.commit(Txn(compare=[(key, ABSENT)], puts=[(key, value)])) != 0


def replace(store: Store, key: str, value: str, revision: int) -> bool:
    """Write ``key`` only if it is still at ``revision`` (ABSENT: create)."""
    return store.commit(Txn(compare=[(key, revision)], puts=[(key, value)])) != 0


def delete_if(store: Store, key: str, revision: int) -> bool:
    return store.commit(Txn(compare=[(key, revision)], deletes=[key])) != 0


CAS_RETRIES = 100
"""How many times one compare-and-swap is tried before ``DatastoreConflict``.

Every read-modify-write in calicnm goes through ``retry_cas``: IPAM blocks
under many allocators, profile and endpoint edits, BGP settings.  Between
tries it sleeps a random moment that grows with the try (at most 50 ms), so
a hundred tries span a few seconds of real contention at most."""


def retry_cas(
    attempt: Callable[[], T | None],
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Call ``attempt`` until it returns something other than None.

    ``attempt`` reads, computes and commits; it returns None when its
    compare lost (someone wrote in between) and it should run again on a
    fresh read.  Exceptions from ``attempt`` propagate at once: that is how
    a change refuses to be made.  After ``CAS_RETRIES`` lost compares this
    raises ``DatastoreConflict`` naming ``what``, having written nothing.
    """
    jitter = rng or random
    for tries in range(CAS_RETRIES):
        result = attempt()
        if result is not None:
            return result
        sleep(jitter.uniform(0, min(0.002 * (tries + 1), 0.05)))
    raise DatastoreConflict(f"{what} kept changing; gave up after {CAS_RETRIES} tries")


def update(
    store: Store,
    key: str,
    change: Callable[[KV | None], str | None],
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """Compare-and-swap ``key`` to ``change(current)``.

    ``change`` gets the current value (None when absent) and returns the new
    one, or None to leave the key as it is; it may raise to refuse.  Returns
    what the key holds afterwards (None if it is absent)."""

    def attempt() -> tuple[str | None] | None:
        current = store.get(key)
        new = change(current)
        if new is None:
            return (current.value if current else None,)
        if replace(store, key, new, current.revision if current else ABSENT):
            return (new,)
        return None

    result: str | None = retry_cas(attempt, what, sleep)[0]
    return result
