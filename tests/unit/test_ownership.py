"""The ownership collector over the in-memory store, the fake links and a
fake dockerd: what it finds, what it repairs (only after the grace), and
what it must never touch."""

from __future__ import annotations

import ipaddress
import json
import time

import pytest

from calicnm import ownership
from calicnm.driver import Driver
from calicnm.endpoint import plan_link
from calicnm.errors import ForeignDatastore, InvalidRequest
from calicnm.ipam import Allocator, PoolRef
from calicnm.model import Host, Pool
from calicnm.node.collector import OwnershipCollector
from calicnm.ownership import Grace
from calicnm.store import keys, records
from calicnm.store.mirror import PrefixMirror
from calicnm.store.records import read_snapshot
from tests.fakes import FakeDocker, FakePlumbing, MemoryStore

NID = "6f49939a5d861b88bab9633a90df9206d74f387e13a58e07639c41910427ffb7"
EID = "629601b5fa245ddf93ea239eb288111b92d6781bedeebcb340ccdf43a081ea34"
EID2 = "8b8b6394a1d0cfd4bc4d1e7ebf46d0e5f0ae8f0b4c5ea5b4d9f1f0e1a2b3c4d5"
T0 = 1_700_000_000.0
GRACE = 5.0
MAX_AGE = 60.0


class Host1:
    """One host: its store, links, Docker, driver and collector, on one clock."""

    def __init__(self) -> None:
        self.now = T0
        self.store = MemoryStore()
        self.store.put(keys.host_meta("h1"), Host("h1", "10.9.0.1").to_json())
        self.plumbing = FakePlumbing()
        self.docker = FakeDocker()
        self.ipam = Allocator(self.store, "h1", sleep=lambda s: None)
        self.ipam.add_pool(Pool(ipaddress.IPv4Network("10.0.0.0/26")))
        self.driver = Driver(self.store, self.ipam, self.plumbing, "h1", clock=self.clock)
        self.collector = OwnershipCollector(
            self.store, "h1", self.plumbing, self.docker, MAX_AGE, clock=self.clock
        )
        self.grace = Grace(GRACE)
        self.driver.create_network({"NetworkID": NID, "IPv4Data": [{"Pool": "0.0.0.0/0"}]})
        self.docker.networks[NID] = set()

    def clock(self) -> float:
        return self.now

    def run(self, endpoint_id: str = EID) -> str:
        """A container's start as Docker makes it; returns its address."""
        address = self.driver.request_address({"PoolID": "calicnm:any"})["Address"]
        ids = {"NetworkID": NID, "EndpointID": endpoint_id}
        self.driver.create_endpoint({**ids, "Interface": {"Address": address}})
        self.docker.networks[NID].add(endpoint_id)
        self.driver.join({**ids, "SandboxKey": "/var/run/docker/netns/1"})
        self.plumbing.sandbox(plan_link(endpoint_id, "", ()).peer_if)
        return address.split("/")[0]

    def sweeps(self, n: int = 3) -> list[ownership.Finding]:
        """``n`` sweeps one grace apart; everything repaired."""
        repaired = []
        for _ in range(n):
            repaired += self.collector.sweep(self.grace).repaired
            self.now += GRACE
        return repaired

    def kinds(self) -> list[str]:
        return [f.kind for f in self.collector.check().findings]

    def allocated(self) -> list[str]:
        return [
            f"{b.address(o)}={a.handle}"
            for b in self.ipam.blocks()
            for o, a in b.allocations.items()
        ]


@pytest.fixture
def h() -> Host1:
    return Host1()


def test_a_running_container_is_no_finding(h):
    h.run()
    assert h.kinds() == []
    assert h.sweeps() == []


def test_a_container_in_its_sandbox_is_never_touched_whatever_docker_says(h):
    h.run()
    h.docker.networks.clear()  # a DOCKER_HOST pointing at another daemon
    assert h.kinds() == []
    assert h.sweeps() == []
    assert len(h.plumbing.links) == 1


