"""The driver fuzz of tests/unit/test_driver_fuzz.py through a real node's
plugin socket: the same Docker calls, sequences, hostile bodies and undo
calls made or left out, and veths vanishing, sent as HTTP on the unix
socket dockerd uses to a calicnm node with its embedded etcd, its agent and
the host's kernel.

After every step, on what etcd and the kernel hold (the unit fuzz's
checks): no address held twice or named by two endpoint records, every
endpoint record's address allocated to that endpoint, every ``cali``/``tmp``
link belonging to an endpoint record, every record decoding and every
block inside a pool, nothing allocated that Docker does not hold; and
besides:
- nothing changed between calls: etcd and the links are as the last call
  left them (no background writer races the fuzz);
- the node runs and its plugin answers on the socket.
Of every call:
- the answer is a JSON object, a failure a JSON ``{"Err": ...}`` that is
  never "internal error";
- a refusal (400, 404, 409) changed nothing: every key under /calicnm/v1/
  (value and revision) and every link (index, MTU, MAC) is as before;
- no fault is injected, so no 503 is excused; the only other failure is
  a 500 from Join (``JOIN_500S``): the endpoint's veth is missing (the
  fuzz removed it), or the agent, late on a loaded host, had not
  programmed the endpoint within Join's wait or not reported its status.
  The first and the last are refused before anything is written, and
  checked to have changed nothing.

Set-up: one emulated host whose node has no default pool and sweeps for
orphans only hourly.  The fuzz's networks and endpoints are unknown to its
dockerd, so the ownership collector would rightly remove them within
seconds, racing the checks above; the collector's own tests cover it.  The
pools are the unit fuzz's (``POOLS``: 10.0.0.0/26 and 10.0.1.0/28 in /28
blocks), added once.

Each example starts clean (``reset``): what the previous one left is
undone through the plugin, as Docker would undo it (DeleteEndpoint,
DeleteNetwork, ReleaseAddress), and checked gone.  Not by deleting keys:
the plugin's allocator keeps the blocks it last wrote, and a block
changed behind its back is another writer's change, which the fuzz does
not model here.  Empty blocks and their affinities stay, so an example
may allocate from other blocks than a fresh host would; a replay need not
repeat a run exactly (``FirstFailure``).

Bounded: ``FUZZ_SOCKET_EXAMPLES`` (15) examples of at most 15 steps, no
shrinking (a failure is reported as found: replaying many sequences against
a real node takes minutes), a timeout on every call and command.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import HypothesisException
from hypothesis.stateful import invariant, run_state_machine_as_test

from calicnm.endpoint import HOST_PREFIX, PEER_PREFIX
from calicnm.ipam import ANY_POOL_ID
from calicnm.plugin_api import CONTENT_TYPE
from calicnm.store import keys, records
from calicnm.wiring import EMBEDDED_ETCD_URL
from lab.cluster import CalicnmHost, single_host
from lab.plugin_client import UnixHTTPConnection
from tests.unit.test_driver_fuzz import POOLS, DriverFuzz, State

HOSTNAME = "host1"
NODE_ENV = {"CALICNM_RECONCILE_INTERVAL": "3600", "CALICNM_NO_DEFAULT_POOLS": "true"}
CALL_TIMEOUT = 60.0
"""One plugin call: Join alone may wait 10 s for the agent."""
COMMAND_TIMEOUT = 60.0
ETCDCTL = shlex.join(["etcdctl", "--endpoints", EMBEDDED_ETCD_URL])
ETCDCTL_ENV = {**os.environ, "ETCDCTL_API": "3"}
LINKS_MARK = "--- links ---"
VOLATILE = {keys.host_meta(HOSTNAME)}
"""Keys the node rewrites on its own (its host record, every 10 s)."""
ADD_POOLS = """
import ipaddress, sys
from calicnm.ipam import Allocator
from calicnm.model import Pool
from calicnm.store.etcd import EtcdStore, parse_endpoints

url, host, *pools = sys.argv[1:]
store = EtcdStore(parse_endpoints(url))
try:
    for cidr, prefix in zip(pools[::2], pools[1::2]):
        pool = Pool(ipaddress.IPv4Network(cidr), block_prefix=int(prefix))
        Allocator(store, host).add_pool(pool)
finally:
    store.close()
