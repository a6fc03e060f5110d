"""Random sequences of Docker calls against calicnm's plugin: valid and
hostile bodies, and Docker's undo calls made or left out, with the state
checked after every step.

``DriverFuzz`` is the generator and the checks, independent of how a call
reaches the plugin: a variant supplies ``post`` (one call: status and JSON
answer), ``read_state`` (the stored keys and the host's veths), the failures
it provokes and excuses, and how a veth vanishes.  ``DriverMachine`` here
runs it against the Flask app over ``HookedStore`` and ``FakePlumbing``,
with etcd failing before or after a write, the kernel refusing a veth and
the pending reaper; tests/e2e/test_driver_fuzz_socket.py runs the same
generator through a real node's plugin socket.

After every step:
- no address is held twice, or named by two endpoint records;
- every endpoint record's address is allocated, to that endpoint;
- every veth has an endpoint record (no call is half-way once it answered);
- every stored record decodes, and every block lies inside a pool;
- everything allocated is held by Docker as the test follows it: given by
  a RequestAddress, bound to a network, or claimed by an endpoint, and not
  released since (nothing leaks, not even after a lost reply);
and of every call:
- the answer is a JSON object; a failure carries ``Err`` (never "internal
  error");
- a refusal (400, 404, 409), or a Join refused for a missing veth, wrote
  nothing and touched no veth;
- any other failure is one the variant provoked: here a 503 only when etcd
  was made to fail, a 500 only when the kernel was (or a veth vanished);
- RequestAddress never hands out an address Docker still holds.

Bounded: ``max_examples`` 200 (``FUZZ_EXAMPLES`` overrides it for a longer
run) of at most 15 steps, no deadline, no example database.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from calicnm.driver import Driver
from calicnm.endpoint import host_ifname
from calicnm.errors import DatastoreUnavailable
from calicnm.ipam import Allocator
from calicnm.model import Pool
from calicnm.plugin_api import build_app
from calicnm.store import keys, records
from calicnm.store.kv import KV, Store
from tests.fakes import FakePlumbing, HookedStore, MemoryStore

N = ipaddress.IPv4Network
NIDS = ["6f49939a5d861b88bab9633a90df9206d74f387e13a58e07639c41910427ffb7", "ab" * 32]
EIDS = [
    "629601b5fa245ddf93ea239eb288111b92d6781bedeebcb340ccdf43a081ea34",
    "8b8b6394a1dd0c1f2e3d4c5b6a79881726354433221100ffeeddccbbaa998877",
    "cd" * 32,
]
POOLS = [Pool(N("10.0.0.0/26"), block_prefix=28), Pool(N("10.0.1.0/28"), block_prefix=28)]
"""The pools every variant starts with."""
POOL_BODIES = [
    {"Pool": ""},
    {"Pool": "10.0.0.0/26"},
    {"Pool": "10.0.0.0/26", "SubPool": "10.0.0.32/28"},
    {"Pool": "10.0.1.0/28"},
    {"Pool": "10.0.2.0/24"},
    {"Pool": "10.0.0.0/27", "SubPool": "10.0.0.48/28"},
]
ADDRESSES = [
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.17",
    "10.0.0.40",
    "10.0.1.5",
    "10.9.9.9",
    "169.254.1.1",
]
GATEWAYS = [None, "", "169.254.1.1/32", "10.0.0.1/26", "10.0.0.17/26", "10.0.1.1/28", "nonsense"]
GENERIC = [{}, {"profile": "web"}, {"mtu": "1400"}, {"mtu": "0" * 300 + "1400"}, {"colour": "x"}]
HOSTILE = [
    None,
    7,
    -1,
    1.5,
    True,
    [],
    {},
    "",
    "x",
    "x" * 300,
    "10.0.0.300",
    "10.0.0.1/99",
    "\x00",
    "calicnm:",
    "calicnm:10.0.0.0/26:10.0.0.0/28:x",
    {"a": [1]},
]
RAW = [b"{", b"[]", b"null", b'"x"', b"", b"\xff\xfe", b"[" * 200 + b"]" * 200, b'{"a":1}{']
METHODS = [
    "IpamDriver.RequestPool",
    "IpamDriver.ReleasePool",
    "IpamDriver.RequestAddress",
    "IpamDriver.ReleaseAddress",
    "NetworkDriver.CreateNetwork",
    "NetworkDriver.DeleteNetwork",
    "NetworkDriver.CreateEndpoint",
    "NetworkDriver.DeleteEndpoint",
    "NetworkDriver.Join",
    "NetworkDriver.Leave",
    "NetworkDriver.EndpointOperInfo",
]
FIELDS = [
    "PoolID",
    "Pool",
    "SubPool",
    "Address",
    "Options",
    "V6",
    "NetworkID",
    "EndpointID",
    "Interface",
    "IPv4Data",
    "IPv6Data",
    "SandboxKey",
]
REFUSALS = {400, 404, 409}
FAILURES = st.one_of(st.none(), st.tuples(st.integers(1, 4), st.sampled_from(["before", "after"])))
"""None, or the n-th write from now fails once, before or after it is applied."""
GATEWAY_REQUEST = {"RequestAddressType": "com.docker.network.gateway"}


@dataclass(frozen=True)
class State:
    """What a call can change: every stored key that only calls change, with
    its value and revision (equal before and after exactly when nothing was
    written), and every veth end of the host namespace (``cali*``, ``tmp*``)
    with what identifies that link (equal when none was made or removed)."""

    contents: dict[str, tuple[str, int]]
    links: dict[str, Any]

    def store(self) -> MemoryStore:
        """The contents as a store, for the records layer to read."""
        store = MemoryStore()
        for key, (value, _revision) in sorted(self.contents.items()):
            store.put(key, value)
        return store

    def changes(self, other: State) -> str:
        """The keys and links that differ between ``self`` and ``other``."""
        stored = [
            k
            for k in sorted(self.contents.keys() | other.contents.keys())
            if self.contents.get(k) != other.contents.get(k)
        ]
        links = [
            k
            for k in sorted(self.links.keys() | other.links.keys())
            if self.links.get(k) != other.links.get(k)
        ]
        return f"keys changed: {stored}; links changed: {links}"


class DriverFuzz(RuleBasedStateMachine):
    """Docker's calls and sequences, and hostile input, each checked.

    A variant implements ``post``, ``read_state`` and ``remove_link``, and
    may override ``arm`` (draw a fault for the coming calls),
    ``failure_excused`` (a failure it provoked), ``changes_nothing``, and
    how states are read around calls and steps (``state_before_call``,
    ``settled_state``, ``store_of``)."""

    host = "h1"
    """The name calicnm serves this host under (endpoint records, affinity)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool_ids = ["calicnm:any"]
        self.addresses = set(ADDRESSES)
        self.running: dict[str, dict[str, str]] = {}
        """Endpoint id -> the ReleaseAddress body Docker will send for it."""
        self.docker_holds: set[ipaddress.IPv4Address] = set()
        """What Docker was given and has not released (nor lost to the reaper)."""
        self.reservations: dict[str, tuple[str, list[str]]] = {}
        """Network id -> (PoolID, gateway and aux addresses Docker requested)."""

    # ---- what a variant provides ----------------------------------------------------

    def post(self, method: str, data: bytes) -> tuple[int, Any]:
        """Send one call to the plugin: its HTTP status and decoded JSON answer."""
        raise NotImplementedError

    def read_state(self) -> State:
        raise NotImplementedError

    def state_before_call(self) -> State:
        """The state a call starts from."""
        return self.read_state()

    def settled_state(self) -> State:
        """The state after a step, for the invariants."""
        return self.read_state()

    def arm(self, data: st.DataObject) -> None:
        """Draw a fault for the coming calls (none by default)."""

    def failure_excused(self, method: str, status: int, err: str) -> bool:
        """May this failure other than a refusal happen here?"""
        return False

    def changes_nothing(self, method: str, status: int, err: str) -> bool:
        """Does this answer promise that the call changed nothing?  A refusal
        does, and so does a Join refused for a missing veth (checked before
        its first write)."""
        if status in REFUSALS:
            return True
        return method == "NetworkDriver.Join" and status == 500 and "is missing" in err

    def remove_link(self, name: str) -> None:
        """Make the veth ``name`` vanish, with its peer."""
        raise NotImplementedError

    def store_of(self, state: State) -> Store:
        """``state``'s contents as a store the records layer reads."""
        return state.store()

    # ---- one call, checked --------------------------------------------------------

    def call(self, method: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        before = self.state_before_call()
        data = raw if raw is not None else json.dumps(body).encode()
        status, payload = self.post(method, data)
        after = self.read_state()
        assert isinstance(payload, dict), (method, status, payload)
        if status != 200:
            err = payload.get("Err")
            assert isinstance(err, str) and err, (method, status, payload)
            assert not err.startswith("internal error"), err
            assert status in REFUSALS or self.failure_excused(method, status, err), (
                method,
                status,
                err,
            )
        if self.changes_nothing(method, status, payload.get("Err", "")):
            assert after == before, (method, payload, before.changes(after))
        else:
            self._docker_view(method, body, status, payload, before.contents, after.contents)
        return status, payload

    def _docker_view(
        self,
        method: str,
        body: Any,
        status: int,
        payload: Any,
        before: dict[str, Any],
        after: dict[str, Any],
    ) -> None:
        """Follow what Docker holds: what a RequestAddress gave it must not be
        given again before Docker (or the network's deletion, or the reaper)
        released it; and everything allocated must be something Docker holds."""
        call = method.split(".")[1]
        if call == "RequestAddress" and status == 200:
            address = ipaddress.IPv4Address(payload["Address"].split("/")[0])
            self.addresses.add(str(address))
            if not address.is_link_local:
                assert address not in self.docker_holds, f"{address} handed out twice"
                self.docker_holds.add(address)
        elif call == "ReleaseAddress" and status == 200:
            self.docker_holds.discard(ipaddress.IPv4Address(body["Address"].split("/")[0]))
        elif call == "CreateEndpoint" and status == 200:
            self.docker_holds.add(ipaddress.IPv4Address(body["Interface"]["Address"].split("/")[0]))
        elif call in ("CreateNetwork", "DeleteNetwork") and isinstance(body, dict):
            mine = (f"gateway:{body['NetworkID']}", f"aux:{body['NetworkID']}")
            was = self._held_by(mine, before)
            now = self._held_by(mine, after)
            if call == "CreateNetwork":
                self.docker_holds |= now
            else:
                self.docker_holds -= was - now

    @staticmethod
    def _held_by(handles: tuple[str, ...], contents: dict[str, Any]) -> set[Any]:
        found = set()
        for key, (value, revision) in contents.items():
            if key.startswith(keys.BLOCKS):
                block = records.decode_block(KV(key, value, revision))
                found |= {a for h in handles for a in block.addresses_of(h)}
        return found

    # ---- Docker's calls -----------------------------------------------------------

    @rule(body=st.sampled_from(POOL_BODIES))
    def request_pool(self, body: dict[str, Any]) -> None:
        status, payload = self.call("IpamDriver.RequestPool", body)
        if status == 200 and payload["PoolID"] not in self.pool_ids:
            self.pool_ids.append(payload["PoolID"])

    @rule(data=st.data())
    def release_pool(self, data: st.DataObject) -> None:
        self.call("IpamDriver.ReleasePool", {"PoolID": data.draw(st.sampled_from(self.pool_ids))})

    @rule(
        data=st.data(),
        nid=st.sampled_from(NIDS),
        gateway=st.sampled_from(GATEWAYS),
        aux=st.lists(st.sampled_from(ADDRESSES), max_size=2),
        generic=st.sampled_from(GENERIC),
    )
    def create_network(
        self,
        data: st.DataObject,
        nid: str,
        gateway: str | None,
        aux: list[str],
        generic: dict[str, str],
    ) -> None:
        self.arm(data)
        pool_id = data.draw(st.sampled_from(self.pool_ids))
        self.create_network_on(pool_id, nid, gateway, aux, generic)

    @rule(data=st.data(), nid=st.sampled_from(NIDS))
    def delete_network(self, data: st.DataObject, nid: str) -> None:
        self.arm(data)
        self.call("NetworkDriver.DeleteNetwork", {"NetworkID": nid})

    @rule(data=st.data(), exact=st.booleans(), gateway=st.booleans())
    def request_address(self, data: st.DataObject, exact: bool, gateway: bool) -> None:
        self.arm(data)
        body: dict[str, Any] = {"PoolID": data.draw(st.sampled_from(self.pool_ids))}
        if exact:
            body["Address"] = data.draw(st.sampled_from(sorted(self.addresses)))
        if gateway:
            body["Options"] = {"RequestAddressType": "com.docker.network.gateway"}
        self.call("IpamDriver.RequestAddress", body)

    @rule(data=st.data())
    def release_address(self, data: st.DataObject) -> None:
        self.arm(data)
        body = {
            "PoolID": data.draw(st.sampled_from(self.pool_ids)),
            "Address": data.draw(st.sampled_from(sorted(self.addresses))),
        }
        self.call("IpamDriver.ReleaseAddress", body)

    @rule(
        data=st.data(),
        nid=st.sampled_from(NIDS),
        eid=st.sampled_from(EIDS),
        mac=st.sampled_from(["", "ee:01:02:03:04:05"]),
    )
    def create_endpoint(self, data: st.DataObject, nid: str, eid: str, mac: str) -> None:
        self.arm(data)
        address = data.draw(st.sampled_from(sorted(self.addresses)))
        interface = {"Address": f"{address}/32", "AddressIPv6": "", "MacAddress": mac}
        body = {"NetworkID": nid, "EndpointID": eid, "Interface": interface, "Options": {}}
        self.call("NetworkDriver.CreateEndpoint", body)

    @rule(nid=st.sampled_from(NIDS), eid=st.sampled_from(EIDS), sandbox=st.sampled_from("ab"))
    def join(self, nid: str, eid: str, sandbox: str) -> None:
        body = {"NetworkID": nid, "EndpointID": eid, "SandboxKey": f"/var/run/docker/{sandbox}"}
        self.call("NetworkDriver.Join", body)

    @rule(nid=st.sampled_from(NIDS), eid=st.sampled_from(EIDS))
    def leave(self, nid: str, eid: str) -> None:
        self.call("NetworkDriver.Leave", {"NetworkID": nid, "EndpointID": eid})

    @rule(nid=st.sampled_from(NIDS), eid=st.sampled_from(EIDS))
    def delete_endpoint(self, nid: str, eid: str) -> None:
        self.call("NetworkDriver.DeleteEndpoint", {"NetworkID": nid, "EndpointID": eid})

    # ---- Docker's sequences, each undo call made or left out -----------------------

    @initialize()
    def a_network_exists(self) -> None:
        self.create_network_on("calicnm:any", NIDS[0], "169.254.1.1/32", [], {})

    def create_network_on(
        self, pool_id: str, nid: str, gateway: str | None, aux: list[str], generic: dict[str, str]
    ) -> int:
        pool = "0.0.0.0/0" if pool_id == "calicnm:any" else pool_id.split(":")[1]
        v4: dict[str, Any] = {"AddressSpace": "CalicnmLocal", "Pool": pool}
        if gateway is not None:
            v4["Gateway"] = gateway
        if aux:
            v4["AuxAddresses"] = {f"a{i}": f"{a}/26" for i, a in enumerate(aux)}
        body = {
            "NetworkID": nid,
            "Options": {"com.docker.network.generic": generic},
            "IPv4Data": [v4],
            "IPv6Data": [],
        }
        return self.call("NetworkDriver.CreateNetwork", body)[0]

    @rule(
        data=st.data(),
        nid=st.sampled_from(NIDS),
        eid=st.sampled_from(EIDS),
        address=st.sampled_from([None, *ADDRESSES[:5]]),
        release_on_failure=st.booleans(),
    )
    def docker_run(
        self,
        data: st.DataObject,
        nid: str,
        eid: str,
        address: str | None,
        release_on_failure: bool,
    ) -> None:
        """RequestAddress, CreateEndpoint, Join; after a failure Docker
        releases what it holds (unless that call is left out)."""
        self.arm(data)
        pool_id = "calicnm:any"
        status, payload = self.call(
            "IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": address or ""}
        )
        if status != 200:
            return
        got = payload["Address"].split("/")[0]
        release = {"PoolID": pool_id, "Address": got}
        ids = {"NetworkID": nid, "EndpointID": eid}
        status, _ = self.call(
            "NetworkDriver.CreateEndpoint", {**ids, "Interface": {"Address": f"{got}/32"}}
        )
        if status != 200:
            if release_on_failure:
                self.call("IpamDriver.ReleaseAddress", release)
            return
        self.running[eid] = release
        status, _ = self.call("NetworkDriver.Join", {**ids, "SandboxKey": "/var/run/docker/a"})
        if status != 200 and release_on_failure:
            self.docker_rm_calls(nid, eid, leave=False, delete=True, release=True)

    @rule(
        data=st.data(),
        nid=st.sampled_from(NIDS),
        eid=st.sampled_from(EIDS),
        leave=st.booleans(),
        delete=st.booleans(),
        release=st.booleans(),
    )
    def docker_rm(
        self,
        data: st.DataObject,
        nid: str,
        eid: str,
        leave: bool,
        delete: bool,
        release: bool,
    ) -> None:
        """Leave, DeleteEndpoint, ReleaseAddress, any of them left out."""
        self.arm(data)
        self.docker_rm_calls(nid, eid, leave, delete, release)

    def docker_rm_calls(self, nid: str, eid: str, leave: bool, delete: bool, release: bool) -> None:
        ids = {"NetworkID": nid, "EndpointID": eid}
        if leave:
            self.call("NetworkDriver.Leave", ids)
        if delete:
            self.call("NetworkDriver.DeleteEndpoint", ids)
        if release and eid in self.running:
            self.call("IpamDriver.ReleaseAddress", self.running.pop(eid))

    @rule(
        data=st.data(),
        nid=st.sampled_from(NIDS),
        gateway=st.sampled_from(["10.0.0.1", "10.0.0.17", None]),
        aux=st.lists(st.sampled_from(["10.0.0.5", "10.0.0.6", "10.0.0.17"]), max_size=2),
        release_on_failure=st.booleans(),
    )
    def docker_network_create(
        self,
        data: st.DataObject,
        nid: str,
        gateway: str | None,
        aux: list[str],
        release_on_failure: bool,
    ) -> None:
        """RequestPool --subnet, the --gateway and --aux-address requests,
        CreateNetwork; after a failure Docker releases what it requested."""
        self.arm(data)
        status, payload = self.call("IpamDriver.RequestPool", {"Pool": "10.0.0.0/26"})
        if status != 200:
            return
        pool_id = payload["PoolID"]
        held = []
        if gateway:
            body = {"PoolID": pool_id, "Address": gateway, "Options": GATEWAY_REQUEST}
            if self.call("IpamDriver.RequestAddress", body)[0] == 200:
                held.append(gateway)
        for address in aux:
            body = {"PoolID": pool_id, "Address": address}
            if self.call("IpamDriver.RequestAddress", body)[0] == 200:
                held.append(address)
        gw = f"{gateway}/26" if gateway in held else "169.254.1.1/32"
        requested_aux = [a for a in aux if a in held]
        status = self.create_network_on(pool_id, nid, gw, requested_aux, {})
        if status == 200:
            self.reservations[nid] = (pool_id, held)
        elif release_on_failure:
            for address in held:
                self.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": address})

    @rule(data=st.data(), nid=st.sampled_from(NIDS), release=st.booleans())
    def docker_network_rm(self, data: st.DataObject, nid: str, release: bool) -> None:
        """DeleteNetwork, then Docker's releases of the gateway and aux
        addresses and of the pool (left out, or made)."""
        self.arm(data)
        self.call("NetworkDriver.DeleteNetwork", {"NetworkID": nid})
        pool_id, held = self.reservations.pop(nid, ("calicnm:any", []))
        if release:
            for address in held:
                self.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": address})
            self.call("IpamDriver.ReleasePool", {"PoolID": pool_id})

    # ---- hostile input --------------------------------------------------------------

    @rule(method=st.sampled_from(METHODS), raw=st.sampled_from(RAW))
    def hostile_raw(self, method: str, raw: bytes) -> None:
        self.call(method, raw=raw)

    @rule(
        method=st.sampled_from(METHODS),
        field=st.sampled_from(FIELDS),
        value=st.sampled_from(HOSTILE),
        nid=st.sampled_from(NIDS),
        eid=st.sampled_from(EIDS),
    )
    def hostile_field(self, method: str, field: str, value: Any, nid: str, eid: str) -> None:
        body: dict[str, Any] = {
            "PoolID": "calicnm:10.0.0.0/26",
            "NetworkID": nid,
            "EndpointID": eid,
            "Address": "10.0.0.2",
            "Interface": {"Address": "10.0.0.2/32"},
            "SandboxKey": "/var/run/docker/a",
            "IPv4Data": [{"Pool": "10.0.0.0/26", "Gateway": "10.0.0.1/26"}],
        }
        body[field] = value
        self.call(method, body)

    @rule(
        key=st.sampled_from(["Gateway", "AuxAddresses", "Pool", "AddressSpace"]),
        value=st.sampled_from([*HOSTILE, {"x": 7}, {"x": "10.0.0.5"}]),
    )
    def hostile_ipv4_data(self, key: str, value: Any) -> None:
        v4: dict[str, Any] = {"Pool": "10.0.0.0/26", "Gateway": "10.0.0.1/26", key: value}
        self.call("NetworkDriver.CreateNetwork", {"NetworkID": NIDS[0], "IPv4Data": [v4]})

    # ---- the world around ------------------------------------------------------------

    @rule(eid=st.sampled_from(EIDS))
    def a_veth_vanishes(self, eid: str) -> None:
        """The container's namespace died and took the veth pair with it."""
        self.remove_link(host_ifname(eid))

    # ---- what must hold after every step -------------------------------------------

    @invariant()
    def state_is_consistent(self) -> None:
        """One read of everything: records decode, blocks lie in pools, each
        address has one owner, records and veths agree."""
        state = self.settled_state()
        store = self.store_of(state)
        snapshot = records.read_snapshot(store)
        assert snapshot.invalid == {}
        held: dict[ipaddress.IPv4Address, str] = {}
        for kv in store.list(keys.BLOCKS):
            block = records.decode_block(kv)
            assert any(block.cidr.subnet_of(p.cidr) for p in snapshot.pools), block.cidr
            for ordinal, allocation in block.allocations.items():
                address = block.address(ordinal)
                assert address not in held, f"{address} held twice"
                held[address] = allocation.handle
        leaked = set(held) - self.docker_holds
        assert not leaked, f"allocated, but not held by Docker: {sorted(map(str, leaked))}"
        named: set[ipaddress.IPv4Address] = set()
        for endpoint in snapshot.endpoints:
            for address in endpoint.ipv4:
                assert address not in named, f"{address} in two endpoint records"
                named.add(address)
                assert held.get(address) == endpoint.id, (
                    f"endpoint {endpoint.id[:12]} names {address}, held by {held.get(address)}"
                )
        mine = [ep for ep in snapshot.endpoints if ep.host == self.host]
        recorded = {ep.interface for ep in mine} | {ep.peer for ep in mine}
        stray = sorted(set(state.links) - recorded)
        assert not stray, f"a veth without its record: {stray}"


