"""The libnetwork driver: Docker's NetworkDriver and IpamDriver calls.

Each method takes the decoded JSON body of one call and returns the JSON
object to send back; it raises a ``CalicnmError`` for anything that fails.
HTTP is not known here (``plugin_api`` is the web layer), which keeps the
whole protocol testable without a server.

State lives in etcd only, never in this process: Docker does not repeat a
handshake or a CreateNetwork after a plugin restart, so every call must be
answerable from the datastore alone.

A refusal (400, 404, 409) changes nothing: every check that can refuse a
call runs before its first write.

Ordering for "nothing half-made": CreateEndpoint builds the veth, writes the
endpoint record (the agent acts on the record and must find the interface
in place), then claims the address for the endpoint.  Any failure after the
veth exists deletes the record and the veth again (each attempted even if
the other fails), and Docker then releases the address.  DeleteEndpoint
removes the veth before the record, so a failure leaves a record that a
retry, or ReleaseAddress, can finish.

Who holds an address (its IPAM handle, see ``calicnm.ipam``):
- RequestAddress (a container's, an ``--aux-address``, or a ``--gateway``
  with kind "gateway") allocates it to ``docker-pending:<unix seconds>:<nonce>``:
  Docker asked, nobody claimed it yet.  ``Allocator.release_stale_pending``
  frees such addresses once they are old (a lost reply, a replayed request).
- CreateEndpoint claims it for the endpoint id (from a pending handle, or
  free; any other holder is a 409).
- RequestAddress carries only the PoolID, not the network, so a network's
  reservations are bound at CreateNetwork, which carries each subnet's
  ``Gateway`` and ``AuxAddresses`` in IPv4Data: the gateway becomes
  ``gateway:<network id>`` (kind gateway), each aux address
  ``aux:<network id>`` (kind aux).  Addresses outside every calicnm pool
  (the link-local 169.254.1.1 calicnm gives as gateway) are not reserved.
  DeleteNetwork frees both, and the legacy ``gateway:<address>`` of the
  network's gateway; Docker's own ReleaseAddress for them afterwards finds
  them free, which is not an error.
- ReleaseAddress refuses (409, naming the endpoint) while an endpoint record
  of this host names the address and the endpoint's host interface exists:
  the endpoint is live.  If the interface is gone, the record is what an
  interrupted DeleteEndpoint left: ReleaseAddress deletes it (compared on
  its revision) and frees the address.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

from calicnm import faults
from calicnm.blocks import KIND_AUX, KIND_ENDPOINT, KIND_GATEWAY, Allocation
from calicnm.endpoint import (
    LinkPlan,
    choose_gateway,
    derive_mac,
    join_response,
    plan_link,
)
from calicnm.errors import (
    CalicnmError,
    Conflict,
    DataplaneError,
    InvalidRequest,
    NotFound,
    Unsupported,
)
from calicnm.ipam import (
    PENDING,
    Allocator,
    PoolRef,
    aux_handle,
    gateway_handle,
    is_pending,
    pending_handle,
)
from calicnm.model import (
    NETWORK_OPTIONS,
    Endpoint,
    IPv4Address,
    IPv4Network,
    Network,
    parse_address,
    parse_network,
)
from calicnm.routing.encap import overhead
from calicnm.store import keys, records
from calicnm.store.edits import ensure_profile, update_endpoint, write_endpoint
from calicnm.store.kv import Store, create, delete_if
from calicnm.validation import check_id, check_mac, check_name, check_text

_log = logging.getLogger(__name__)

LOCAL_ADDRESS_SPACE = "CalicnmLocal"
GLOBAL_ADDRESS_SPACE = "CalicnmGlobal"
GATEWAY_OPTION = "com.docker.network.gateway"
REQUEST_TYPE_OPTION = "RequestAddressType"
GENERIC_OPTIONS = "com.docker.network.generic"
JOIN_WAIT_SECONDS = 10.0
"""How long Join waits for the agent to program a new endpoint."""
PENDING_HANDLE = PENDING
"""Prefix of the owner of an address Docker asked for but no endpoint or
network has claimed yet (``ipam.pending_handle``); alone, the legacy owner."""
MAX_IPV4_DATA = 8
"""Most IPv4Data entries (subnets) one network may have, as its record allows."""


def _obj(body: Any, what: str = "request body") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    return body


def _str(body: dict[str, Any], key: str, required: bool = True) -> str:
    value = body.get(key)
    if value is None or value == "":
        if required:
            raise InvalidRequest(f"{key} is required")
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a string")
    return value


def _opt_dict(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{key} must be a JSON object")
    return value


def parse_network_options(generic: dict[str, Any]) -> tuple[str | None, int | None]:
    """Validate ``-o`` options: returns (profile, mtu)."""
    unknown = sorted(set(generic) - set(NETWORK_OPTIONS))
    if unknown:
        known = ", ".join(k for k in NETWORK_OPTIONS if not k.startswith("com."))
        raise InvalidRequest(
            f"unknown network option(s) {', '.join(unknown)}; calicnm takes: {known}"
        )
    profile = generic.get("profile")
    if profile is not None:
        profile = check_name(str(profile), "-o profile")
    mtus = [_parse_mtu(generic[key]) for key in MTU_OPTIONS if key in generic]
    return profile, (mtus[0] if mtus else None)


MTU_OPTIONS = ("mtu", "com.docker.network.driver.mtu")
"""The options that set the MTU; "mtu" wins when both are given."""


def _parse_mtu(value: object) -> int:
    text = str(value).strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 5):
        raise InvalidRequest(f"-o mtu={value!r} is not a number")
    mtu = int(text)
    if not 576 <= mtu <= 9000:
        raise InvalidRequest(f"-o mtu={mtu} is outside 576-9000")
    return mtu


class Plumbing(Protocol):
    """What the driver needs from the kernel side (``host.netlink.HostPlumbing``)."""

    def create(self, plan: LinkPlan) -> None: ...

    def remove(self, host_if: str, peer_if: str | None = None) -> bool: ...

    def exists(self, ifname: str) -> bool: ...


class Driver:
    def __init__(
        self,
        store: Store,
        ipam: Allocator,
        plumbing: Plumbing,
        host: str,
        programmed: Callable[[str], bool] | None = None,
        agent_problem: Callable[[], str | None] | None = None,
        join_wait: float = JOIN_WAIT_SECONDS,
        clock: Callable[[], float] = time.time,
        in_flight: Callable[[str], contextlib.AbstractContextManager[None]] | None = None,
    ) -> None:
        """``programmed(endpoint_id)`` says whether the agent has programmed an
        endpoint, and ``agent_problem()`` why the agent is not healthy (None
        when it is).  Join refuses while the agent is not healthy, and waits
        at most ``join_wait`` seconds for the endpoint to be programmed.
        ``clock`` (unix seconds) stamps pending address handles.
        ``in_flight(id)`` marks an endpoint or network id while CreateNetwork,
        CreateEndpoint or DeleteEndpoint works on it (``host.markers.InFlight``),
        so the ownership collector leaves its half-made state alone."""
        self._store = store
        self._ipam = ipam
        self._plumbing = plumbing
        self._host = host
        self._programmed = programmed
        self._agent_problem = agent_problem
        self._join_wait = join_wait
        self._clock = clock
        self._in_flight = in_flight or (lambda _ident: contextlib.nullcontext())

    # ---- handshake -------------------------------------------------------

    def activate(self, body: Any) -> dict[str, Any]:
        return {"Implements": ["NetworkDriver", "IpamDriver"]}

    def network_capabilities(self, body: Any) -> dict[str, Any]:
        # Local scope: each host's dockerd owns its own network object and
        # etcd (not Docker's cluster store) is what makes hosts agree.
        return {"Scope": "local", "ConnectivityScope": "local"}

    def ipam_capabilities(self, body: Any) -> dict[str, Any]:
        # Allocations persist in etcd, so Docker need not replay requests.
        return {"RequiresMACAddress": False, "RequiresRequestReplay": False}

    def default_address_spaces(self, body: Any) -> dict[str, Any]:
        return {
            "LocalDefaultAddressSpace": LOCAL_ADDRESS_SPACE,
            "GlobalDefaultAddressSpace": GLOBAL_ADDRESS_SPACE,
        }

    # ---- IPAM ------------------------------------------------------------

    def request_pool(self, body: Any) -> dict[str, Any]:
        req = _obj(body)
        if req.get("V6"):
            raise Unsupported(
                "calicnm does not support IPv6 yet; create the network without --ipv6"
            )
        opts = _opt_dict(req, "Options")
        if opts:
            raise InvalidRequest(
                f"unknown --ipam-opt {', '.join(sorted(opts))}; calicnm IPAM takes no options "
                "(choose addresses with --subnet and --ip-range)"
            )
        pool_text = _str(req, "Pool", required=False)
        sub_text = _str(req, "SubPool", required=False)
        subnet = parse_network(pool_text, "--subnet") if pool_text else None
        ip_range = parse_network(sub_text, "--ip-range") if sub_text else None
        ref = self._ipam.request_pool(subnet, ip_range)
        _log.info("pool requested pool_id=%s", ref.pool_id)
        return {
            "PoolID": ref.pool_id,
            "Pool": ref.docker_pool,
            # Containers route through a link-local gateway, so that is the
            # honest network gateway, and Docker then allocates none.
            "Data": {GATEWAY_OPTION: "169.254.1.1/32"},
        }

    def release_pool(self, body: Any) -> dict[str, Any]:
        req = _obj(body)
        PoolRef.parse(req.get("PoolID"))  # nothing is reference-counted
        return {}

    def request_address(self, body: Any) -> dict[str, Any]:
        req = _obj(body)
        ref = PoolRef.parse(req.get("PoolID"))
        address_text = _str(req, "Address", required=False)
        opts = _opt_dict(req, "Options")
        is_gateway = opts.get(REQUEST_TYPE_OPTION) == GATEWAY_OPTION
        address = parse_address(address_text) if address_text else None
        handle = pending_handle(self._clock(), secrets.token_hex(4))
        if is_gateway:
            if address is None:
                return {"Address": "169.254.1.1/32", "Data": {}}
            # An operator's --gateway: hold it so no container gets it.
            # CreateNetwork binds it to the network.
            self._ipam.assign(ref, handle, kind=KIND_GATEWAY, address=address)
            prefix = ref.subnet.prefixlen if ref.subnet else 32
            return {"Address": f"{address}/{prefix}", "Data": {}}
        exclude: tuple[IPv4Network, ...] = ()
        if ref.subnet is None and address is None:
            exclude = tuple(net for n in self.networks() for net in n.subnets)
        got = self._ipam.assign(ref, handle, address=address, exclude=exclude)
        return {"Address": f"{got}/32", "Data": {}}

    def _remove_dead_holders(self, address: IPv4Address) -> int:
        """Delete this host's endpoint records that hold ``address`` but whose
        host interface is gone; how many.  CreateEndpoint makes the veth
        before the record, so such a record is the remains of a container
        whose network namespace died while DeleteEndpoint could not reach
        the plugin.  Conflict if a holder's interface still exists (a live
        endpoint), or a record changed meanwhile."""
        holders = []
        for _parts, kv in records.endpoint_kvs(self._store, self._host):
            try:
                endpoint = records.decode_endpoint(kv)
            except InvalidRequest:
                continue
            if address in endpoint.ipv4:
                holders.append((kv, endpoint))
        for _kv, endpoint in holders:
            if self._plumbing.exists(endpoint.interface):
                raise Conflict(
                    f"address {address} is still held by endpoint {endpoint.id[:12]} "
                    f"(interface {endpoint.interface}) on host {self._host}; "
                    "delete the endpoint first"
                )
        for kv, endpoint in holders:
            if not delete_if(self._store, kv.key, kv.revision):
                raise Conflict(
                    f"endpoint {endpoint.id[:12]} changed while address {address} was being "
                    "released; try again"
                )
            _log.warning(
                "endpoint record removed: endpoint=%s ip=%s (its interface %s is gone)",
                endpoint.id[:12],
                address,
                endpoint.interface,
            )
        return len(holders)

    def release_address(self, body: Any) -> dict[str, Any]:
        """Free an address, unless a live endpoint of this host still holds
        it (409 naming it).  A record whose host interface is gone is the
        remains of an interrupted DeleteEndpoint: it is deleted first."""
        req = _obj(body)
        PoolRef.parse(req.get("PoolID"))
        address = parse_address(_str(req, "Address"))
        self._remove_dead_holders(address)
        self._ipam.release(address)
        return {}

    # ---- networks --------------------------------------------------------

    def create_network(self, body: Any) -> dict[str, Any]:
        req = _obj(body)
        network_id = check_id(req.get("NetworkID"), "NetworkID")
        options = _opt_dict(req, "Options")
        generic = options.get(GENERIC_OPTIONS) or {}
        if not isinstance(generic, dict):
            raise InvalidRequest(f"Options.{GENERIC_OPTIONS} must be a JSON object")
        profile, _mtu = parse_network_options(generic)
        if req.get("IPv6Data"):
            raise Unsupported("calicnm does not support IPv6 yet")
        v4 = req.get("IPv4Data") or []
        if not isinstance(v4, list) or not all(isinstance(d, dict) for d in v4):
            raise InvalidRequest("IPv4Data must be a list of objects")
        if len(v4) > MAX_IPV4_DATA:
            raise InvalidRequest(f"IPv4Data has more than {MAX_IPV4_DATA} subnets")
        pools = []
        gateways: list[str | None] = []
        aux: list[IPv4Address] = []
        for data in v4:
            space = data.get("AddressSpace") or ""
            if space and space not in (LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE):
                raise InvalidRequest(
                    "calicnm networks need calicnm IPAM: add --ipam-driver calicnm"
                )
            pool = _str(data, "Pool")
            if pool != "0.0.0.0/0":
                parse_network(pool, "IPv4Data.Pool")
            pools.append(pool)
            gateways.append(_gateway(data))
            aux += _aux_addresses(data)
        gateway = gateways[0] if gateways else None
        network = Network(
            id=network_id,
            # As validated: an MTU is stored as the number it was read as.
            options={
                str(k): str(_parse_mtu(v)) if k in MTU_OPTIONS else str(v)
                for k, v in generic.items()
            },
            ipv4_pools=tuple(pools),
            ipv4_gateway=gateway,
            profile=profile,
            internal=bool(options.get("com.docker.network.internal", False)),
        )
        existing = records.network(self._store, network_id)
        if existing is not None and existing.ipv4_pools != network.ipv4_pools:
            raise InvalidRequest(f"network {network_id[:12]} already exists with other pools")
        # Bind the reservations Docker requested for this network to it; all
        # are checked before the first is written, so a refusal writes nothing.
        reservations = [
            (parse_address(gw), gateway_handle(network_id), KIND_GATEWAY, _takes_gateway(gw))
            for gw in gateways
            if gw is not None
        ]
        reservations += [(a, aux_handle(network_id), KIND_AUX, _takes_pending) for a in aux]
        reservations = [r for r in reservations if self._ipam.pool_of(r[0]) is not None]
        addresses = [r[0] for r in reservations]
        if twice := sorted({str(a) for a in addresses if addresses.count(a) > 1}):
            raise InvalidRequest(f"address(es) {', '.join(twice)} reserved twice (gateway/aux)")
        for address, handle, _kind, takes_over in reservations:
            self._ipam.check_claim(address, handle, takes_over)
        with self._in_flight(network_id):  # reservations bound before the record exists
            for address, handle, kind, takes_over in reservations:
                self._ipam.claim(address, handle, kind, takes_over)
            if not create(self._store, keys.network(network_id), network.to_json()):
                existing = self.network(network_id)
                if existing.ipv4_pools != network.ipv4_pools:
                    raise InvalidRequest(
                        f"network {network_id[:12]} already exists with other pools"
                    )
        if profile:
            ensure_profile(self._store, profile)
        _log.info(
            "network created network=%s pools=%s profile=%s reserved=%s",
            network_id[:12],
            ",".join(pools),
            profile or "-",
            ",".join(str(r[0]) for r in reservations) or "-",
        )
        return {}

    def delete_network(self, body: Any) -> dict[str, Any]:
        """Free the network's gateway and aux reservations, then delete its
        record (both idempotent)."""
        req = _obj(body)
        network_id = check_id(req.get("NetworkID"), "NetworkID")
        try:
            network = records.network(self._store, network_id)
        except InvalidRequest:
            network = None  # unreadable: free by handle across every block
        handles = {gateway_handle(network_id), aux_handle(network_id)}
        if network is not None and network.ipv4_gateway:
            with contextlib.suppress(InvalidRequest):  # legacy handle
                handles.add(f"gateway:{parse_address(network.ipv4_gateway)}")
        freed = self._ipam.release_handles(handles)
        self._store.delete(keys.network(network_id))
        _log.info(
            "network deleted network=%s freed=%s",
            network_id[:12],
            ",".join(map(str, freed)) or "-",
        )
        return {}

    def allocate_network(self, body: Any) -> dict[str, Any]:
        req = _obj(body)
        check_id(req.get("NetworkID"), "NetworkID")
        return {"Options": _opt_dict(req, "Options")}

    def free_network(self, body: Any) -> dict[str, Any]:
        check_id(_obj(body).get("NetworkID"), "NetworkID")
        return {}

    def gw_alloc_check(self, body: Any) -> dict[str, Any]:
        return {"SkipIPv4": True, "SkipIPv6": True}

    def networks(self) -> list[Network]:
        return list(records.networks(self._store).values())

    def network(self, network_id: str) -> Network:
        network = records.network(self._store, network_id)
        if network is None:
            raise NotFound(f"network {network_id[:12]} is not a calicnm network")
        return network

    # ---- endpoints -------------------------------------------------------

    def create_endpoint(self, body: Any) -> dict[str, Any]:
        req = _obj(body)
        network_id = check_id(req.get("NetworkID"), "NetworkID")
        endpoint_id = check_id(req.get("EndpointID"), "EndpointID")
        iface = _opt_dict(req, "Interface")
        if _str(iface, "AddressIPv6", required=False):
            raise Unsupported("calicnm does not support IPv6 yet")
        address = parse_address(_str(iface, "Address"), "Interface.Address")
        given_mac = _str(iface, "MacAddress", required=False)
        mac = check_mac(given_mac) if given_mac else derive_mac(endpoint_id)
        network = self.network(network_id)
        # Refuse an address someone else holds before anything is made.
        self._ipam.check_claim(address, endpoint_id, _takes_request)
        _profile, mtu = parse_network_options(network.options)
        plan = plan_link(endpoint_id, mac, (address,))
        if not mtu and (extra := overhead(self._ipam.pool_of(address))):
            # Leave room for the tunnel header, so large transfers never need
            # fragmenting (or die to a lost "fragmentation needed").
            mtu = plan.mtu - extra
        if mtu:
            plan = dataclasses.replace(plan, mtu=mtu)
        endpoint = Endpoint(
            id=endpoint_id,
            host=self._host,
            network_id=network_id,
            interface=plan.host_if,
            peer=plan.peer_if,
            mac=mac,
            ipv4=(address,),
        )
        key = keys.endpoint(self._host, endpoint_id)
        # The veth first, then the record (the agent acts on the record and
        # must find the interface in place), then the address's owner.  A
        # failure anywhere after the veth may exist takes the record and the
        # veth away again, and Docker releases the address.
        with self._in_flight(endpoint_id):
            try:
                self._plumbing.create(plan)
                faults.point("after-veth")
                write_endpoint(self._store, key, endpoint)
                faults.point("after-record")
                self._ipam.claim(address, endpoint_id, KIND_ENDPOINT, _takes_request)
                faults.point("after-set-handle")
            except Exception:  # whatever failed, nothing may stay half-made
                self._undo_create(key, plan)
                raise
        _log.info(
            "endpoint created network=%s endpoint=%s ip=%s if=%s",
            network_id[:12],
            endpoint_id[:12],
            address,
            plan.host_if,
        )
        return {} if given_mac else {"Interface": {"MacAddress": mac}}

    def _undo_create(self, key: str, plan: LinkPlan) -> None:
        """Delete the record, then the veth, of a CreateEndpoint that failed;
        each is tried whatever happens to the other.  A record left behind
        (etcd down) has no veth, so ReleaseAddress or a retried
        DeleteEndpoint removes it."""
        try:
            self._store.delete(key)
        except CalicnmError as exc:
            _log.error("failed endpoint record %s could not be deleted: %s", key, exc)
        try:
            self._plumbing.remove(plan.host_if, plan.peer_if)
        except CalicnmError as exc:
            _log.error("failed endpoint's veth %s could not be removed: %s", plan.host_if, exc)

    def endpoint(self, endpoint_id: str) -> Endpoint:
        found = records.endpoint(self._store, self._host, endpoint_id)
        if found is None:
            raise NotFound(f"endpoint {endpoint_id[:12]} does not exist on host {self._host}")
        return found[1]

    def endpoint_oper_info(self, body: Any) -> dict[str, Any]:
        req = _obj(body)
        endpoint = self.endpoint(check_id(req.get("EndpointID"), "EndpointID"))
        return {"Value": {"HostInterface": endpoint.interface, "MacAddress": endpoint.mac}}

    def delete_endpoint(self, body: Any) -> dict[str, Any]:
        req = _obj(body)
        endpoint_id = check_id(req.get("EndpointID"), "EndpointID")
        plan = plan_link(endpoint_id, "", ())
        with self._in_flight(endpoint_id):
            self._plumbing.remove(plan.host_if, plan.peer_if)
            faults.point("after-veth-removal")
            faults.point("before-record-delete")
            self._store.delete(keys.endpoint(self._host, endpoint_id))
        _log.info("endpoint deleted endpoint=%s", endpoint_id[:12])
        return {}

    def join(self, body: Any) -> dict[str, Any]:
        req = _obj(body)
        network_id = check_id(req.get("NetworkID"), "NetworkID")
        endpoint_id = check_id(req.get("EndpointID"), "EndpointID")
        sandbox = check_text(_str(req, "SandboxKey"), "SandboxKey")
        endpoint = self.endpoint(endpoint_id)
        network = self.network(network_id)
        problem = self._agent_problem() if self._agent_problem is not None else None
        if problem is not None:
            raise DataplaneError(
                f"refusing to start a container without its policy: the calicnm agent on "
                f"host {self._host} is not healthy ({problem})"
            )
        if not self._plumbing.exists(endpoint.peer):
            raise DataplaneError(
                f"interface {endpoint.peer} of endpoint {endpoint_id[:12]} is missing; "
                "reconnect the container"
            )
        in_use = {
            ep.gateway
            for ep in self.local_endpoints()
            if ep.sandbox == sandbox and ep.id != endpoint_id and ep.gateway
        }
        gateway = choose_gateway(in_use)
        update_endpoint(
            self._store,
            keys.endpoint(self._host, endpoint_id),
            lambda current: dataclasses.replace(current, sandbox=sandbox, gateway=gateway),
            f"Endpoint {endpoint_id[:12]}",
        )
        faults.point("after-join-write")
        self._await_programmed(endpoint_id)
        _log.info(
            "endpoint joined network=%s endpoint=%s gateway=%s",
            network_id[:12],
            endpoint_id[:12],
            gateway,
        )
        return join_response(endpoint.peer, gateway, _subnets(network))

    def _await_programmed(self, endpoint_id: str) -> None:
        """Wait, bounded, until the agent has routed the endpoint and
        programmed its policy, so the container starts with both in place.
        On timeout Join fails (DataplaneError): Docker then removes the
        endpoint and the container does not start without its policy."""
        if self._programmed is None:
            return
        deadline = time.monotonic() + self._join_wait
        while not self._programmed(endpoint_id):
            if time.monotonic() >= deadline:
                raise DataplaneError(
                    f"endpoint {endpoint_id[:12]} was not programmed by the calicnm agent "
                    f"within {self._join_wait:.0f}s; refusing to start the container without "
                    "its policy (see 'calicnm status')"
                )
            time.sleep(0.01)

    def leave(self, body: Any) -> dict[str, Any]:
        req = _obj(body)
        endpoint_id = check_id(req.get("EndpointID"), "EndpointID")
        with contextlib.suppress(NotFound):  # already gone: leaving is done
            update_endpoint(
                self._store,
                keys.endpoint(self._host, endpoint_id),
                lambda current: dataclasses.replace(current, sandbox=None, gateway=None),
                f"Endpoint {endpoint_id[:12]}",
            )
        _log.info("endpoint left endpoint=%s", endpoint_id[:12])
        return {}

    def no_op(self, body: Any) -> dict[str, Any]:
        return {}

    def local_endpoints(self) -> list[Endpoint]:
        return records.endpoints(self._store, self._host)


def _subnets(network: Network) -> list[IPv4Network]:
    return network.subnets


def _takes_request(held: Allocation) -> bool:
    """An endpoint takes its address over from a pending container request."""
    return is_pending(held.handle) and held.kind == KIND_ENDPOINT


def _takes_pending(held: Allocation) -> bool:
    """A network takes an aux address over from any pending request."""
    return is_pending(held.handle)


def _takes_gateway(gateway: str) -> Callable[[Allocation], bool]:
    """A network takes its gateway over from a pending request, or from the
    legacy handle ``gateway:<address>`` of releases before networks were named."""
    legacy = f"gateway:{parse_address(gateway)}"
    return lambda held: is_pending(held.handle) or held.handle == legacy


def _gateway(data: dict[str, Any]) -> str | None:
    """An IPv4Data entry's Gateway (a CIDR such as 10.0.0.1/24), or None."""
    text = data.get("Gateway")
    if text is None or text == "":
        return None
    text = check_text(text, "IPv4Data.Gateway", 64)
    parse_address(text, "IPv4Data.Gateway")
    return text


def _aux_addresses(data: dict[str, Any]) -> list[IPv4Address]:
    """An IPv4Data entry's AuxAddresses ({"name": "10.0.0.5/24"}), parsed."""
    aux = _opt_dict(data, "AuxAddresses")
    return [
        parse_address(check_text(v, "AuxAddresses entry", 64), "aux address") for v in aux.values()
    ]
