"""The route reflector's pass: BIRD's clients follow the registered hosts."""

from __future__ import annotations

import pytest

from calicnm.errors import DatastoreUnavailable
from calicnm.model import BgpConfig, Host
from calicnm.routing.reflector import reflect_once
from calicnm.store import keys
from tests.fakes import FakeBird, MemoryStore

RR = "198.18.0.100"


def register(store: MemoryStore, *hosts: Host) -> None:
    for host in hosts:
        store.put(keys.host_meta(host.name), host.to_json())


def test_clients_follow_the_registered_hosts():
    store, bird = MemoryStore(), FakeBird()
    register(store, Host("a", "198.18.0.2"), Host("b", "198.18.0.3", as_num=64600))
    assert reflect_once(store, bird, RR, None, "1.1.1.1") is True
    conf = bird.config or ""
    assert "local 198.18.0.100 as 64511;" in conf
    assert "rr cluster id 1.1.1.1;" in conf
    assert "protocol bgp Client_198_18_0_2 from calicnm_client" in conf
    assert "neighbor 198.18.0.3 as 64600;" in conf

    assert reflect_once(store, bird, RR, None, "1.1.1.1") is False, "nothing changed"

    store.delete(keys.host_meta("a"))
    register(store, Host("c", "198.18.0.4"), Host("self", RR), Host("noaddr", None))
    assert reflect_once(store, bird, RR, None, "1.1.1.1") is True
    conf = bird.config or ""
    assert "198.18.0.2" not in conf
    assert "neighbor 198.18.0.4 as 64511;" in conf
    assert "Client_198_18_0_100" not in conf, "never its own client"
    assert conf.count("protocol bgp Client_") == 2


def test_the_as_is_given_or_the_global_default():
    store, bird = MemoryStore(), FakeBird()
    store.put(keys.BGP_CONFIG, BgpConfig(as_num=65001).to_json())
    register(store, Host("a", "198.18.0.2"))
    reflect_once(store, bird, RR, None, RR)
    assert "local 198.18.0.100 as 65001;" in (bird.config or "")
    assert "neighbor 198.18.0.2 as 65001;" in (bird.config or "")
    reflect_once(store, bird, RR, 65100, RR)
    assert "local 198.18.0.100 as 65100;" in (bird.config or "")


def test_a_store_failure_keeps_birds_state():
    store, bird = MemoryStore(), FakeBird()
    register(store, Host("a", "198.18.0.2"))
    reflect_once(store, bird, RR, None, RR)
    before = bird.config

    store.down = True
    with pytest.raises(DatastoreUnavailable):
        reflect_once(store, bird, RR, None, RR)
    assert bird.config == before and bird.running

    store.down = False
    register(store, Host("b", "198.18.0.3"))
    assert reflect_once(store, bird, RR, None, RR) is True
    assert "neighbor 198.18.0.3" in (bird.config or "")


def test_an_invalid_host_record_is_skipped_and_the_others_stay_clients():
    store, bird = MemoryStore(), FakeBird()
    register(store, Host("a", "198.18.0.2"))
    store.put(keys.host_meta("evil"), '{"name":"evil","ip":"1;","as_num":null}')
    assert reflect_once(store, bird, RR, None, RR)
    assert bird.config is not None
    assert "neighbor 198.18.0.2" in bird.config
    assert "neighbor 1;" not in bird.config and bird.config.count("neighbor ") == 1


def test_the_loop_follows_changes_and_only_hosts_pools_and_settings_make_a_pass():
    """Through the change stream: an endpoint created anywhere costs the reflector
    no pass and no read; a new host is configured at the next round; idle rounds
    read nothing."""
    from calicnm.routing.reflector import RESYNC_SECONDS, ReflectorLoop

    store, bird = MemoryStore(), FakeBird()
    register(store, Host("a", "198.18.0.2"))
    loop = ReflectorLoop(store, bird, RR, None, RR, changes=store)
    wait = loop.step()
    assert loop.passes == 1 and "198.18.0.2" in (bird.config or "")
    assert 0 < wait <= RESYNC_SECONDS
    reads = store.reads
    store.put(keys.endpoint("a", "1" * 64), "{}")  # not the reflector's business
    loop.step()
    assert loop.passes == 1 and store.reads == reads
    register(store, Host("b", "198.18.0.3"))
    assert loop.woken.is_set()
    loop.step()
    assert loop.passes == 2 and "198.18.0.3" in (bird.config or "")
    assert store.reads == reads, "the pass read the in-memory copy"
    store.down = True  # the stream ends: rounds read etcd (and fail) every second
    assert loop.step() == 1.0
    store.down = False
    loop.step()
    assert loop.passes == 3
