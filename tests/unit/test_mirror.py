"""The datastore mirror equals a fresh read, whatever happened in between.

Random sequences of writes (puts, deletes, multi-key transactions, invalid values,
deletes and re-creates of the same key), broken streams, compactions of etcd's history
and restarts of the mirror: after each step that leaves the mirror fresh, its copy, and
the snapshot the agent compiles from it, equal a fresh read of the store.
"""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from calicnm.errors import DatastoreUnavailable
from calicnm.model import Endpoint, Network
from calicnm.policy import Profile
from calicnm.store import keys
from calicnm.store.kv import Txn
from calicnm.store.mirror import PrefixMirror
from calicnm.store.records import read_snapshot
from tests.fakes import MemoryStore

NETS = ["a" * 64, "b" * 64]
EIDS = [c * 64 for c in "123456"]
HOSTS = ["h1", "h2", "h3"]


def endpoint_value(eid: str, host: str, net: str, n: int) -> str:
    ip = ipaddress.IPv4Address(f"10.0.{n}.{EIDS.index(eid) + 1}")
    return Endpoint(
        eid, host, net, f"cali{eid[:11]}", f"tmp{eid[:12]}", "ee:ee:ee:ee:ee:ee", (ip,)
    ).to_json()


records = st.one_of(
    st.tuples(st.just("profile"), st.sampled_from(["p1", "p2", "dataman"]), st.integers(0, 3)),
    st.tuples(st.just("network"), st.sampled_from(NETS), st.integers(0, 3)),
    st.tuples(st.just("endpoint"), st.sampled_from(EIDS), st.integers(0, 3)),
    st.tuples(st.just("host"), st.sampled_from(HOSTS), st.integers(0, 3)),
)


def key_and_value(record: tuple[str, str, int], host: str) -> tuple[str, str]:
    kind, name, n = record
    if kind == "profile":
        value = Profile.default(name).to_json() if n else "{not json"
        return keys.profile(name), value
    if kind == "network":
        return keys.network(name), Network(name, docker_name=f"net{n}").to_json()
    if kind == "endpoint":
        return keys.endpoint(host, name), endpoint_value(name, host, NETS[n % 2], n)
    return keys.host_meta(name), f'{{"name": "{name}", "ip": "198.18.0.{n + 2}", "as_num": null}}'


class MirrorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryStore()
        self.wakes = 0
        self.mirror = PrefixMirror(self.store, keys.ROOT + "/", self._woken)
        self.mirror.start()

    def _woken(self) -> None:
        self.wakes += 1

    @rule(record=records, host=st.sampled_from(HOSTS))
    def put(self, record: tuple[str, str, int], host: str) -> None:
        self.store.put(*key_and_value(record, host))

    @rule(record=records, host=st.sampled_from(HOSTS))
    def delete(self, record: tuple[str, str, int], host: str) -> None:
        self.store.delete(key_and_value(record, host)[0])

    @rule(
        puts=st.lists(st.tuples(records, st.sampled_from(HOSTS)), max_size=4),
        deletes=st.lists(st.tuples(records, st.sampled_from(HOSTS)), max_size=3),
    )
    def transaction(self, puts: list, deletes: list) -> None:  # type: ignore[type-arg]
        written = dict(key_and_value(r, h) for r, h in puts)
        removed = [key_and_value(r, h)[0] for r, h in deletes]
        self.store.commit(
            Txn(puts=list(written.items()), deletes=[k for k in removed if k not in written])
        )

    @rule()
    def outside_the_prefix(self) -> None:
        self.store.put("/other/key", "x")

    @rule()
    def stream_breaks(self) -> None:
        self.store.down = True
        self.store.down = False
        assert not self.mirror.fresh

    @rule(everything=st.booleans())
    def compaction(self, everything: bool) -> None:
        self.store.compact(None if everything else max(0, self.store.list_at("")[1] - 2))

    @precondition(lambda self: not self.mirror.fresh)
    @rule()
    def restart_while_down(self) -> None:
        self.store.down = True
        try:
            self.mirror.start()
        except DatastoreUnavailable:
            pass
        finally:
            self.store.down = False
        assert not self.mirror.fresh

    @precondition(lambda self: not self.mirror.fresh)
    @rule()
    def restart(self) -> None:
        self.mirror.start()
        assert self.mirror.fresh

    @invariant()
    def equals_a_fresh_read_when_fresh(self) -> None:
        if not self.mirror.fresh:
            return
        view = self.mirror.view()
        prefix = keys.ROOT + "/"
        assert view.list(prefix) == self.store.list(prefix)
        assert read_snapshot(view) == read_snapshot(self.store)
        assert self.mirror.revision <= self.store.list_at("")[1]


