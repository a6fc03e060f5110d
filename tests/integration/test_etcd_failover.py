"""EtcdStore against a real 3-member etcd cluster whose members are stopped,
killed and restarted under load.

What must hold (issue "Never leak, never double-claim", etcd part): only
``CalicnmError`` ever reaches the callers, and ``DatastoreUnavailable`` only
around an outage; compare-and-swap allocation never hands one address to two
holders and never loses track of one; watches break with one
``notify(False)`` and work again when made anew; a closed store fails calls
cleanly instead of raising from the channel.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from calicnm.errors import CalicnmError, DatastoreUnavailable
from calicnm.ipam import AddressInfo, Allocator, PoolRef
from calicnm.model import Pool
from calicnm.store.etcd import EtcdStore, parse_endpoints
from calicnm.store.kv import ABSENT, Txn
from lab.etcd import EtcdCluster
from lab.procs import HarnessError

pytestmark = pytest.mark.etcd

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address

TIMEOUT = 3.0
"""Per-call timeout of the stores under test."""
WINDOW_LIMIT = 10.0
"""A failure counts as inside an outage window if it ended at most this long
after the member was stopped/killed/started (measured windows are printed)."""
THREADS = 8


@pytest.fixture
def cluster() -> Iterator[EtcdCluster]:
    try:
        c = EtcdCluster(3).start()
    except HarnessError as exc:
        pytest.fail(str(exc))
    try:
        yield c
    finally:
        c.cleanup()


def store_on(cluster: EtcdCluster, timeout: float = TIMEOUT) -> EtcdStore:
    return EtcdStore(parse_endpoints(cluster.endpoints), timeout=timeout)


# ---- load: allocators and readers on one shared store -----------------------------------


@dataclass
class Op:
    kind: str
    start: float
    end: float
    error: BaseException | None = None
    address: A | None = None
    handle: str = ""
    result: object = None


@dataclass
class Worker:
    """One thread: assign, check the holder, release the oldest, forever."""

    index: int
    ipam: Allocator
    stop: threading.Event
    ops: list[Op] = field(default_factory=list)
    held: dict[A, str] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)
    """Handles whose assign raised: the address may or may not be allocated."""
    foreign: list[BaseException] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    def timed(self, kind: str, fn: Callable[[], object], handle: str = "") -> Op:
        start = time.monotonic()
        op = Op(kind, start, start, handle=handle)
        try:
            result = fn()
        except CalicnmError as exc:
            op.error = exc
        except BaseException as exc:  # the defect: a library exception got through
            op.error = exc
            self.foreign.append(exc)
        else:
            op.result = result
            if isinstance(result, A):
                op.address = result
        op.end = time.monotonic()
        self.ops.append(op)
        return op

    def run(self) -> None:
        n = 0
        while not self.stop.is_set() and not self.foreign:
            n += 1
            handle = f"w{self.index}-{n}"
            op = self.timed("assign", lambda h=handle: self.ipam.assign(PoolRef(), h), handle)
            if op.error is not None:
                self.unknown.add(handle)
            elif op.address is not None:
                self.held[op.address] = handle
                check = self.timed("read", lambda a=op.address: self.ipam.info(a))
                if isinstance(check.result, AddressInfo):
                    holder = check.result.holder
                    if holder is None or holder.handle != handle:
                        self.mismatches.append(f"{op.address}: {holder} after assign to {handle}")
            if len(self.held) > 12:
                address = next(iter(self.held))
                rel = self.timed("release", lambda a=address: self.ipam.release(a))
                rel.address = address
                if rel.error is None:
                    # False: an earlier release whose answer was lost did free it.
                    del self.held[address]


def held_spans(workers: list[Worker]) -> list[str]:
    """Addresses that were assigned to a second holder before the first one
    even started to release them: a double claim."""
    events: dict[A, list[tuple[float, float, str]]] = {}
    for w in workers:
        assigned: dict[A, float] = {}
        for op in w.ops:
            if op.kind == "assign" and op.error is None and op.address is not None:
                assigned[op.address] = op.end
                events.setdefault(op.address, []).append((op.start, op.end, "assign"))
            elif op.kind == "release" and op.address is not None and op.address in assigned:
                events[op.address].append((op.start, op.end, "release"))
                assigned.pop(op.address)
    bad = []
    for address, evs in events.items():
        evs.sort()
        holding = False
        last_release_start = 0.0
        for start, end, kind in evs:
            if kind == "assign":
                if holding and end < last_release_start:
                    bad.append(f"{address} assigned again at {end:.3f}")
                holding = True
            else:
                holding = False
                last_release_start = start
    return bad


def outage_report(
    workers: list[Worker], incidents: list[tuple[str, float]]
) -> tuple[list[str], list[Op]]:
    """Per incident, its window: the calls that failed or were slow (over 1 s)
    and ended after it (and before the next one, at most ``WINDOW_LIMIT``
    seconds later), and how long after it the last of them ended.  Also the
    failures that fall in no incident's window."""
    ops = [op for w in workers for op in w.ops]

    def incident_of(op: Op) -> int | None:
        before = [i for i, (_, t) in enumerate(incidents) if t <= op.end]
        if not before or op.end - incidents[before[-1]][1] > WINDOW_LIMIT:
            return None
        return before[-1]

    outside = [op for op in ops if op.error and incident_of(op) is None]
    lines = []
    for i, (name, t) in enumerate(incidents):
        mine = [op for op in ops if incident_of(op) == i]
        failed = [op for op in mine if op.error]
        slow = [op for op in mine if not op.error and op.end - op.start > 1]
        window = max((op.end for op in failed + slow), default=t) - t
        slowest = max((op.end - op.start for op in mine), default=0.0)
        lines.append(
            f"{name}: {len(failed)} failed and {len(slow)} slow (>1s) calls, "
            f"window {window:.2f}s, slowest call {slowest:.2f}s"
        )
    return lines, outside