"""
JOIN_500S = ("is missing", "was not programmed", "is not healthy")
"""Join's failures on a real host: the veth is gone (the fuzz removed it),
the agent did not program the endpoint within Join's wait, or the agent's
status is stale: both of the latter are the agent running late on a loaded
host, and the last is refused before anything is written."""
SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_SOCKET_EXAMPLES", "15")),
    stateful_step_count=15,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def post(path: Path, method: str, data: bytes) -> tuple[int, Any]:
    """One call: the HTTP status and the decoded JSON answer."""
    conn = UnixHTTPConnection(str(path), CALL_TIMEOUT)
    try:
        # As dockerd: no Content-Type.
        conn.request("POST", f"/{method}", body=data, headers={"Accept": CONTENT_TYPE})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        raise AssertionError(f"{method}: {resp.status}, not JSON: {raw!r}") from None


def read_state(host: CalicnmHost) -> State:
    """Every key under /calicnm/v1/ but the volatile ones, with its value and
    revision, and every ``cali``/``tmp`` link with its index, MTU and MAC;
    one command in the host's namespace."""
    script = f"{ETCDCTL} get --prefix {keys.ROOT}/ -w json && echo {shlex.quote(LINKS_MARK)}"
    script += " && ip -o link show"
    out = host.netns.run(["sh", "-c", script], env=ETCDCTL_ENV, timeout=COMMAND_TIMEOUT).stdout
    stored, mark, listed = out.partition(LINKS_MARK)
    assert mark, out
    contents: dict[str, tuple[str, int]] = {}
    for kv in json.loads(stored).get("kvs", []):
        key = base64.b64decode(kv["key"]).decode()
        if key not in VOLATILE:
            value = base64.b64decode(kv.get("value", "")).decode()
            contents[key] = (value, int(kv["mod_revision"]))
    links: dict[str, Any] = {}
    for line in listed.strip().splitlines():
        index, name, rest = line.split(": ", 2)
        name = name.split("@")[0]
        if name.startswith((HOST_PREFIX, PEER_PREFIX)):
            mtu = re.search(r" mtu (\d+)", rest)
            mac = re.search(r"link/ether (\S+)", rest)
            links[name] = (int(index), mtu and mtu[1], mac and mac[1])
    return State(contents, links)


def succeed(host: CalicnmHost, method: str, body: dict[str, str]) -> None:
    status, payload = post(host.socket, method, json.dumps(body).encode())
    assert status == 200, (method, body, status, payload)


def settings_of(state: State) -> dict[str, tuple[str, int]]:
    """The pools and global settings: what the set-up wrote, which no call changes."""
    prefixes = (keys.POOLS, keys.config(""))
    return {k: v for k, v in state.contents.items() if k.startswith(prefixes)}


def reset(host: CalicnmHost, baseline: State) -> State:
    """Undo what an example left, through the plugin as Docker would:
    DeleteEndpoint for every endpoint record (with its veth), DeleteNetwork
    for every network, ReleaseAddress for every address still allocated;
    then check that no record, allocation or veth is left and the pools
    and settings are the set-up's.  Empty blocks, their affinities and
    profiles stay; the fuzz treats them as any host's history."""
    store = read_state(host).store()
    undo: list[tuple[str, dict[str, str]]] = [
        ("NetworkDriver.DeleteEndpoint", {"NetworkID": e.network_id, "EndpointID": e.id})
        for e in records.endpoints(store, HOSTNAME)
    ]
    undo += [("NetworkDriver.DeleteNetwork", {"NetworkID": n}) for n in records.networks(store)]
    for method, body in undo:
        succeed(host, method, body)
    for block in records.blocks(read_state(host).store()):
        for ordinal in sorted(block.allocations):
            address = str(block.address(ordinal))
            succeed(host, "IpamDriver.ReleaseAddress", {"PoolID": ANY_POOL_ID, "Address": address})
    state = read_state(host)
    store = state.store()
    left = [kv.key for kv in store.list(keys.NETWORKS)]
    left += [kv.key for _, kv in records.endpoint_kvs(store)]
    left += [str(b.cidr) for b in records.blocks(store) if b.allocations]
    assert not left and not state.links, f"left after the reset: {left}, {sorted(state.links)}"
    assert settings_of(state) == settings_of(baseline), baseline.changes(state)
    return state


