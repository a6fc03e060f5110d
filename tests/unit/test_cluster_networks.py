"""ClusterNetworkSync over the in-memory store and a fake Docker that keeps
networks and their endpoints."""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

import pytest

from calicnm.model import ClusterNetwork, Host
from calicnm.node.cluster_networks import LABEL, ClusterNetworkSync, docker_spec
from calicnm.store import keys, records
from tests.fakes import MemoryStore


class NetworkDocker:
    def __init__(self) -> None:
        self.nets: dict[str, dict[str, Any]] = {}
        self.endpoints: dict[str, set[str]] = {}
        self.refuse: str | None = None
        self._ids = itertools.count(1)

    def networks(self) -> dict[str, dict[str, Any]]:
        return dict(self.nets)

    def network_endpoints(self, network_id: str) -> frozenset[str] | None:
        return frozenset(self.endpoints.get(network_id, set()))

    def create_network(self, spec: dict[str, Any]) -> None:
        if self.refuse:
            raise OSError(self.refuse)
        nid = f"{next(self._ids):064x}"
        self.nets[spec["Name"]] = {
            "Name": spec["Name"],
            "Id": nid,
            "Driver": spec["Driver"],
            "Labels": spec["Labels"],
            "spec": spec,
        }

    def remove_network(self, network_id: str) -> None:
        self.nets = {n: v for n, v in self.nets.items() if v["Id"] != network_id}


@pytest.fixture
def world() -> tuple[MemoryStore, NetworkDocker, ClusterNetworkSync]:
    store = MemoryStore()
    store.put(keys.host_meta("h1"), Host("h1", "10.9.0.1").to_json())
    docker = NetworkDocker()
    return store, docker, ClusterNetworkSync(store, "h1", docker)


def define(store: MemoryStore, network: ClusterNetwork) -> None:
    store.put(keys.cluster_network(network.name), network.to_json())


def states(store: MemoryStore) -> dict[str, tuple[str, str]]:
    return {s.name: (s.state, s.detail) for s in records.host_network_states(store, "h1")}


def test_a_defined_network_is_created_once_with_its_settings(world):
    store, docker, sync = world
    net = ClusterNetwork(
        "dataman",
        subnet=ipaddress.IPv4Network("10.8.0.0/24"),
        ip_range=ipaddress.IPv4Network("10.8.0.128/25"),
        profile="web",
    )
    define(store, net)
    sync.sync()
    sync.sync()
    assert list(docker.nets) == ["dataman"]
    spec = docker.nets["dataman"]["spec"]
    assert spec == docker_spec(net)
    assert spec["IPAM"] == {
        "Driver": "calicnm",
        "Config": [{"Subnet": "10.8.0.0/24", "IPRange": "10.8.0.128/25"}],
    }
    assert spec["Options"] == {"profile": "web"} and spec["Labels"] == {LABEL: "dataman"}
    assert states(store) == {"dataman": ("present", "")}


def test_removed_it_goes_where_unused_and_stays_where_used(world):
    store, docker, sync = world
    define(store, ClusterNetwork("dataman"))
    sync.sync()
    docker.endpoints[docker.nets["dataman"]["Id"]] = {"e" * 64}
    store.delete(keys.cluster_network("dataman"))
    sync.sync()
    assert "dataman" in docker.nets
    assert states(store) == {"dataman": ("in-use", "1 container(s) still use it")}
    docker.endpoints.clear()
    sync.sync()
    assert docker.nets == {} and states(store) == {}


def test_hand_made_networks_are_never_touched(world):
    store, docker, sync = world
    docker.nets["manual"] = {"Name": "manual", "Id": "1" * 64, "Driver": "calicnm", "Labels": {}}
    docker.nets["dataman"] = {"Name": "dataman", "Id": "2" * 64, "Driver": "bridge"}
    define(store, ClusterNetwork("dataman"))
    sync.sync()
    assert set(docker.nets) == {"manual", "dataman"}
    assert docker.nets["dataman"]["Driver"] == "bridge"
    state, detail = states(store)["dataman"]
    assert state == "problem" and "driver bridge" in detail


def test_a_refusal_is_reported_and_retried(world):
    store, docker, sync = world
    define(store, ClusterNetwork("dataman"))
    docker.refuse = "IpamDriver.RequestPool: subnet is not inside any calicnm pool"
    sync.sync()
    assert states(store)["dataman"][0] == "problem"
    docker.refuse = None
    sync.sync()
    assert states(store) == {"dataman": ("present", "")}


def test_a_definition_refuses_bad_values():
    from calicnm.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        ClusterNetwork("bad name")
    with pytest.raises(InvalidRequest, match="inside --subnet"):
        ClusterNetwork(
            "n",
            subnet=ipaddress.IPv4Network("10.8.0.0/24"),
            ip_range=ipaddress.IPv4Network("10.9.0.0/25"),
        )
    with pytest.raises(InvalidRequest):
        ClusterNetwork.from_json('{"name": "n", "subnet": "10.8.0.1/24"}')


def test_a_sync_without_news_checks_docker_and_costs_etcd_nothing(world):
    """The periodic sync while the watch reports nothing: a network removed from
    Docker by hand comes back, and etcd is neither read nor written."""
    store, docker, sync = world
    define(store, ClusterNetwork("dataman"))
    sync.sync()
    reads, revision = store.reads, store.list_at("")[1]
    reads = store.reads
    docker.nets.clear()  # removed behind calicnm's back
    sync.sync(reread=False)
    assert list(docker.nets) == ["dataman"]
    assert store.reads == reads and store.list_at("")[1] == revision
    store.delete(keys.cluster_network("dataman"))
    sync.sync()  # a watch event: read again
    assert docker.nets == {} and states(store) == {}