def test_after_a_reboot_records_wait_for_docker_then_go_with_their_addresses(h):
    h.run()
    h.plumbing.destroy_sandboxes()
    h.docker.answering = False
    assert h.kinds() == [ownership.WAITING_FOR_DOCKER]
    assert h.sweeps() == []
    assert records.endpoints(h.store, "h1")
    h.docker.answering = True
    h.docker.networks[NID].clear()  # dockerd came back without the endpoint
    assert h.kinds() == [ownership.STALE_RECORD]
    assert h.collector.sweep(h.grace).repaired == []  # first sight: not yet due
    h.now += GRACE
    assert [f.kind for f in h.collector.sweep(h.grace).repaired] == [ownership.STALE_RECORD]
    assert records.endpoints(h.store, "h1") == []
    assert h.allocated() == []
    assert h.kinds() == []


def test_a_record_docker_still_has_is_left_for_docker_to_delete(h):
    h.run()
    h.plumbing.destroy_sandboxes()
    assert h.kinds() == []


def test_a_created_endpoint_docker_never_heard_of_goes_with_its_veth(h):
    """The reply to CreateEndpoint was lost: the veth and record exist, the
    peer never left the host namespace, Docker has no such endpoint."""
    address = h.driver.request_address({"PoolID": "calicnm:any"})["Address"]
    h.driver.create_endpoint(
        {"NetworkID": NID, "EndpointID": EID, "Interface": {"Address": address}}
    )
    assert h.kinds() == [ownership.STALE_RECORD]
    assert [f.kind for f in h.sweeps()] == [ownership.STALE_RECORD]
    assert h.plumbing.links == {}
    assert h.allocated() == []


def test_an_orphan_veth_is_removed_after_the_grace(h):
    h.plumbing.create(plan_link(EID, "ee:00:00:00:00:01", ()))
    assert h.kinds() == [ownership.ORPHAN_LINK]
    assert h.collector.sweep(h.grace).repaired == []
    assert h.plumbing.links
    h.now += GRACE
    assert [f.subject for f in h.collector.sweep(h.grace).repaired] == ["cali629601b5fa2"]
    assert h.plumbing.links == {}


def test_a_link_whose_record_cannot_be_read_is_kept(h):
    h.plumbing.create(plan_link(EID, "ee:00:00:00:00:01", ()))
    h.store.put(keys.endpoint("h1", EID), "{not json")
    assert ownership.ORPHAN_LINK not in h.kinds()
    h.sweeps()
    assert h.plumbing.links


def test_stale_pending_is_freed_only_past_its_age_and_unnamed(h):
    address = h.driver.request_address({"PoolID": "calicnm:any"})["Address"]
    assert h.kinds() == []
    h.now += MAX_AGE + 1
    assert h.kinds() == [ownership.STALE_PENDING]
    h.sweeps()
    assert h.allocated() == []
    assert address


def test_a_dead_endpoints_address_is_freed(h):
    h.ipam.assign(PoolRef(), EID2)
    assert h.kinds() == [ownership.DEAD_HANDLE]
    h.sweeps()
    assert h.allocated() == []


def test_a_deleted_networks_reservations_are_freed(h):
    other = "1" * 64
    h.ipam.assign(PoolRef(), f"gateway:{other}", address=ipaddress.IPv4Address("10.0.0.9"))
    h.ipam.assign(PoolRef(), f"aux:{NID}", address=ipaddress.IPv4Address("10.0.0.10"))
    assert h.kinds() == [ownership.DEAD_RESERVATION]  # NID's record exists
    h.sweeps()
    assert h.allocated() == [f"10.0.0.10=aux:{NID}"]