def add_pools(host: CalicnmHost) -> None:
    args = [a for p in POOLS for a in (str(p.cidr), str(p.block_prefix))]
    argv = [sys.executable, "-c", ADD_POOLS, EMBEDDED_ETCD_URL, HOSTNAME, *args]
    host.netns.run(argv, timeout=COMMAND_TIMEOUT)


class FirstFailure:
    """The first example that failed, as it ran: its calls and the error.

    Hypothesis replays a failing example to report it; on a real node the
    replay may not fail the same way (a Join's timing), and Hypothesis then
    reports only that the replay differed.  This keeps the original."""

    def __init__(self) -> None:
        self.report: str | None = None

    def record(self, transcript: list[str], exc: BaseException) -> None:
        if self.report is None:
            lines = "\n".join(f"  {line}" for line in transcript)
            self.report = f"{type(exc).__name__}: {exc}\nafter these calls:\n{lines}"


class SocketDriverMachine(DriverFuzz):
    """The generator through the socket of ``calicnm_host``'s node; no
    faults are drawn.  ``last`` is the state after the latest call (or
    change the fuzz made), which the next call starts from."""

    host = HOSTNAME

    def __init__(self, calicnm_host: CalicnmHost, baseline: State, failures: FirstFailure) -> None:
        super().__init__()
        self.calicnm_host = calicnm_host
        self.failures = failures
        self.transcript: list[str] = []
        self.last = reset(calicnm_host, baseline)

    def teardown(self) -> None:
        # Called in the runner's ``finally``: the exception ending the
        # example, if any, is the one being handled.
        exc = sys.exc_info()[1]
        if isinstance(exc, Exception) and not isinstance(exc, HypothesisException):
            self.failures.record(self.transcript, exc)

    def post(self, method: str, data: bytes) -> tuple[int, Any]:
        status, payload = post(self.calicnm_host.socket, method, data)
        answer = payload.get("Err", "") if isinstance(payload, dict) else payload
        self.transcript.append(f"{method} {data[:300]!r} -> {status} {answer!r:.300}")
        return status, payload

    def read_state(self) -> State:
        self.last = read_state(self.calicnm_host)
        return self.last

    def state_before_call(self) -> State:
        return self.last

    def settled_state(self) -> State:
        last = self.last
        now = self.read_state()
        assert now == last, f"changed between calls: {last.changes(now)}"
        return now

    def failure_excused(self, method: str, status: int, err: str) -> bool:
        return method == "NetworkDriver.Join" and status == 500 and any(m in err for m in JOIN_500S)

    def changes_nothing(self, method: str, status: int, err: str) -> bool:
        return super().changes_nothing(method, status, err) or (
            method == "NetworkDriver.Join" and status == 500 and "is not healthy" in err
        )

    def remove_link(self, name: str) -> None:
        if name in self.last.links:
            self.calicnm_host.netns.run(["ip", "link", "del", name], timeout=COMMAND_TIMEOUT)
            self.transcript.append(f"(ip link del {name})")
            self.read_state()

    @invariant()
    def the_node_serves(self) -> None:
        node = self.calicnm_host.node
        assert node is not None and node.is_running(), "the node exited"
        assert self.calicnm_host.answering(), "the plugin does not answer on its socket"


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root")
    for tool in ("dockerd", "etcd", "etcdctl", "iptables"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; run 'make test', which installs it")


def test_driver_fuzz_over_the_socket(tmp_path: Path) -> None:
    _require()
    with single_host(tmp_path, hostname=HOSTNAME, extra_env=NODE_ENV) as host:
        add_pools(host)
        baseline = read_state(host)
        assert baseline.links == {}, baseline.links
        assert sorted(k for k in baseline.contents if k.startswith(keys.POOLS)) == [
            keys.pool(p.cidr) for p in POOLS
        ]
        failures = FirstFailure()
        try:
            run_state_machine_as_test(
                lambda: SocketDriverMachine(host, baseline, failures), settings=SETTINGS
            )
        except Exception as exc:
            if host.node is not None:
                lines = [ln for ln in host.node.log_tail(400).splitlines() if "pyroute2" not in ln]
                print("node log:", *lines[-60:], sep="\n")
            if failures.report is not None:
                raise AssertionError(failures.report) from exc
            raise
