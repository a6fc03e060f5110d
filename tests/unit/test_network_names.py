"""NetworkNamer with a fake Docker and a hand-driven clock."""

from __future__ import annotations

import http.client

import pytest

from calicnm.model import Network
from calicnm.node.network_names import EAGER_SECONDS, SLOW_SECONDS, WARN_SECONDS, NetworkNamer
from calicnm.policy import Profile, parse_rule_spec
from calicnm.store import keys, records
from tests.fakes import MemoryStore

NET = "a" * 64
OTHER = "b" * 64


class FakeDocker:
    """Docker's network list: id -> name; ``error`` set: every call raises it."""

    def __init__(self, names: dict[str, str] | None = None) -> None:
        self.names = dict(names or {})
        self.error: Exception | None = None

    def network_name(self, network_id: str) -> str | None:
        if self.error is not None:
            raise self.error
        return self.names.get(network_id)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world() -> tuple[MemoryStore, FakeDocker, Clock, NetworkNamer]:
    store, docker, clock = MemoryStore(), FakeDocker(), Clock()
    return store, docker, clock, NetworkNamer(store, docker, clock)


def add_network(store: MemoryStore, network_id: str, profile: str | None = None) -> None:
    store.put(keys.network(network_id), Network(network_id, profile=profile).to_json())


def name_of(store: MemoryStore, network_id: str) -> str | None:
    network = records.network(store, network_id)
    assert network is not None
    return network.docker_name


def test_names_a_network_and_creates_its_profile(world):
    store, docker, _clock, namer = world
    add_network(store, NET)
    docker.names[NET] = "dataman"
    assert namer.tick() is False
    assert name_of(store, NET) == "dataman"
    assert [p.name for p in records.profiles(store)] == ["dataman"]
    assert records.profiles(store)[0] == Profile.default("dataman")


def test_an_existing_profile_of_that_name_is_kept(world):
    store, docker, _clock, namer = world
    rule = parse_rule_spec("allow tcp to ports 22".split())
    custom = Profile("dataman", ("dataman",), (rule,), ())
    store.put(keys.profile("dataman"), custom.to_json())
    add_network(store, NET)
    docker.names[NET] = "dataman"
    namer.tick()
    assert records.profiles(store) == [custom]


def test_a_network_created_with_a_profile_gets_its_name_but_no_new_profile(world):
    store, docker, _clock, namer = world
    add_network(store, NET, profile="web")
    docker.names[NET] = "dataman"
    namer.tick()
    assert name_of(store, NET) == "dataman"
    assert records.profiles(store) == []


def test_a_named_network_is_left_alone(world):
    store, docker, _clock, namer = world
    store.put(keys.network(NET), Network(NET, docker_name="first").to_json())
    docker.names[NET] = "renamed"
    assert namer.tick() is False
    assert name_of(store, NET) == "first"


def test_unknown_to_docker_it_is_asked_eagerly_then_slowly(world):
    store, docker, clock, namer = world
    add_network(store, NET)
    assert namer.tick() is True, "a new unnamed network: come back soon"
    clock.now += EAGER_SECONDS - 1
    assert namer.tick() is True
    asked_last = clock.now

    clock.now += 2  # past the eager window
    docker.names[NET] = "late"
    assert namer.tick() is False
    assert name_of(store, NET) is None, "not asked again before the slow interval"

    clock.now = asked_last + SLOW_SECONDS - 0.5
    namer.tick()
    assert name_of(store, NET) is None
    clock.now = asked_last + SLOW_SECONDS
    namer.tick()
    assert name_of(store, NET) == "late"


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connection refused"),
        FileNotFoundError(2, "No such file or directory"),
        TimeoutError("timed out"),
        ValueError("Expecting value: line 1 column 1"),
        http.client.RemoteDisconnected("Remote end closed connection"),
    ],
)
def test_docker_unreachable_never_raises_and_changes_nothing(world, error):
    store, docker, _clock, namer = world
    add_network(store, NET)
    add_network(store, OTHER)
    docker.names.update({NET: "dataman", OTHER: "other"})
    docker.error = error
    before = {kv.key: kv.value for kv in store.list("/")}
    assert namer.tick() is True
    assert {kv.key: kv.value for kv in store.list("/")} == before

    docker.error = None
    namer.tick()
    assert (name_of(store, NET), name_of(store, OTHER)) == ("dataman", "other")


def test_networks_given_by_the_caller_are_used_instead_of_reading_the_store(world):
    store, docker, _clock, namer = world
    add_network(store, NET)
    docker.names[NET] = "dataman"
    namer.tick([])
    assert name_of(store, NET) is None
    namer.tick(list(records.networks(store).values()))
    assert name_of(store, NET) == "dataman"


def test_a_network_deleted_meanwhile_is_not_recreated(world):
    store, docker, _clock, namer = world
    add_network(store, NET)
    networks = list(records.networks(store).values())
    store.delete(keys.network(NET))
    docker.names[NET] = "dataman"
    namer.tick(networks)
    assert store.get(keys.network(NET)) is None
    assert records.profiles(store) == []


def test_a_local_network_docker_never_names_is_warned_about_once(world, caplog):
    store, _docker, clock, namer = world
    add_network(store, NET)
    add_network(store, OTHER)  # another host's network: never warned about
    for _ in range(5):
        namer.tick(local={NET})
        clock.now += WARN_SECONDS / 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert NET[:12] in warnings[0] and "DOCKER_HOST" in warnings[0]


def test_a_local_unnamed_network_is_listed_for_status_until_named(world, tmp_path):
    store, docker, clock, _namer = world
    problems = tmp_path / "network-problems"
    namer = NetworkNamer(store, docker, clock, problems_path=str(problems))
    add_network(store, NET)
    namer.tick(local={NET})
    assert problems.read_text() == ""
    clock.now += WARN_SECONDS
    docker.error = ConnectionRefusedError(111, "Connection refused")
    namer.tick(local={NET})
    assert NET[:12] in problems.read_text() and "DOCKER_HOST" in problems.read_text()
    docker.error = None
    docker.names[NET] = "dataman"
    clock.now += SLOW_SECONDS
    namer.tick(local={NET})
    assert problems.read_text() == ""
