"""EtcdStore's change stream against a real etcd: the values and revisions of puts,
deletes and transactions arrive in order, a stream from a compacted revision says so at
once, and a mirror kept by the stream equals a fresh read, including across a lost
stream resumed from its revision and a compacted history read anew."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from calicnm.store.etcd import EtcdStore
from calicnm.store.kv import Change, Txn
from calicnm.store.mirror import PrefixMirror
from calicnm.store.records import read_snapshot
from lab.etcd import EtcdServer

pytestmark = pytest.mark.etcd

PREFIX = "/calicnm/v1/"


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s")
        time.sleep(0.02)


def compact(server: EtcdServer, revision: int) -> None:
    subprocess.run(
        ["etcdctl", "--endpoints", server.url, "compact", str(revision)],
        env={**os.environ, "ETCDCTL_API": "3"},
        check=True,
        capture_output=True,
        timeout=30,
    )


def converge(mirror: PrefixMirror, settled: Callable[[], bool]) -> None:
    """Start the mirror again whenever its stream has ended, as the agent does,
    until it is fresh and equal to the store (bounded)."""

    def done() -> bool:
        if not mirror.fresh:
            mirror.start()
        return mirror.fresh and settled()

    wait_until(done)


def test_changes_arrive_with_values_and_revisions(etcd_store: EtcdStore) -> None:
    etcd_store.put(PREFIX + "profiles/a", "1")
    kvs, revision = etcd_store.list_at(PREFIX)
    assert [kv.key for kv in kvs] == [PREFIX + "profiles/a"]
    seen: list[Change] = []
    lock = threading.Lock()

    def on_changes(changes: list[Change]) -> None:
        with lock:
            seen.extend(changes)

    ended: list[bool] = []
    cancel = etcd_store.watch_changes(PREFIX, revision, on_changes, ended.append)
    try:
        etcd_store.put(PREFIX + "profiles/b", "2")
        etcd_store.delete(PREFIX + "profiles/a")
        etcd_store.put("/elsewhere", "x")
        at = etcd_store.commit(Txn(puts=[(PREFIX + "networks/n", "3"), (PREFIX + "pools/p", "4")]))
        wait_until(lambda: len(seen) == 4)
    finally:
        cancel()
    with lock:
        got = [(c.key, c.value) for c in seen]
        revisions = [c.revision for c in seen]
    assert got == [
        (PREFIX + "profiles/b", "2"),
        (PREFIX + "profiles/a", None),
        (PREFIX + "networks/n", "3"),
        (PREFIX + "pools/p", "4"),
    ]
    assert revisions[0] > revision and revisions == sorted(revisions)
    assert revisions[2] == revisions[3] == at
    assert ended == []


def test_a_stream_from_a_compacted_revision_ends_at_once(
    etcd_server: EtcdServer, etcd_store: EtcdStore
) -> None:
    etcd_store.put(PREFIX + "profiles/a", "1")
    _kvs, old = etcd_store.list_at(PREFIX)
    etcd_store.put(PREFIX + "profiles/a", "2")
    etcd_store.put(PREFIX + "profiles/a", "3")
    _kvs, now = etcd_store.list_at(PREFIX)
    compact(etcd_server, now)
    ended: list[bool] = []
    cancel = etcd_store.watch_changes(PREFIX, old, lambda _c: None, ended.append)
    try:
        wait_until(lambda: ended == [True])  # etcd says so right after creating it
    finally:
        cancel()


def test_the_mirror_equals_a_fresh_read_across_a_resume_and_a_compaction(
    etcd_server: EtcdServer, etcd_store: EtcdStore
) -> None:
    for i in range(5):
        etcd_store.put(PREFIX + f"profiles/p{i}", f'{{"bad": {i}}}')
    mirror = PrefixMirror(etcd_store, PREFIX)
    mirror.start()

    def settled() -> bool:
        return mirror.view().list(PREFIX) == etcd_store.list(PREFIX)

    try:
        for i in range(20):
            etcd_store.put(PREFIX + f"networks/n{i % 4}", f"v{i}")
            if i % 3 == 0:
                etcd_store.delete(PREFIX + f"profiles/p{i % 5}")
        wait_until(settled)
        assert read_snapshot(mirror.view()) == read_snapshot(etcd_store)
        assert mirror.reloads == 1

        mirror.stop()  # as a lost stream: changes meanwhile are replayed on resume
        etcd_store.put(PREFIX + "networks/late", "x")
        mirror.start()
        wait_until(settled)
        assert mirror.reloads == 1

        mirror.stop()
        etcd_store.delete(PREFIX + "networks/late")
        _kvs, now = etcd_store.list_at(PREFIX)
        # The history the mirror would resume from is gone, including the delete
        # made at the compaction revision itself.
        compact(etcd_server, now)
        converge(mirror, settled)
        assert mirror.reloads == 2
    finally:
        mirror.stop()


def test_a_consumer_that_fails_ends_its_stream(etcd_store: EtcdStore) -> None:
    """Fail closed: a batch the consumer could not take ends the stream (as broken,
    not compacted), so it is never handed later changes as if it had applied it;
    a mirror then resumes from what it last applied and ends equal to the store."""
    _kvs, revision = etcd_store.list_at(PREFIX)
    calls: list[int] = []
    ended: list[bool] = []

    def on_changes(changes: list[Change]) -> None:
        calls.append(len(changes))
        raise RuntimeError("cannot take this batch")

    cancel = etcd_store.watch_changes(PREFIX, revision, on_changes, ended.append)
    try:
        etcd_store.put(PREFIX + "profiles/x", "1")
        wait_until(lambda: ended == [False])
        etcd_store.put(PREFIX + "profiles/y", "2")
        time.sleep(0.3)
        assert calls == [1], "no batch after the one that failed"
    finally:
        cancel()

    failing = [True]
    mirror = PrefixMirror(etcd_store, PREFIX)
    original = mirror._apply

    def flaky(changes: list[Change]) -> None:
        if failing and failing.pop():
            raise RuntimeError("once")
        original(changes)

    mirror._apply = flaky  # type: ignore[method-assign]
    mirror.start()
    try:
        etcd_store.put(PREFIX + "profiles/z", "3")
        converge(mirror, lambda: mirror.view().list(PREFIX) == etcd_store.list(PREFIX))
    finally:
        mirror.stop()


def test_a_listing_past_grpcs_message_limit_is_read_in_pages_at_one_revision(
    etcd_store: EtcdStore,
) -> None:
    """About 6 MiB under one prefix (one range answer would pass gRPC's 4 MiB): the
    listing comes back whole, in key order, at the revision of its first page."""
    filler = "x" * 640
    for batch in range(95):
        etcd_store.commit(
            Txn(
                puts=[(f"{PREFIX}hosts/h{batch:03d}/endpoints/{n:04d}", filler) for n in range(100)]
            )
        )
    kvs, revision = etcd_store.list_at(PREFIX + "hosts/")
    assert len(kvs) == 9500
    assert [kv.key for kv in kvs] == sorted(kv.key for kv in kvs)
    assert revision == max(kv.revision for kv in kvs)
    assert len(etcd_store.list(PREFIX + "hosts/h050/")) == 100
    assert etcd_store.list(PREFIX + "nothing/") == []