def test_allocations_survive_stopping_and_killing_members(cluster: EtcdCluster) -> None:
    store = store_on(cluster)
    setup = Allocator(store, "setup")
    setup.add_pool(Pool(N("10.40.0.0/22")))
    stop = threading.Event()
    workers = [Worker(i, Allocator(store, "ha" if i % 2 else "hb"), stop) for i in range(THREADS)]
    threads = [threading.Thread(target=w.run, name=f"alloc-{w.index}") for w in workers]
    incidents: list[tuple[str, float]] = []
    try:
        for t in threads:
            t.start()
        time.sleep(2)
        first = cluster.index_of(store.current())
        incidents.append((f"SIGTERM member {first}", time.monotonic()))
        cluster.stop_member(first)
        time.sleep(4)
        incidents.append((f"restart member {first}", time.monotonic()))
        cluster.start_member(first)
        time.sleep(2)
        second = cluster.index_of(store.current())
        assert second != first, "the store still uses the member that was stopped"
        incidents.append((f"SIGKILL member {second}", time.monotonic()))
        cluster.kill(second)
        time.sleep(4)
        incidents.append((f"restart member {second}", time.monotonic()))
        cluster.start_member(second)
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a worker hung"

    foreign = [exc for w in workers for exc in w.foreign]
    assert not foreign, f"non-calicnm exceptions reached the callers: {foreign[:3]!r}"
    errors = [op.error for w in workers for op in w.ops if op.error is not None]
    assert all(isinstance(e, DatastoreUnavailable) for e in errors), {
        f"{type(e).__name__}: {e}" for e in errors
    }
    lines, outside = outage_report(workers, incidents)
    total = sum(len(w.ops) for w in workers)
    print(f"\n{total} calls by {THREADS} threads; {len(errors)} failed")
    print("\n".join(lines))
    assert not outside, [f"{op.kind} at {op.start:.2f}: {op.error}" for op in outside]
    for name, t in incidents:
        after = [op for w in workers for op in w.ops if op.start > t + 1 and op.error is None]
        assert after, f"no call succeeded after {name}"

    # Never twice, never lost: the blocks hold exactly what the threads hold,
    # plus at most the addresses of assigns whose outcome they never learnt.
    assert not [m for w in workers for m in w.mismatches]
    assert held_spans(workers) == []
    held: dict[A, str] = {}
    for w in workers:
        for address, handle in w.held.items():
            assert address not in held, f"{address} held by {held[address]} and {handle}"
            held[address] = handle
    unknown = set().union(*(w.unknown for w in workers))
    stored = {b.address(o): h.handle for b in setup.blocks() for o, h in b.allocations.items()}
    for address, handle in held.items():
        assert stored.get(address) == handle, f"{address}: stored {stored.get(address)}"
    extra = {a: h for a, h in stored.items() if a not in held}
    leaked = {a: h for a, h in extra.items() if h not in unknown}
    print(f"{len(held)} held at the end; {len(extra)} from assigns that failed ({len(unknown)})")
    assert leaked == {}, f"addresses nobody holds: {sorted(leaked.items())[:5]}"

    # And the store keeps working.
    assert setup.assign(PoolRef(), "after") is not None
    store.close()