def test_a_finding_that_changes_during_the_grace_starts_again(h):
    address = h.driver.request_address({"PoolID": "calicnm:any"})["Address"]
    h.driver.create_endpoint(
        {"NetworkID": NID, "EndpointID": EID, "Interface": {"Address": address}}
    )
    h.collector.sweep(h.grace)
    h.now += GRACE
    ids = {"NetworkID": NID, "EndpointID": EID, "SandboxKey": "/var/run/docker/netns/2"}
    h.driver.join(ids)  # a write: a new revision
    assert h.collector.sweep(h.grace).repaired == []
    assert records.endpoints(h.store, "h1")


def test_another_hosts_blocks_and_records_are_left_alone(h):
    h.store.put(keys.host_meta("h2"), Host("h2", "10.9.0.2").to_json())
    other = Allocator(h.store, "h2", sleep=lambda s: None)
    other.assign(PoolRef(), EID2)  # h2's own block: h2's collector judges it
    assert h.kinds() == []


def test_a_host_the_datastore_does_not_register_is_refused(h):
    h.store.delete(keys.host_meta("h1"))
    h.plumbing.create(plan_link(EID, "ee:00:00:00:00:01", ()))
    with pytest.raises(InvalidRequest, match="not registered"):
        h.collector.check()
    assert h.plumbing.links


def test_a_foreign_datastore_is_never_acted_on(h):
    def guard() -> None:
        raise ForeignDatastore("another cluster")

    collector = OwnershipCollector(h.store, "h1", h.plumbing, h.docker, MAX_AGE, guard=guard)
    h.plumbing.create(plan_link(EID, "ee:00:00:00:00:01", ()))
    with pytest.raises(ForeignDatastore):
        collector.sweep(Grace(0.0))
    assert h.plumbing.links


def test_two_records_naming_one_address_are_reported_not_repaired(h):
    ip = h.run()
    kv = h.store.get(keys.endpoint("h1", EID))
    assert kv is not None
    twin = json.loads(kv.value)
    twin["id"] = EID2
    twin["interface"] = plan_link(EID2, "", ()).host_if
    twin["peer"] = plan_link(EID2, "", ()).peer_if
    h.store.put(keys.endpoint("h1", EID2), json.dumps(twin))
    h.plumbing.create(plan_link(EID2, "ee:00:00:00:00:02", ()))
    h.plumbing.sandbox(plan_link(EID2, "", ()).peer_if)
    found = {(f.kind, f.subject) for f in h.collector.check().findings}
    assert (ownership.SHARED_ADDRESS, ip) in found
    assert (ownership.UNHELD_ADDRESS, ip) in found
    h.sweeps()
    assert len(records.endpoints(h.store, "h1")) == 2


def test_grace_counts_from_first_sight_and_forgets_what_went():
    grace = Grace(5.0)
    a = ownership.Finding(ownership.ORPHAN_LINK, "calia", "")
    assert grace.due([a], 0.0) == []
    assert grace.due([a], 4.9) == []
    assert grace.due([a], 5.0) == [a]
    assert grace.due([], 6.0) == []
    assert grace.due([a], 7.0) == []  # seen again: a new first sight
    reported = ownership.Finding(ownership.SHARED_ADDRESS, "10.0.0.1", "")
    assert grace.due([reported], 0.0) == []
    assert grace.due([reported], 100.0) == []


def test_what_a_call_in_flight_works_on_is_never_a_finding(h):
    """A CreateEndpoint slowed by etcd: its veth and record exist, Docker
    does not list it yet; while its marker is held nothing is repaired."""
    busy: set[str] = set()
    collector = OwnershipCollector(
        h.store, "h1", h.plumbing, h.docker, MAX_AGE, clock=h.clock, busy=lambda: frozenset(busy)
    )
    address = h.driver.request_address({"PoolID": "calicnm:any"})["Address"]
    busy.add(EID)
    h.driver.create_endpoint(
        {"NetworkID": NID, "EndpointID": EID, "Interface": {"Address": address}}
    )
    h.ipam.assign(PoolRef(), f"gateway:{NID[:-1]}0", address=ipaddress.IPv4Address("10.0.0.9"))
    busy.add(NID[:-1] + "0")
    for _ in range(3):
        assert collector.sweep(h.grace).repaired == []
        h.now += GRACE
    assert collector.check().findings == []
    busy.clear()
    assert {f.kind for f in collector.check().findings} == {
        ownership.STALE_RECORD,
        ownership.DEAD_RESERVATION,
    }