TestMirror = MirrorMachine.TestCase
TestMirror.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_a_resumed_stream_reads_nothing_and_a_compacted_one_reads_once() -> None:
    store = MemoryStore()
    store.put(keys.profile("p1"), Profile.default("p1").to_json())
    mirror = PrefixMirror(store, keys.ROOT + "/")
    mirror.start()
    assert mirror.reloads == 1
    store.down = True  # the stream breaks
    store.down = False
    store.put(keys.profile("p2"), Profile.default("p2").to_json())
    mirror.start()  # resumed from its revision: the missed change is replayed
    assert mirror.reloads == 1 and mirror.fresh
    assert [kv.key for kv in mirror.view().list(keys.PROFILES)] == [
        keys.profile("p1"),
        keys.profile("p2"),
    ]
    store.down = True
    store.down = False
    store.delete(keys.profile("p1"))
    store.compact()  # the history after the mirror's revision is gone
    mirror.start()
    assert mirror.reloads == 2 and mirror.fresh
    assert [kv.key for kv in mirror.view().list(keys.PROFILES)] == [keys.profile("p2")]


def test_a_compaction_never_goes_back_and_a_restart_after_it_reads_anew() -> None:
    """Found by the state machine: a change missed while the stream was down, then
    compacted away, must come back through a full read, whatever compaction follows."""
    store = MemoryStore()
    mirror = PrefixMirror(store, keys.ROOT + "/")
    mirror.start()
    store.down = True
    store.down = False
    store.put(keys.profile("p1"), "{not json")
    store.put("/other/key", "x")
    store.compact()
    store.compact(0)  # older than the last one: etcd refuses it, and so does the fake
    mirror.start()
    assert mirror.fresh and mirror.reloads == 2
    assert mirror.view().list(keys.ROOT + "/") == store.list(keys.ROOT + "/")


class _Replaceable:
    """A change source whose etcd can be swapped for another (restored empty)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def list_at(self, prefix: str):  # type: ignore[no-untyped-def]
        return self.store.list_at(prefix)

    def current_revision(self) -> int:
        return self.store.current_revision()

    def watch_changes(self, prefix, after, on_changes, on_end):  # type: ignore[no-untyped-def]
        return self.store.watch_changes(prefix, after, on_changes, on_end)


def test_an_etcd_replaced_by_an_older_one_is_read_anew_not_resumed() -> None:
    """A watch from a revision etcd has not reached yet would wait silently: a copy
    whose revision is ahead of etcd's reads the prefix anew."""
    old = MemoryStore()
    for i in range(5):
        old.put(keys.profile(f"p{i}"), Profile.default(f"p{i}").to_json())
    source = _Replaceable(old)
    mirror = PrefixMirror(source, keys.ROOT + "/")  # type: ignore[arg-type]
    mirror.start()
    assert len(mirror.view().list(keys.PROFILES)) == 5
    old.down = True  # the stream ends
    source.store = MemoryStore()  # an empty etcd at the same address
    mirror.start()
    assert mirror.fresh and mirror.reloads == 2
    assert mirror.view().list(keys.ROOT + "/") == []