class DriverMachine(DriverFuzz):
    """The generator over the Flask app, ``HookedStore`` and ``FakePlumbing``,
    with faults: etcd failing at a coming write (before it is applied, or
    after, losing the reply), the kernel refusing a veth, and the pending
    reaper on a clock the test moves."""

    def __init__(self) -> None:
        super().__init__()
        self.store = HookedStore()
        self.plumbing = FakePlumbing()
        self.ipam = Allocator(self.store, self.host, sleep=lambda s: None)
        for pool in POOLS:
            self.ipam.add_pool(pool)
        self.now = 1_700_000_000.0
        driver = Driver(self.store, self.ipam, self.plumbing, self.host, clock=lambda: self.now)
        self.client = build_app(driver).test_client()
        self.armed: tuple[int, str] | None = None
        self.fired = False
        self.kernel_failed = False

    def post(self, method: str, data: bytes) -> tuple[int, Any]:
        fired = self._arm_hooks()
        self.kernel_failed = self.plumbing.fail_create
        try:
            resp = self.client.post(f"/{method}", data=data)
        finally:
            self.store.before_write = self.store.after_write = None
            self.plumbing.fail_create = False
        self.fired = bool(fired)
        return resp.status_code, json.loads(resp.data)

    def read_state(self) -> State:
        links: dict[str, Any] = {}
        for plan in self.plumbing.links.values():
            links[plan.host_if] = links[plan.peer_if] = plan
        return State(self.store.contents(), links)

    def store_of(self, state: State) -> Store:
        return self.store  # what ``state`` was just read from

    def arm(self, data: st.DataObject) -> None:
        self.armed = data.draw(FAILURES, label="fail") or self.armed

    def failure_excused(self, method: str, status: int, err: str) -> bool:
        if status == 503:
            return self.fired
        if status == 500:
            return self.kernel_failed or "is missing" in err
        return False

    def remove_link(self, name: str) -> None:
        self.plumbing.links.pop(name, None)

    def _arm_hooks(self) -> list[bool]:
        """While a failure is armed, count the writes of this call: the one it
        names fails, before or after it is applied (the latter: the reply is
        lost), and the failure is spent.  Returns whether it fired here."""
        fired: list[bool] = []
        if self.armed is None:
            return fired

        def hook(keys_written: list[str]) -> None:
            if self.armed is None:
                return
            left, when = self.armed
            self.armed = (left - 1, when) if left > 1 else None
            if left == 1:
                fired.append(True)
                raise DatastoreUnavailable("etcd is unreachable: fuzz")

        if self.armed[1] == "before":
            self.store.before_write = hook
        else:
            self.store.after_write = hook
        return fired

    # ---- the world around, in memory ------------------------------------------------

    @rule(target_write=st.integers(1, 6), when=st.sampled_from(["before", "after"]))
    def etcd_fails_at_a_coming_write(self, target_write: int, when: str) -> None:
        """The n-th write the plugin makes from now fails (once)."""
        self.armed = (target_write, when)

    @rule()
    def the_kernel_refuses_a_veth_in_the_next_call(self) -> None:
        self.plumbing.fail_create = True

    @rule(seconds=st.sampled_from([1, 100, 10_000]))
    def the_reaper_runs(self, seconds: int) -> None:
        self.now += seconds
        freed = self.ipam.release_stale_pending(self.now, max_age=600)
        self.docker_holds -= set(freed)


DriverMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")),
    stateful_step_count=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_driver_fuzz = DriverMachine.TestCase
