"""Hostile input at every door: records from etcd, Docker's calls, and what
the agent writes for Join and ``calicnm status``.  Over MemoryStore and the
stateful kernel fakes; the e2e tier repeats the poison cases on a real host."""

from __future__ import annotations

import ipaddress
import json
import os
import tarfile
import threading
import time

import pytest

from calicnm.config import Config
from calicnm.driver import Driver
from calicnm.endpoint import derive_mac, plan_link
from calicnm.errors import DataplaneError, InvalidRequest
from calicnm.host.markers import AgentStatus, Markers, StatusFile
from calicnm.host.policy_applier import PolicyApplier
from calicnm.ipam import Allocator
from calicnm.model import Endpoint, Host, Network, Pool
from calicnm.node.agent import Agent
from calicnm.node.diags import collect
from calicnm.plugin_api import MAX_BODY, build_app
from calicnm.policy import Profile
from calicnm.profiles import (
    FORWARD,
    INPUT,
    LOCAL_IPS,
    OUTPUT,
    PEER_HOSTS,
    RAW_OUTPUT,
    RAW_PREROUTING,
    TUNNEL_SOURCES,
    HostFacts,
    LocalEndpoint,
    compile_policy,
    endpoint_chain,
)
from calicnm.store import keys, records
from calicnm.store.kv import KV
from tests.fakes import FakeIpsets, FakeIptables, FakePlumbing, FakeRoutes, MemoryStore

HOST = "h1"
NET = "a" * 64
EP = "1" * 64
GOOD = Endpoint(
    EP,
    HOST,
    NET,
    "cali" + EP[:11],
    "tmp" + EP[:11],
    derive_mac(EP),
    (ipaddress.IPv4Address("10.0.0.2"),),
)


def endpoint_json(**changes: object) -> str:
    data = json.loads(GOOD.to_json())
    data.update(changes)
    return json.dumps(data)


POISON = {
    "protocol ²": (
        keys.profile("poison"),
        '{"inbound_rules":[{"action":"allow","protocol":"\\u00b2"}],"outbound_rules":[]}',
    ),
    "non-UTF-8 bytes": (
        keys.profile("bytes"),
        b'{"tags":["\xff\xfe"]}'.decode(errors="surrogateescape"),
    ),
    "bad affinity key": (keys.AFFINITY + "h1/nonsense", ""),
    "affinity host ../x": (keys.AFFINITY + "../x/10.0.0.0-26", ""),
    "interface with a newline": (
        keys.endpoint(HOST, "2" * 64),
        endpoint_json(id="2" * 64, interface="cali222\n-A INPUT -j ACCEPT", peer="tmp" + "2" * 11),
    ),
    "id /tmp/x": (keys.endpoints_prefix(HOST) + "/tmp/x", endpoint_json(id="/tmp/x")),
    "host ip 1;": (keys.host_meta("evil"), '{"name":"evil","ip":"1;","as_num":null}'),
    "absurd port list": (
        keys.profile("ports"),
        json.dumps({"inbound_rules": [{"protocol": "tcp", "dst_ports": list(range(100000))}]}),
    ),
    "boolean as string": (
        keys.pool("10.9.0.0/16"),
        '{"cidr":"10.9.0.0/16","block_prefix":26,"nat_outgoing":"yes"}',
    ),
    "unknown field": (keys.host_meta("h2"), '{"name":"h2","ip":"10.1.1.2","shell":"rm -rf /"}'),
    "gateway outside the gateways": (keys.endpoint(HOST, EP), endpoint_json(gateway="10.0.0.1")),
    "deep nesting": (keys.network(NET), "[" * 100000 + "]" * 100000),
}


@pytest.mark.parametrize("case", sorted(POISON))
def test_every_poison_record_is_refused_by_its_constructor_naming_its_key(case):
    key, value = POISON[case]
    store = MemoryStore()
    store.put(keys.profile("web"), Profile.default("web").to_json())
    store.put(key, value)
    snapshot = records.read_snapshot(store)
    assert key in snapshot.invalid, snapshot.invalid
    assert key in snapshot.invalid[key] or "not a" in snapshot.invalid[key]
    assert snapshot.profiles["web"] == Profile.default("web")


def test_a_record_under_another_hosts_key_is_refused():
    kv = KV(keys.endpoint("h2", EP), GOOD.to_json(), 1)
    with pytest.raises(InvalidRequest, match="h2"):
        records.decode_endpoint(kv)