# ---- watches ------------------------------------------------------------------------------


class AgentWatch:
    """Watches like the agent does: on ``notify(False)`` the watch is made
    anew (by :meth:`ensure`, called in a loop).  Counts per watch made."""

    def __init__(self, store: EtcdStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.lock = threading.Lock()
        self.events: list[int] = []
        """notify(True) calls, per watch made."""
        self.breaks: list[int] = []
        self.after_break: list[int] = []
        """notify(True) after that watch's notify(False): must stay 0."""
        self.ok = False
        self.cancel: Callable[[], None] | None = None
        self.refused = 0

    def _notify_for(self, n: int) -> Callable[[bool], None]:
        def notify(healthy: bool) -> None:
            with self.lock:
                if healthy:
                    self.events[n] += 1
                    if self.breaks[n]:
                        self.after_break[n] += 1
                else:
                    self.breaks[n] += 1
                    self.ok = False

        return notify

    def ensure(self) -> None:
        with self.lock:
            if self.ok:
                return
        if self.cancel is not None:
            self.cancel()
        with self.lock:
            n = len(self.events)
            self.events.append(0)
            self.breaks.append(0)
            self.after_break.append(0)
        try:
            self.cancel = self.store.watch(self.prefix, self._notify_for(n))
        except CalicnmError:
            self.refused += 1
            self.cancel = None
            return
        with self.lock:
            self.ok = True

    def total_events(self) -> int:
        with self.lock:
            return sum(self.events)

    def last_broke(self) -> bool:
        """Has the watch made last reported its end?"""
        with self.lock:
            return bool(self.breaks) and self.breaks[-1] > 0

    def total_breaks(self) -> int:
        with self.lock:
            return sum(self.breaks)


@dataclass
class Writer:
    """Writes a key under ``prefix`` every 50 ms, through its own store."""

    store: EtcdStore
    prefix: str
    stop: threading.Event = field(default_factory=threading.Event)
    written: int = 0
    foreign: list[BaseException] = field(default_factory=list)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                self.store.put(f"{self.prefix}k{self.written % 10}", str(self.written))
                self.written += 1
            except CalicnmError:
                pass
            except BaseException as exc:
                self.foreign.append(exc)


def wait_for(check: Callable[[], object], timeout: float, what: str) -> float:
    """Poll ``check`` until truthy; the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def more_events(watch: AgentWatch, n: int, ensure: bool = False) -> Callable[[], bool]:
    """A check: has ``watch`` seen ``n`` more events than now (making the
    watch anew first each time, like the agent, if ``ensure``)?"""
    base = watch.total_events()

    def check() -> bool:
        if ensure:
            watch.ensure()
        return watch.total_events() > base + n

    return check


def watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("etcd-watch")]


def test_watch_is_made_again_after_failover(cluster: EtcdCluster) -> None:
    prefix = "/calicnm/test/watch/"
    store = store_on(cluster)
    writes = store_on(cluster)
    watch = AgentWatch(store, prefix)
    writer = Writer(writes, prefix)
    thread = threading.Thread(target=writer.run, name="writer")
    thread.start()
    try:
        for signal_name, act in (("SIGTERM", cluster.stop_member), ("SIGKILL", cluster.kill)):
            watch.ensure()
            wait_for(more_events(watch, 3), 10, "events")
            victim = cluster.index_of(store.current())
            t = time.monotonic()
            act(victim)
            noticed = wait_for(watch.last_broke, 10, "notify(False)")
            wait_for(more_events(watch, 3, ensure=True), 15, "events from a new watch")
            back = time.monotonic() - t
            print(
                f"\n{signal_name} member {victim}: watch broke after {noticed:.2f}s, "
                f"events again after {back:.2f}s (now on {store.current()})"
            )
            cluster.start_member(victim)
        assert max(watch.breaks) == 1, f"a watch reported its end more than once: {watch.breaks}"
        assert sum(watch.after_break) == 0, "a broken watch kept notifying"
        assert len(watch_threads()) <= 1, watch_threads()
    finally:
        writer.stop.set()
        thread.join(timeout=30)
        if watch.cancel is not None:
            watch.cancel()
        store.close()
        writes.close()
    assert not writer.foreign, writer.foreign
    wait_for(lambda: not watch_threads(), 10, "watch threads to end")


def test_quorum_lost_then_regained(cluster: EtcdCluster) -> None:
    prefix = "/calicnm/test/quorum/"
    store = store_on(cluster, timeout=2.0)
    watch = AgentWatch(store, prefix)
    watch.ensure()
    assert watch.ok
    store.put(f"{prefix}a", "1")
    wait_for(lambda: watch.total_events() >= 1, 10, "the first event")
    survivor = cluster.index_of(store.current())
    others = [i for i in range(3) if i != survivor]
    for i in others:
        cluster.stop_member(i)
    t = time.monotonic()
    # The watch stays on the survivor, which loses its leader: etcd ends
    # streams that asked for a leader ("hasleader"), so the watch breaks.
    broke = wait_for(lambda: watch.total_breaks() >= 1, 15, "the watch to break")
    for call in (
        lambda: store.get(f"{prefix}a"),
        lambda: store.put(f"{prefix}b", "2"),
        lambda: store.commit(Txn(compare=[(f"{prefix}c", ABSENT)], puts=[(f"{prefix}c", "3")])),
        lambda: store.list(prefix),
        lambda: store.watch(prefix, lambda healthy: None),
    ):
        start = time.monotonic()
        with pytest.raises(DatastoreUnavailable, match="etcd is unreachable at"):
            call()
        assert time.monotonic() - start < 3 * 2.0 + 3, "a call took longer than its timeouts"
    watch.ensure()
    assert not watch.ok and watch.refused >= 1
    print(f"\nquorum lost: watch broke after {broke:.2f}s; calls fail with DatastoreUnavailable")

    for i in others:
        cluster.start_member(i, wait=False)
    t = time.monotonic()
    back = wait_for(lambda: _answers(store, prefix), 30, "the store to answer again")
    print(f"quorum regained: the store answers {back:.2f}s after the restarts")
    assert Allocator(store, "h").add_pool(Pool(N("10.41.0.0/24"))) is None
    assert Allocator(store, "h").assign(PoolRef(), "x") is not None

    def regained() -> bool:
        watch.ensure()
        store.put(f"{prefix}d", str(time.monotonic()))
        return watch.ok and watch.events[-1] > 0

    wait_for(regained, 20, "a new watch to deliver")
    print(f"quorum regained: a new watch delivers {time.monotonic() - t:.2f}s after the restarts")
    assert max(watch.breaks) == 1
    assert watch.cancel is not None
    watch.cancel()
    store.close()


def _answers(store: EtcdStore, prefix: str) -> bool:
    try:
        store.put(f"{prefix}probe", "1")
        return True
    except DatastoreUnavailable:
        return False


def test_close_while_threads_use_the_store(cluster: EtcdCluster) -> None:
    """Closing the store under busy threads: they see DatastoreUnavailable
    (nothing else), a live watch reports notify(False) once, and no thread
    raises or spins."""
    prefix = "/calicnm/test/close/"
    store = store_on(cluster)
    stop = threading.Event()
    seen: list[BaseException] = []
    watch = AgentWatch(store, prefix)
    watch.ensure()

    def hammer(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if n % 2:
                    store.get(f"{prefix}{i}")
                else:
                    store.commit(Txn(puts=[(f"{prefix}{i}", str(n))]))
            except BaseException as exc:
                seen.append(exc)
                if not isinstance(exc, CalicnmError):
                    return

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    time.sleep(1)
    store.close()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert seen, "no call ran into the close"
    assert all(isinstance(e, DatastoreUnavailable) for e in seen), {repr(e) for e in seen}
    wait_for(lambda: watch.total_breaks() == 1, 5, "the watch to report its end")
    watch.ensure()  # watching a closed store: refused, cleanly
    assert watch.refused == 1
    wait_for(lambda: not watch_threads(), 10, "watch threads to end")
    time.sleep(0.5)
    assert watch.breaks[0] == 1
