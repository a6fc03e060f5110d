"""What a kill at each named fault point leaves, once Docker has made the
calls it makes after a failed one and the pending reaper has run.

``faults.point`` SIGKILLs the node in the crash tests; here it raises a
``BaseException`` instead, which, like a kill, no ``except Exception``
undo catches.  Every point of ``faults.POINTS`` must be reached by one
container's life, and what it leaves must be exactly what the comments
say: clean, or a leftover that only the ownership collector (Docker no
longer knows the endpoint) can judge; and once the collector has run,
nothing is left of any of them.
"""

import contextlib
import ipaddress

import pytest

from calicnm import faults
from calicnm.driver import Driver
from calicnm.errors import CalicnmError
from calicnm.ipam import Allocator
from calicnm.model import Host, Pool
from calicnm.node.collector import OwnershipCollector
from calicnm.ownership import Grace
from calicnm.store import keys
from tests.fakes import FakeDocker, FakePlumbing, MemoryStore

NID = "6f49939a5d861b88bab9633a90df9206d74f387e13a58e07639c41910427ffb7"
EID = "629601b5fa245ddf93ea239eb288111b92d6781bedeebcb340ccdf43a081ea34"
NOW = 1_700_000_000.0


class Killed(BaseException):
    pass


CLEAN = ((), (), ())
LEFT_BY_CREATE = (("endpoint",), ("veth",), ("allocation",))
"""A kill inside CreateEndpoint once the record exists: Docker's release is
refused (the endpoint looks live) and the reaper leaves an address a record
names: record, veth and address wait for the endpoint reconciler."""

EXPECTED = {
    "after-assign-commit": CLEAN,  # the reaper frees the pending address
    "after-veth": ((), ("veth",), ()),  # Docker's release frees the address
    "after-record": LEFT_BY_CREATE,
    "after-set-handle": LEFT_BY_CREATE,
    "after-join-write": CLEAN,  # Docker deletes the endpoint, releases
    "after-veth-removal": CLEAN,  # the release finishes the delete
    "before-record-delete": CLEAN,
    "after-release-commit": CLEAN,
}


def test_every_point_has_an_expectation():
    assert set(EXPECTED) == set(faults.POINTS)


@pytest.mark.parametrize("point", faults.POINTS)
def test_a_kill_at_each_point_leaves_only_what_is_expected(point, monkeypatch):
    store = MemoryStore()
    plumbing = FakePlumbing()
    ipam = Allocator(store, "h1", sleep=lambda s: None)
    ipam.add_pool(Pool(ipaddress.IPv4Network("10.0.0.0/26")))
    driver = Driver(store, ipam, plumbing, "h1", clock=lambda: NOW)
    driver.create_network({"NetworkID": NID, "IPv4Data": [{"Pool": "0.0.0.0/0"}]})
    killed: list[str] = []

    def kill(name):
        if name == point and not killed:
            killed.append(name)
            raise Killed(name)

    monkeypatch.setattr(faults, "point", kill)
    address = ""
    ids = {"NetworkID": NID, "EndpointID": EID}
    release = {"PoolID": "calicnm:any"}

    def life():
        nonlocal address
        address = driver.request_address({"PoolID": "calicnm:any"})["Address"]
        release["Address"] = address
        try:
            driver.create_endpoint({**ids, "Interface": {"Address": address}})
        except Killed:
            _docker(driver.release_address, release)  # a failed create: release
            raise
        try:
            driver.join({**ids, "SandboxKey": "/var/run/docker/netns/1"})
        except Killed:
            _docker(driver.delete_endpoint, ids)  # a failed join: remove it
            _docker(driver.release_address, release)
            raise
        driver.leave(ids)
        try:
            driver.delete_endpoint(ids)
        except Killed:
            _docker(driver.release_address, release)  # forced removal
            raise
        driver.release_address(release)

    with pytest.raises(Killed):
        life()
    assert killed == [point]
    ipam.release_stale_pending(NOW + 3600, max_age=60)
    left = (
        ("endpoint",) if driver.local_endpoints() else (),
        ("veth",) if plumbing.links else (),
        ("allocation",) if any(b.allocations for b in ipam.blocks()) else (),
    )
    assert left == EXPECTED[point]
    # The node's collector, with Docker answering and knowing no endpoint of
    # the network (the container is gone), leaves nothing of any of them.
    store.put(keys.host_meta("h1"), Host("h1", "10.9.0.1").to_json())
    docker = FakeDocker()
    docker.networks[NID] = set()
    now = [NOW + 3600]
    collector = OwnershipCollector(store, "h1", plumbing, docker, 60.0, clock=lambda: now[0])
    grace = Grace(5.0)
    for _ in range(3):
        collector.sweep(grace)
        now[0] += 5.0
    assert driver.local_endpoints() == []
    assert plumbing.links == {}
    assert [b.allocations for b in ipam.blocks() if b.allocations] == []
    assert collector.check().findings == []


def _docker(call, body):
    """Docker's follow-up call after a failure; its own failure (a refused
    release) is logged by Docker and ignored."""
    with contextlib.suppress(CalicnmError):
        call(body)