class Kernel:
    def __init__(self, tmp: str) -> None:
        self.store = MemoryStore()
        self.store.put(keys.network(NET), Network(NET, docker_name="web").to_json())
        self.store.put(keys.profile("web"), Profile.default("web").to_json())
        self.store.put(keys.endpoint(HOST, EP), GOOD.to_json())
        self.iptables = FakeIptables()
        self.ipsets = FakeIpsets(self.iptables)
        self.routes = FakeRoutes()
        self.routes.add_link(GOOD.interface)
        self.status = StatusFile(os.path.join(tmp, "agent-status.json"))
        self.clock = [1000.0]
        self.applier = PolicyApplier(self.iptables, self.ipsets)
        self.agent = Agent(
            self.store,
            HOST,
            self.applier,
            self.routes,
            Markers(os.path.join(tmp, "programmed")),
            status=self.status,
            clock=lambda: self.clock[0],
        )


def test_poison_keeps_the_rest_served_and_is_reported_in_the_status(tmp_path):
    k = Kernel(str(tmp_path))
    for key, value in POISON.values():
        if key != keys.endpoint(HOST, EP) and key != keys.network(NET):
            k.store.put(key, value)
    k.agent.first_pass()
    status = k.status.read()
    assert status is not None and status.problem(k.clock[0]) is None
    assert keys.profile("poison") in status.invalid
    assert keys.host_meta("evil") in status.invalid
    assert endpoint_chain(GOOD.interface, "inbound") in k.iptables.chains()
    saved = k.iptables.save("filter")
    assert "-A INPUT -j ACCEPT" not in saved and "\n-A INPUT -j ACCEPT" not in saved
    assert not os.path.exists("/tmp/x") or os.path.getmtime("/tmp/x") < time.time() - 60


class Boom(PolicyApplier):
    """An applier that fails with an unexpected (non-calicnm) error."""

    def __init__(self, inner: PolicyApplier) -> None:
        self.inner = inner
        self.fail = True

    def apply(self, desired, full=False):  # type: ignore[no-untyped-def]
        if self.fail:
            raise ValueError("unexpected")
        return self.inner.apply(desired, full)

    def jumps_in_place(self) -> bool:
        return self.inner.jumps_in_place()


