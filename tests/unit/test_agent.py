"""The agent over MemoryStore and the kernel fakes: what a pass leaves in
the tables, sets, routes and marker files, and how the loop converges."""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from calicnm.endpoint import derive_mac, plan_link
from calicnm.errors import DataplaneError, DatastoreUnavailable
from calicnm.host.markers import Markers
from calicnm.host.policy_applier import PolicyApplier
from calicnm.model import Endpoint, Network
from calicnm.node.agent import Agent
from calicnm.policy import Profile, Rule
from calicnm.profiles import FROM_EP, endpoint_chain, profile_chain, tag_ipset
from calicnm.store import keys
from calicnm.store.records import Snapshot
from tests.fakes import FakeFastPath, FakeIpsets, FakeIptables, FakeRoutes, MemoryStore

NET = "a" * 64
EP1 = "1" * 64
EP2 = "2" * 64
EP3 = "3" * 64
DROP_ALL = ('-m comment --comment "profile unreadable or missing" -j DROP',)


def wait_until(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {check}")
        time.sleep(0.005)


class Rig:
    def __init__(self, tmp: str, hooks: list[Callable[[Snapshot], bool]] | None = None) -> None:
        self.store = MemoryStore()
        self.store.put(keys.network(NET), Network(NET, docker_name="dataman").to_json())
        self.store.put(keys.profile("dataman"), Profile.default("dataman").to_json())
        self.iptables = FakeIptables()
        self.ipsets = FakeIpsets(self.iptables)
        self.routes = FakeRoutes()
        self.marker_dir = os.path.join(tmp, "programmed")
        self.hooks = hooks
        self.agent = self.make_agent()

    def make_agent(self, resync: float = 30.0) -> Agent:
        return Agent(
            self.store,
            "h1",
            PolicyApplier(self.iptables, self.ipsets),
            self.routes,
            Markers(self.marker_dir),
            resync=resync,
            hooks=self.hooks,
        )

    def add(
        self,
        eid: str,
        ip: str,
        host: str = "h1",
        veth: bool = True,
        profiles: tuple[str, ...] | None = None,
    ) -> Endpoint:
        address = ipaddress.IPv4Address(ip)
        plan = plan_link(eid, derive_mac(eid), (address,))
        if veth:
            self.routes.add_link(plan.host_if)
        ep = Endpoint(
            eid, host, NET, plan.host_if, plan.peer_if, plan.mac, (address,), profiles=profiles
        )
        self.store.put(keys.endpoint(host, eid), ep.to_json())
        return ep

    def marked(self) -> set[str]:
        if not os.path.isdir(self.marker_dir):
            return set()
        return set(os.listdir(self.marker_dir))

    def kernel(self) -> object:
        sets = {name: self.ipsets.members(name) for name in self.ipsets.sets}
        return (
            self.iptables.save("filter"),
            self.iptables.save("nat"),
            sets,
            dict(self.routes.routes),
            self.marked(),
        )

    def chains(self) -> dict[str, list[str]]:
        return self.iptables.chains()


@pytest.fixture
def rig(tmp_path) -> Rig:
    return Rig(str(tmp_path))


def test_endpoints_in_the_store_become_chains_sets_routes_and_markers(rig):
    ep1 = rig.add(EP1, "10.0.0.1")
    ep2 = rig.add(EP2, "10.0.0.2")
    rig.add(EP3, "10.0.1.7", host="h2", veth=False)
    assert rig.agent.reconcile(full=True) is False

    chains = rig.chains()
    for ep in (ep1, ep2):
        assert endpoint_chain(ep.interface, "inbound") in chains
        assert f"-i {ep.interface} -g {endpoint_chain(ep.interface, 'outbound')}" in chains[FROM_EP]
    assert endpoint_chain("cali33333333333", "inbound") not in chains, "h2's endpoint"
    assert rig.ipsets.members(tag_ipset("dataman")) == {"10.0.0.1", "10.0.0.2", "10.0.1.7"}
    assert rig.routes.routes == {"10.0.0.1/32": ep1.interface, "10.0.0.2/32": ep2.interface}
    assert rig.routes.neighbours["10.0.0.1"] == (ep1.interface, ep1.mac)
    assert rig.marked() == {EP1, EP2}
    assert rig.agent.passes == 1


def test_an_endpoint_without_its_veth_is_not_marked_and_the_pass_waits(rig):
    rig.add(EP1, "10.0.0.1")
    ep2 = rig.add(EP2, "10.0.0.2", veth=False)
    assert rig.agent.reconcile(full=True) is True
    assert rig.marked() == {EP1}
    assert "10.0.0.2/32" not in rig.routes.routes

    rig.routes.add_link(ep2.interface)
    assert rig.agent.reconcile() is False
    assert rig.marked() == {EP1, EP2}
    assert rig.routes.routes["10.0.0.2/32"] == ep2.interface


def test_a_removed_endpoint_loses_its_chains_marker_and_route_bookkeeping(rig):
    ep1 = rig.add(EP1, "10.0.0.1")
    rig.add(EP2, "10.0.0.2")
    rig.agent.reconcile(full=True)

    rig.routes.remove_link(ep1.interface)  # the plugin deletes the veth ...
    rig.store.delete(keys.endpoint("h1", EP1))  # ... and the record
    rig.agent.reconcile()
    chains = rig.chains()
    assert endpoint_chain(ep1.interface, "inbound") not in chains
    assert not any(ep1.interface in rule for rule in chains[FROM_EP])
    assert rig.marked() == {EP2}
    assert rig.ipsets.members(tag_ipset("dataman")) == {"10.0.0.2"}

    # Back with the same id: an incremental pass routes it again, so the
    # agent did not keep believing the old route was in place.
    rig.add(EP1, "10.0.0.1")
    rig.agent.reconcile()
    assert rig.routes.routes["10.0.0.1/32"] == ep1.interface
    assert rig.marked() == {EP1, EP2}


def test_a_full_pass_puts_back_a_route_deleted_by_hand(rig):
    ep1 = rig.add(EP1, "10.0.0.1")
    rig.agent.reconcile(full=True)
    del rig.routes.routes["10.0.0.1/32"]
    rig.agent.reconcile(full=True)
    assert rig.routes.routes == {"10.0.0.1/32": ep1.interface}


def test_a_failing_hook_does_not_stop_programming(tmp_path):
    def broken(snapshot: Snapshot) -> bool:
        raise DataplaneError("bird refused its configuration")

    rig = Rig(str(tmp_path), hooks=[broken])
    ep1 = rig.add(EP1, "10.0.0.1")
    assert rig.agent.reconcile(full=True) is True, "a failed hook makes the caller come back"
    assert endpoint_chain(ep1.interface, "inbound") in rig.chains()
    assert rig.marked() == {EP1}


def test_hooks_see_the_snapshot_and_can_ask_for_another_pass(tmp_path):
    seen: dict[str, list[str]] = {}

    def namer(snapshot: Snapshot) -> bool:
        seen["endpoints"] = sorted(e.id for e in snapshot.endpoints)
        return True

    rig = Rig(str(tmp_path), hooks=[namer])
    rig.add(EP1, "10.0.0.1")
    assert rig.agent.reconcile(full=True) is True
    assert seen == {"endpoints": [EP1]}


def test_a_store_that_is_down_fails_the_pass_and_leaves_the_kernel_alone(rig):
    rig.add(EP1, "10.0.0.1")
    rig.add(EP2, "10.0.0.2")
    rig.agent.reconcile(full=True)
    rig.store.delete(keys.endpoint("h1", EP2))
    before = rig.kernel()

    rig.store.down = True
    with pytest.raises(DatastoreUnavailable):
        rig.agent.reconcile(full=True)
    assert rig.kernel() == before

    rig.store.down = False
    rig.agent.reconcile()
    assert rig.marked() == {EP1}


def test_after_a_failed_apply_nothing_new_is_marked_and_the_next_pass_is_full(rig):
    rig.add(EP1, "10.0.0.1")
    rig.agent.reconcile(full=True)
    ep2 = rig.add(EP2, "10.0.0.2")
    rig.iptables.fail_next_restore = True
    with pytest.raises(DataplaneError):
        rig.agent.reconcile()
    assert rig.marked() == {EP1}, "no marker without its chains"
    assert "10.0.0.2/32" not in rig.routes.routes

    rig.iptables.command(f"-F {FROM_EP}")  # drift only a full pass notices
    assert rig.agent.reconcile() is False
    assert (
        f"-i {ep2.interface} -g {endpoint_chain(ep2.interface, 'outbound')}"
        in rig.chains()[FROM_EP]
    )
    assert len(rig.chains()[FROM_EP]) == 3
    assert rig.marked() == {EP1, EP2}


@pytest.mark.parametrize("stored", ["{not json", None])
def test_an_unreadable_or_missing_profile_compiles_to_a_drop_chain(rig, stored):
    if stored is not None:
        rig.store.put(keys.profile("broken"), stored)
    rig.add(EP1, "10.0.0.1", profiles=("broken",))
    rig.agent.reconcile(full=True)
    chains = rig.chains()
    assert tuple(chains[profile_chain("broken", "inbound")]) == DROP_ALL
    assert tuple(chains[profile_chain("broken", "outbound")]) == DROP_ALL


def test_an_endpoint_of_a_network_not_named_yet_drops_everything(rig):
    other = "b" * 64
    rig.store.put(keys.network(other), Network(other).to_json())
    address = ipaddress.IPv4Address("10.0.0.9")
    plan = plan_link(EP1, derive_mac(EP1), (address,))
    rig.routes.add_link(plan.host_if)
    ep = Endpoint(EP1, "h1", other, plan.host_if, plan.peer_if, plan.mac, (address,))
    rig.store.put(keys.endpoint("h1", EP1), ep.to_json())
    rig.agent.reconcile(full=True)
    inbound = rig.chains()[endpoint_chain(plan.host_if, "inbound")]
    assert inbound[-1] == "-j DROP"
    assert not any(rule.startswith("-j calicnm-p") for rule in inbound)


# ---- the loop ----------------------------------------------------------------------


@pytest.fixture
def running(rig) -> Iterator[tuple[Rig, threading.Thread, threading.Event]]:
    stop = threading.Event()
    thread = threading.Thread(target=rig.agent.run, args=(stop, rig.store), daemon=True)
    thread.start()
    yield rig, thread, stop
    stop.set()
    rig.agent.wake()
    thread.join(timeout=2)


def test_run_converges_on_watch_events_and_stops(running):
    rig, thread, stop = running
    wait_until(lambda: rig.agent.passes >= 1 and rig.store.live_watches() == 1)
    rig.add(EP1, "10.0.0.1")  # the watch wakes the loop; the resync is 30 s away
    wait_until(lambda: rig.marked() == {EP1})
    assert rig.ipsets.members(tag_ipset("dataman")) == {"10.0.0.1"}

    stop.set()
    rig.agent.wake()
    thread.join(timeout=2)
    assert not thread.is_alive()
    assert rig.store.live_watches() == 0, "the watch is cancelled on the way out"


def test_run_survives_the_store_going_down_and_watches_again(running):
    rig, _thread, _stop = running
    rig.add(EP1, "10.0.0.1")
    wait_until(lambda: rig.marked() == {EP1} and rig.store.live_watches() == 1)
    before = rig.kernel()

    rig.store.down = True  # breaks the watch, which wakes the loop
    wait_until(lambda: rig.agent.last_error is not None)
    assert "unreachable" in (rig.agent.last_error or "")
    assert rig.kernel() == before

    rig.store.down = False
    rig.agent.wake()
    wait_until(lambda: rig.agent.last_error is None and rig.store.live_watches() == 1)
    rig.add(EP2, "10.0.0.2")
    wait_until(lambda: rig.marked() == {EP1, EP2})


def test_run_repairs_drift_on_its_resync_timer(rig):
    rig.agent = rig.make_agent(resync=0.05)
    rig.add(EP1, "10.0.0.1")
    stop = threading.Event()
    thread = threading.Thread(target=rig.agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: rig.marked() == {EP1})
        want = rig.chains()[FROM_EP]
        rig.iptables.command(f"-F {FROM_EP}")  # no store change, no event
        wait_until(lambda: rig.chains()[FROM_EP] == want)
    finally:
        stop.set()
        rig.agent.wake()
        thread.join(timeout=2)
    assert not thread.is_alive()


def test_changes_arrive_with_their_values_and_drift_repair_reads_nothing(rig):
    """The agent follows the store's change stream: a change reaches the kernel
    without any read of the store, resyncs at idle compare the kernel with the kept
    snapshot (no read either), and a broken stream resumes from its revision
    without reading the whole store again."""
    rig.agent = rig.make_agent(resync=0.02)
    rig.add(EP1, "10.0.0.1")
    stop = threading.Event()
    thread = threading.Thread(target=rig.agent.run, args=(stop, rig.store), daemon=True)
    thread.start()
    try:
        wait_until(lambda: rig.marked() == {EP1} and rig.store.live_watches() == 1)
        wait_until(lambda: rig.agent.passes >= 3)
        reads, passes = rig.store.reads, rig.agent.passes
        want = rig.chains()[FROM_EP]
        rig.iptables.command(f"-F {FROM_EP}")  # drift: no store change, no event
        wait_until(lambda: rig.chains()[FROM_EP] == want and rig.agent.passes > passes + 5)
        assert rig.store.reads == reads

        rig.add(EP2, "10.0.0.2")  # comes with its value: no read
        wait_until(lambda: rig.marked() == {EP1, EP2})
        assert rig.store.reads == reads
        assert rig.agent.full_reads == 1

        rig.store.down = True  # a broken stream: passes read (and fail) meanwhile
        wait_until(lambda: rig.agent.last_error is not None)
        rig.store.down = False
        rig.agent.wake()
        wait_until(lambda: rig.agent.last_error is None and rig.store.live_watches() == 1)
        rig.add(EP3, "10.0.0.3")
        wait_until(lambda: EP3 in rig.marked())
        assert rig.agent._mirror is not None and rig.agent._mirror.reloads == 1
    finally:
        stop.set()
        rig.agent.wake()
        thread.join(timeout=2)


def test_the_decoded_view_is_offered_only_while_it_is_current(rig):
    """The collector may use the agent's decoded cluster only while it is exactly
    as current as the copy: not before a pass has taken the latest change, and
    not while the stream is down."""
    rig.add(EP1, "10.0.0.1")
    assert rig.agent.decoded_view() is None  # no stream followed yet
    assert rig.agent.follow(rig.store)
    rig.agent.reconcile()
    view = rig.agent.decoded_view()
    assert view is not None and [e.id for e in view.endpoints] == [EP1]
    rig.add(EP2, "10.0.0.2", host="h2")  # applied to the copy, not yet passed
    assert rig.agent.decoded_view() is None
    rig.agent.reconcile()
    view = rig.agent.decoded_view()
    assert view is not None and {e.id for e in view.endpoints} == {EP1, EP2}
    rig.store.down = True  # the stream ends
    rig.store.down = False
    assert rig.agent.decoded_view() is None


def test_a_wiped_datastore_seen_through_the_stream_leaves_the_kernel_alone(rig):
    """The guard reads the cluster id from the in-memory copy (no etcd read): when
    the stream brings the deletion of everything, the pass fails before any of it
    reaches the kernel."""
    from calicnm.errors import ForeignDatastore
    from calicnm.store.identity import DatastoreGuard

    cluster_id = "c" * 32
    rig.store.put(keys.CLUSTER_ID, cluster_id)
    rig.agent = Agent(
        rig.store,
        "h1",
        PolicyApplier(rig.iptables, rig.ipsets),
        rig.routes,
        Markers(rig.marker_dir),
        guard=DatastoreGuard(rig.store, cluster_id, ttl=0.0),
    )
    rig.add(EP1, "10.0.0.1")
    assert rig.agent.follow(rig.store)
    rig.agent.reconcile()
    before = rig.kernel()
    reads = rig.store.reads
    rig.agent.reconcile()
    assert rig.store.reads == reads, "the guard read the copy, not etcd"
    for kv in rig.store.list(keys.ROOT + "/"):
        rig.store.delete(kv.key)
    with pytest.raises(ForeignDatastore):
        rig.agent.reconcile()
    assert rig.kernel() == before


def test_the_fast_path_follows_policy_leaving_before_a_deny_and_joining_after_an_allow(rig):
    fast = FakeFastPath(rig.iptables)
    rig.agent = Agent(
        rig.store,
        "h1",
        PolicyApplier(rig.iptables, rig.ipsets),
        rig.routes,
        Markers(rig.marker_dir),
        fast_path=fast,
    )
    one, two = rig.add(EP1, "10.0.0.1"), rig.add(EP2, "10.0.0.2")
    rig.agent.reconcile()
    # Both on dataman's default profile: open to each other; the entries came after
    # the chains that allow them.
    assert set(fast.map) == {"10.0.0.1", "10.0.0.2"}
    assert fast.map["10.0.0.1"].interface == one.interface
    assert fast.map["10.0.0.2"].mac == two.mac
    kind, commits, _ = fast.calls[-1]
    assert kind == "apply" and commits == rig.iptables.commits

    # A deny put first: the pair leaves the fast path before the chains that deny it
    # are written (the withdraw saw the old commit count, and an empty map after it).
    narrowed = Profile.default("dataman")
    narrowed = Profile(
        "dataman",
        narrowed.tags,
        (Rule("deny", {"protocol": "tcp", "dst_ports": [22]}), *narrowed.inbound),
        narrowed.outbound,
    )
    before = rig.iptables.commits
    rig.store.put(keys.profile("dataman"), narrowed.to_json())
    rig.agent.reconcile()
    withdraw = next(c for c in reversed(fast.calls) if c[0] == "withdraw")
    assert withdraw[1] == before and withdraw[2] == {}
    assert rig.iptables.commits > before and fast.map == {}

    # Back to the defaults: they join again, after the chains.
    rig.store.put(keys.profile("dataman"), Profile.default("dataman").to_json())
    rig.agent.reconcile()
    assert set(fast.map) == {"10.0.0.1", "10.0.0.2"}
    assert rig.agent.status().datapath == "iptables, with the tc/BPF same-host fast path"