def test_a_call_that_starts_between_look_and_repair_wins(h):
    busy: set[str] = set()
    collector = OwnershipCollector(
        h.store, "h1", h.plumbing, h.docker, MAX_AGE, clock=h.clock, busy=lambda: frozenset(busy)
    )
    h.plumbing.create(plan_link(EID, "ee:00:00:00:00:01", ()))
    collector.sweep(h.grace)
    h.now += GRACE
    busy.add(EID)  # a retried CreateEndpoint of the same id begins now
    report = collector.sweep(h.grace)
    assert report.repaired == []
    assert h.plumbing.links


def test_in_flight_markers_last_the_call_and_expire_after_a_crash(tmp_path):
    from calicnm.host.markers import IN_FLIGHT_MAX_SECONDS, InFlight

    now = [time.time()]  # the markers' times are the file system's
    markers = InFlight(str(tmp_path / "in-flight"), clock=lambda: now[0])
    with markers.held(EID):
        assert markers.active() == {EID}
    assert markers.active() == frozenset()
    with pytest.raises(RuntimeError), markers.held(EID2):
        raise RuntimeError("the call failed")
    assert markers.active() == frozenset()
    (tmp_path / "in-flight" / EID).write_text("")  # a killed call's leftover
    assert markers.active() == {EID}
    markers.clear()  # the node starts a new plugin: no call can be running
    assert markers.active() == frozenset()
    (tmp_path / "in-flight" / EID).write_text("")
    now[0] += IN_FLIGHT_MAX_SECONDS + 1
    assert markers.active() == frozenset()
    assert not (tmp_path / "in-flight" / EID).exists()


def test_a_sweep_through_the_agents_copy_reads_no_cluster_and_still_repairs(h):
    """With the in-memory copy as its reader, observing reads nothing from etcd; a
    stale record is still found and taken apart, with its repair checked in etcd."""
    mirror = PrefixMirror(h.store, keys.ROOT + "/")
    mirror.start()
    h.collector = OwnershipCollector(
        h.store, "h1", h.plumbing, h.docker, MAX_AGE, clock=h.clock, reader=mirror.view
    )
    h.run()
    reads = h.store.reads
    assert h.kinds() == []
    assert h.store.reads == reads
    h.plumbing.destroy_sandboxes()
    h.docker.networks[NID].clear()  # the container is gone, Docker says so
    assert [f.kind for f in h.sweeps()] == [ownership.STALE_RECORD]
    assert records.endpoints(h.store, "h1") == []
    assert mirror.view().list(keys.ROOT + "/") == h.store.list(keys.ROOT + "/")
    mirror.stop()


def test_a_sweep_through_the_agents_decoded_view_finds_what_a_read_finds(h):
    """With the agent's decoded view of the cluster (current, as the agent only
    offers it then) and its copy as the reader, a sweep finds and repairs what a
    sweep of etcd does."""
    mirror = PrefixMirror(h.store, keys.ROOT + "/")
    mirror.start()
    h.collector = OwnershipCollector(
        h.store,
        "h1",
        h.plumbing,
        h.docker,
        MAX_AGE,
        clock=h.clock,
        reader=mirror.view,
        decoded=lambda: read_snapshot(mirror.view()),
    )
    h.run()
    assert h.kinds() == []
    h.plumbing.destroy_sandboxes()
    h.docker.networks[NID].clear()  # the container is gone, Docker says so
    assert [f.kind for f in h.sweeps()] == [ownership.STALE_RECORD]
    assert records.endpoints(h.store, "h1") == []
    assert h.kinds() == []
    mirror.stop()