def test_an_unexpected_error_does_not_kill_the_agent_and_shows_in_its_status(tmp_path):
    k = Kernel(str(tmp_path))
    boom = Boom(k.applier)
    k.agent._applier = boom
    stop = threading.Event()
    thread = threading.Thread(target=k.agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30

        def reported() -> AgentStatus | None:
            found = k.status.read()
            return found if found and "ValueError" in (found.last_error or "") else None

        # The agent records the error, then writes its status file: wait for the file.
        while reported() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert thread.is_alive()
        status = k.status.read()
        assert status is not None and "ValueError: unexpected" in (status.last_error or "")
        assert status.problem(k.clock[0]) is not None  # no pass ever succeeded
        boom.fail = False
        k.agent.wake()
        deadline = time.monotonic() + 30

        def recovered() -> bool:
            found = k.status.read()
            return found is not None and found.problem(k.clock[0]) is None

        while not recovered() and time.monotonic() < deadline:
            time.sleep(0.01)
        status = k.status.read()
        assert status is not None and status.problem(k.clock[0]) is None
    finally:
        stop.set()
        k.agent.wake()
        thread.join(timeout=3)
    assert not thread.is_alive()


def test_health_turns_red_when_passes_fail_or_the_agent_goes_quiet():
    ok = AgentStatus(pid=1, updated=100.0, last_good=100.0, passes=3)
    assert ok.problem(105.0) is None
    assert "not reported" in (ok.problem(200.0) or "")
    failing = AgentStatus(pid=1, updated=130.0, last_good=100.0, last_error="boom", passes=3)
    assert "failed for 30s" in (failing.problem(130.0) or "")
    busy = AgentStatus(pid=1, updated=100.0, last_good=100.0, busy_since=100.0)
    assert busy.problem(150.0) is None
    assert "running for" in (busy.problem(300.0) or "")


def test_the_status_file_is_replaced_whole_and_garbage_reads_as_none(tmp_path):
    status = StatusFile(str(tmp_path / "s.json"))
    assert status.read() is None
    assert "not reported" in (status.problem(1.0) or "")
    status.write(AgentStatus(pid=1, updated=1.0, last_good=1.0, invalid={"/k": "bad"}))
    assert status.read() == AgentStatus(pid=1, updated=1.0, last_good=1.0, invalid={"/k": "bad"})
    (tmp_path / "s.json").write_text("{not json")
    assert status.read() is None


def test_a_flushed_forward_chain_is_noticed_and_repaired(tmp_path):
    k = Kernel(str(tmp_path))
    stop = threading.Event()
    thread = threading.Thread(target=k.agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not k.applier.jumps_in_place() and time.monotonic() < deadline:
            time.sleep(0.01)
        k.iptables.command("-F FORWARD")
        flushed = time.monotonic()
        while k.iptables.rules("FORWARD") != [f"-j {FORWARD}"]:
            assert time.monotonic() - flushed < 30, "not repaired"  # bounded, not timed
            time.sleep(0.01)
    finally:
        stop.set()
        k.agent.wake()
        thread.join(timeout=3)


# ---- Join fails closed ---------------------------------------------------------------


def join_rig(problem: str | None, programmed: bool) -> tuple[Driver, dict[str, object]]:
    store = MemoryStore()
    plumbing = FakePlumbing()
    ipam = Allocator(store, HOST, sleep=lambda s: None)
    ipam.add_pool(Pool(ipaddress.IPv4Network("10.0.0.0/26")))
    store.put(keys.network(NET), Network(NET, docker_name="web").to_json())
    driver = Driver(
        store,
        ipam,
        plumbing,
        HOST,
        programmed=lambda _eid: programmed,
        agent_problem=lambda: problem,
        join_wait=0.2,
    )
    driver.create_endpoint(
        {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": "10.0.0.2/32"}}
    )
    plumbing.links[plan_link(EP, "", ()).host_if] = plan_link(EP, GOOD.mac, GOOD.ipv4)
    body: dict[str, object] = {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/var/run/x"}
    return driver, body


def test_join_refuses_while_the_agent_is_not_healthy():
    driver, body = join_rig("passes have failed for 30s", programmed=True)
    with pytest.raises(DataplaneError, match="not healthy"):
        driver.join(body)


def test_join_fails_when_the_endpoint_is_not_programmed_in_time():
    driver, body = join_rig(None, programmed=False)
    with pytest.raises(DataplaneError, match="not programmed"):
        driver.join(body)
    driver, body = join_rig(None, programmed=True)
    assert driver.join(body)["Gateway"] == "169.254.1.1"


def test_a_body_over_a_mebibyte_is_refused_with_413_and_the_plugin_stays_up():
    store = MemoryStore()
    ipam = Allocator(store, HOST)
    client = build_app(Driver(store, ipam, FakePlumbing(), HOST)).test_client()
    resp = client.post("/NetworkDriver.CreateNetwork", data=b"{" + b" " * MAX_BODY + b"}")
    assert resp.status_code == 413
    assert "Err" in json.loads(resp.data)
    resp = client.post("/Plugin.Activate", data=b"")
    assert resp.status_code == 200


# ---- the host protects itself ------------------------------------------------------


LOCAL = LocalEndpoint(EP, GOOD.interface, ("10.0.0.2",), ("web",))


@pytest.mark.parametrize(
    ("action", "last"),
    [("drop", "-i cali+ -j DROP"), ("accept", "-i cali+ -j ACCEPT"), ("return", None)],
)
def test_endpoint_to_host_action_ends_the_input_chain(action, last):
    dp = compile_policy({"web": Profile.default("web")}, [LOCAL], {}, (), HostFacts(action))
    rules = dp.chains[INPUT]
    assert rules[-2 if last else -1] == "-i cali+ -j calicnm-FROM-EP"
    if last:
        assert rules[-1] == last


def test_encapsulated_pools_admit_tunnel_traffic_only_from_registered_hosts():
    facts = HostFacts(
        vxlan=True,
        ipip=True,
        peer_hosts=frozenset({"198.18.0.3"}),
        tunnel_sources=frozenset({"10.0.1.0/26", "198.18.0.3/32"}),
    )
    dp = compile_policy({"web": Profile.default("web")}, [LOCAL], {}, (), facts)
    assert dp.ipsets[PEER_HOSTS] == {"198.18.0.3"}
    assert dp.ipsets[TUNNEL_SOURCES] == {"10.0.1.0/26", "198.18.0.3/32"}
    assert dp.ipsets[LOCAL_IPS] == {"10.0.0.2"}
    assert f"-p udp --dport 4789 -m set ! --match-set {PEER_HOSTS} src -j DROP" in dp.chains[INPUT]
    assert f"-p 4 -m set ! --match-set {PEER_HOSTS} src -j DROP" in dp.chains[INPUT]
    forward = dp.chains[FORWARD]
    assert forward[:2] == (
        f"-i vxlan.calicnm -m set --match-set {LOCAL_IPS} src -j DROP",
        f"-i vxlan.calicnm -m set ! --match-set {TUNNEL_SOURCES} src -j DROP",
    )


def test_tunnel_packets_between_registered_hosts_are_untracked_and_accepted_in_order():
    facts = HostFacts(vxlan=True, peer_hosts=frozenset({"198.18.0.3"}))
    dp = compile_policy({"web": Profile.default("web")}, [LOCAL], {}, (), facts)
    vxlan = f"-p udp --dport 4789 -m set --match-set {PEER_HOSTS}"
    assert dp.raw_chains == {
        RAW_PREROUTING: (f"{vxlan} src -j CT --notrack",),
        RAW_OUTPUT: (f"{vxlan} dst -j CT --notrack",),
    }
    assert dp.chains[OUTPUT] == (f"{vxlan} dst -m conntrack --ctstate UNTRACKED -j ACCEPT",)
    # Anything not from a registered host is dropped before the untracked accept.
    rules = list(dp.chains[INPUT])
    drop = rules.index(f"-p udp --dport 4789 -m set ! --match-set {PEER_HOSTS} src -j DROP")
    accept = rules.index("-p udp --dport 4789 -m conntrack --ctstate UNTRACKED -j ACCEPT")
    assert drop < accept
    # The raw table is applied after the filter table's accepts.
    assert list(dp.tables()) == ["filter", "nat", "raw"]
    # Without a VXLAN pool there is nothing in the raw table and no OUTPUT chain.
    plain = compile_policy({"web": Profile.default("web")}, [LOCAL], {}, (), HostFacts())
    assert plain.raw_chains == {}
    assert OUTPUT not in plain.chains


def test_internal_endpoints_reach_pool_addresses_only():
    internal = LocalEndpoint(EP, GOOD.interface, ("10.0.0.2",), ("web",), internal=True)
    pools = (Pool(ipaddress.IPv4Network("10.0.0.0/16")),)
    dp = compile_policy({"web": Profile.default("web")}, [internal], {}, pools)
    out = dp.chains[endpoint_chain(GOOD.interface, "outbound")]
    assert "-m set ! --match-set calicnm-all-pools dst -j DROP" in out
    assert dp.ipsets["calicnm-all-pools"] == {"10.0.0.0/16"}
    assert dp.nat_chains == {}


def test_config_takes_felix_name_and_refuses_an_unknown_action():
    config = Config.from_env(environ={"FELIX_DEFAULTENDPOINTTOHOSTACTION": "ACCEPT"})
    assert config.endpoint_to_host == "accept"
    with pytest.raises(InvalidRequest, match="endpoint-to-host"):
        _ = Config(endpoint_to_host_action="allow-all").endpoint_to_host


def test_ipsets_refuse_foreign_names_and_members_that_are_not_addresses():
    ipsets = FakeIpsets(FakeIptables())
    with pytest.raises(DataplaneError):
        ipsets.replace({"docker-set": ("calicnm-X", "hash:ip", ["10.0.0.1"])})
    with pytest.raises(DataplaneError):
        ipsets.replace({"calicnm-t-a": ("calicnm-x-a", "hash:ip", ["10.0.0.1\nflush x"])})


def test_diags_archive_is_private_whatever_the_umask(tmp_path):
    store = MemoryStore()
    store.put(keys.host_meta("h1"), Host("h1", "10.1.1.1").to_json())
    old = os.umask(0)
    try:
        path = collect(
            Config(state_dir=str(tmp_path)),
            store,
            str(tmp_path),
            lambda: "ok\n",
            run=lambda argv: "",
            docker=lambda: "",
        )
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o600
    with tarfile.open(path) as tar:
        assert all(m.mode == 0o600 for m in tar.getmembers())
