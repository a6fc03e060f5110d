"""Datastore records: inert value objects with their JSON form.

Nothing here performs I/O.  Each record round-trips through ``to_json`` /
``from_json``; ``from_json`` raises ``InvalidRequest`` for a stored value it
cannot read, so a corrupt key is reported with its content instead of
crashing whoever reads it.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from calicnm.errors import InvalidRequest
from calicnm.validation import (
    check_bool,
    check_host_ip,
    check_hostname,
    check_id,
    check_int,
    check_mac,
    check_name,
    check_object,
    check_text,
)

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address

DEFAULT_BLOCK_PREFIX = 26
"""Host-affine blocks are /26 (64 addresses) unless a pool says otherwise."""

DEFAULT_POOL = IPv4Network("192.168.0.0/16")
"""Created at node start unless disabled, as Calico did."""


def _load(raw: str | bytes, what: str, known: tuple[str, ...]) -> dict[str, Any]:
    """A stored JSON object with only ``known`` fields; InvalidRequest else."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"stored {what} is not JSON: {raw!r:.80}") from exc
    return check_object(data, f"stored {what}", known)


def _required(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} is missing or not a string")
    return value


def _optional_name(value: object, what: str) -> str | None:
    return None if value is None else check_name(value, what)


def _endpoint_address(text: object) -> IPv4Address:
    if not isinstance(text, str) or not text.endswith("/32"):
        raise InvalidRequest(f"ipv4_nets entry {text!r} is not an a.b.c.d/32")
    addr = parse_address(text, "ipv4_nets entry")
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback or addr.is_link_local:
        raise InvalidRequest(f"ipv4_nets entry {text!r} cannot be a container address")
    return addr


GATEWAY_BASE = ipaddress.IPv4Address("169.254.1.1")
GATEWAY_LIMIT = 250
"""At most this many calicnm interfaces in one container (169.254.1.1-250)."""


def _gateway(text: object) -> IPv4Address:
    addr = parse_address(text if isinstance(text, str) else "", "gateway")
    if not 0 <= int(addr) - int(GATEWAY_BASE) < GATEWAY_LIMIT:
        raise InvalidRequest(f"gateway {text!r} is not one of calicnm's link-local gateways")
    return addr


def _dump(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def parse_network(text: str, what: str = "CIDR") -> IPv4Network:
    """Parse a strict IPv4 CIDR (host bits must be zero) or raise InvalidRequest."""
    if not isinstance(text, str) or not text.isascii():
        raise InvalidRequest(f"{what} {text!r} is not a valid network")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise InvalidRequest(f"{what} {text!r} is not a valid network: {exc}") from exc
    if not isinstance(net, IPv4Network):
        raise InvalidRequest(f"{what} {text!r}: IPv6 is not supported by calicnm yet")
    return net


def parse_address(text: str, what: str = "address") -> IPv4Address:
    """Parse an IPv4 address, accepting and ignoring a ``/prefix`` suffix."""
    if not isinstance(text, str) or not text.isascii():
        raise InvalidRequest(f"{what} {text!r} is not a valid IP address")
    bare = text.split("/", 1)[0].strip()
    try:
        addr = ipaddress.ip_address(bare)
    except ValueError as exc:
        raise InvalidRequest(f"{what} {text!r} is not a valid IP address") from exc
    if not isinstance(addr, IPv4Address):
        raise InvalidRequest(f"{what} {text!r}: IPv6 is not supported by calicnm yet")
    return addr


VXLAN_DEVICE = "vxlan.calicnm"
VXLAN_VNI = 4096
VXLAN_PORT = 4789
"""The VXLAN device, network id and port every host of a cluster agrees on."""

ANY_NETWORK = "0.0.0.0/0"
"""What Docker records as the pool of a network created without --subnet."""

POOL_FIELDS = ("cidr", "block_prefix", "nat_outgoing", "ipip", "vxlan", "disabled")
NETWORK_FIELDS = (
    "id",
    "options",
    "ipv4_pools",
    "ipv4_gateway",
    "docker_name",
    "profile",
    "internal",
)
ENDPOINT_FIELDS = (
    "id",
    "host",
    "network_id",
    "interface",
    "peer",
    "mac",
    "ipv4_nets",
    "sandbox",
    "gateway",
    "profiles",
)
NETWORK_OPTIONS = {
    "profile": "name of the profile (defaults to the Docker network name)",
    "mtu": "MTU of the container interfaces (576-9000)",
    "com.docker.network.driver.mtu": "same as mtu",
}
"""The ``-o`` options a calicnm network takes."""


@dataclass(frozen=True)
class Pool:
    """An operator-defined range that IPAM carves into host-affine blocks."""

    cidr: IPv4Network
    block_prefix: int = DEFAULT_BLOCK_PREFIX
    nat_outgoing: bool = False
    ipip: bool = False
    vxlan: bool = False
    disabled: bool = False

    def __post_init__(self) -> None:
        if self.cidr.prefixlen > self.block_prefix:
            raise InvalidRequest(
                f"pool {self.cidr} is smaller than one /{self.block_prefix} block; "
                f"an IPv4 pool must have a prefix length of {self.block_prefix} or lower"
            )
        if self.ipip and self.vxlan:
            raise InvalidRequest(f"pool {self.cidr}: choose --ipip or --vxlan, not both")

    @property
    def options(self) -> list[str]:
        flags = [
            ("ipip", self.ipip),
            ("vxlan", self.vxlan),
            ("nat-outgoing", self.nat_outgoing),
            ("disabled", self.disabled),
        ]
        return [name for name, on in flags if on]

    def blocks(self) -> list[IPv4Network]:
        return list(self.cidr.subnets(new_prefix=self.block_prefix))

    def to_json(self) -> str:
        return _dump(
            {
                "cidr": str(self.cidr),
                "block_prefix": self.block_prefix,
                "nat_outgoing": self.nat_outgoing,
                "ipip": self.ipip,
                "vxlan": self.vxlan,
                "disabled": self.disabled,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Pool:
        data = _load(raw, "pool", POOL_FIELDS)
        flags = {f: check_bool(data.get(f, False), f) for f in POOL_FIELDS[2:]}
        return cls(
            cidr=parse_network(_required(data, "cidr"), "pool cidr"),
            block_prefix=check_int(
                data.get("block_prefix", DEFAULT_BLOCK_PREFIX), "block_prefix", 20, 32
            ),
            **flags,
        )


@dataclass(frozen=True)
class Network:
    """What CreateNetwork carried, kept because Docker never sends it again.

    ``docker_name`` is learned after the fact (CreateNetwork does not carry
    the name); ``profile`` is set when the operator passed ``-o profile=NAME``.
    """

    id: str
    options: dict[str, str] = field(default_factory=dict)
    ipv4_pools: tuple[str, ...] = ()
    ipv4_gateway: str | None = None
    docker_name: str | None = None
    profile: str | None = None
    internal: bool = False

    @property
    def profile_name(self) -> str | None:
        """The profile that governs this network's endpoints, once known."""
        return self.profile or self.docker_name

    @property
    def subnets(self) -> list[IPv4Network]:
        """The operator's ``--subnet`` values (empty when calicnm chose)."""
        return [IPv4Network(p) for p in self.ipv4_pools if p != ANY_NETWORK]

    def to_json(self) -> str:
        return _dump(
            {
                "id": self.id,
                "options": self.options,
                "ipv4_pools": list(self.ipv4_pools),
                "ipv4_gateway": self.ipv4_gateway,
                "docker_name": self.docker_name,
                "profile": self.profile,
                "internal": self.internal,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Network:
        data = _load(raw, "network", NETWORK_FIELDS)
        options = check_object(data.get("options") or {}, "options", tuple(NETWORK_OPTIONS))
        pools = data.get("ipv4_pools") or []
        if not isinstance(pools, list) or len(pools) > 8:
            raise InvalidRequest("ipv4_pools must be a list of at most 8 CIDRs")
        gateway = data.get("ipv4_gateway")
        return cls(
            id=check_id(data.get("id"), "network id"),
            options={k: check_text(v, f"option {k}", 256) for k, v in options.items()},
            ipv4_pools=tuple(
                p if p == ANY_NETWORK else str(parse_network(p, "ipv4_pools entry"))
                for p in (check_text(p, "ipv4_pools entry", 64) for p in pools)
            ),
            ipv4_gateway=None if gateway is None else check_text(gateway, "ipv4_gateway", 64),
            docker_name=_optional_name(data.get("docker_name"), "docker_name"),
            profile=_optional_name(data.get("profile"), "profile"),
            internal=check_bool(data.get("internal", False), "internal"),
        )


@dataclass(frozen=True)
class Endpoint:
    """One container interface on one host.

    ``interface`` is the host side of the veth, ``peer`` the side Docker moves
    into the container.  ``sandbox`` and ``gateway`` are filled at Join: the
    gateway is a link-local next hop unique within the sandbox, so a
    container on several calicnm networks gets one connected route per
    interface instead of two clashing ones.
    """

    id: str
    host: str
    network_id: str
    interface: str
    peer: str
    mac: str
    ipv4: tuple[IPv4Address, ...]
    sandbox: str | None = None
    gateway: str | None = None
    profiles: tuple[str, ...] | None = None

    def to_json(self) -> str:
        return _dump(
            {
                "id": self.id,
                "host": self.host,
                "network_id": self.network_id,
                "interface": self.interface,
                "peer": self.peer,
                "mac": self.mac,
                "ipv4_nets": [f"{a}/32" for a in self.ipv4],
                "sandbox": self.sandbox,
                "gateway": self.gateway,
                "profiles": None if self.profiles is None else list(self.profiles),
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Endpoint:
        """Every field checked; the interface names must be the ones derived
        from the id (``records.decode_endpoint`` checks that, with the key)."""
        data = _load(raw, "endpoint", ENDPOINT_FIELDS)
        nets = data.get("ipv4_nets")
        if not isinstance(nets, list) or not 1 <= len(nets) <= 16:
            raise InvalidRequest("ipv4_nets must be a list of 1-16 addresses")
        profiles = data.get("profiles")
        if profiles is not None and (not isinstance(profiles, list) or len(profiles) > 64):
            raise InvalidRequest("profiles must be a list of at most 64 names")
        sandbox = data.get("sandbox")
        gateway = data.get("gateway")
        return cls(
            id=check_id(data.get("id"), "endpoint id"),
            host=check_hostname(data.get("host")),
            network_id=check_id(data.get("network_id"), "network id"),
            interface=check_text(data.get("interface"), "interface", 15),
            peer=check_text(data.get("peer"), "peer", 15),
            mac=check_mac(data.get("mac"), "mac"),
            ipv4=tuple(_endpoint_address(n) for n in nets),
            sandbox=None if sandbox is None else check_text(sandbox, "sandbox"),
            gateway=None if gateway is None else str(_gateway(gateway)),
            profiles=None
            if profiles is None
            else tuple(check_name(p, "profile name") for p in profiles),
        )


@dataclass(frozen=True)
class Host:
    """A node's registration: who it is and where other hosts reach it."""

    name: str
    ip: str | None
    as_num: int | None = None

    def to_json(self) -> str:
        return _dump({"name": self.name, "ip": self.ip, "as_num": self.as_num})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Host:
        data = _load(raw, "host", ("name", "ip", "as_num"))
        ip, as_num = data.get("ip"), data.get("as_num")
        return cls(
            name=check_hostname(data.get("name")),
            ip=None if ip is None else check_host_ip(ip),
            as_num=None if as_num is None else check_as(as_num),
        )


@dataclass(frozen=True)
class Liveness:
    """What a running node says of itself, on its etcd lease: the record
    exists exactly while the lease lives (see ``node.liveness``)."""

    host: str
    pid: int
    started: float
    """When the node started (Unix time)."""
    version: str

    def to_json(self) -> str:
        return _dump(
            {"host": self.host, "pid": self.pid, "started": self.started, "version": self.version}
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Liveness:
        data = _load(raw, "liveness", ("host", "pid", "started", "version"))
        pid, started = data.get("pid"), data.get("started")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
            raise InvalidRequest(f"pid {pid!r} is not a process id")
        if not isinstance(started, int | float) or isinstance(started, bool):
            raise InvalidRequest(f"started {started!r} is not a time")
        return cls(
            host=check_hostname(data.get("host")),
            pid=pid,
            started=float(started),
            version=check_text(data.get("version", ""), "version", 64),
        )


def effective_profiles(endpoint: Endpoint, network: Network | None) -> tuple[str, ...]:
    """The profiles that govern ``endpoint``: its own list when the operator
    set one, else its network's profile (none while that name is unknown,
    which denies all traffic: fail closed)."""
    if endpoint.profiles is not None:
        return endpoint.profiles
    if network is not None and network.profile_name:
        return (network.profile_name,)
    return ()


# ---- BGP ----------------------------------------------------------------

DEFAULT_AS = 64511
"""Calico's default AS for every node that has none of its own."""


def check_as(value: object) -> int:
    """An AS number, given as an integer or as decimal digits."""
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    if not (text.isascii() and text.isdigit()):
        raise InvalidRequest(f"AS number {value!r} is not a number")
    number = int(text)
    if not 1 <= number <= 4294967295:
        raise InvalidRequest(f"AS number {number} is outside 1-4294967295")
    return number


@dataclass(frozen=True)
class BgpConfig:
    """Global settings: ``/calicnm/v1/bgp/config``.

    ``password`` is the TCP MD5 secret every session uses (None: none);
    ``ttl_security`` turns on GTSM (RFC 5082) for the sessions between hosts.
    """

    node_mesh: bool = True
    as_num: int = DEFAULT_AS
    password: str | None = None
    ttl_security: bool = False

    def to_json(self) -> str:
        return _dump(
            {
                "node_mesh": self.node_mesh,
                "as_num": self.as_num,
                "password": self.password,
                "ttl_security": self.ttl_security,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes | None) -> BgpConfig:
        if not raw:
            return cls()
        data = _load(raw, "BGP config", ("node_mesh", "as_num", "password", "ttl_security"))
        password = data.get("password")
        return cls(
            node_mesh=check_bool(data.get("node_mesh", True), "node_mesh"),
            as_num=check_as(data.get("as_num", DEFAULT_AS)),
            password=None if password is None else check_bgp_password(password),
            ttl_security=check_bool(data.get("ttl_security", False), "ttl_security"),
        )


def check_bgp_password(value: object) -> str:
    """A TCP MD5 secret BIRD can quote: 1-80 printable ASCII characters
    without quotes or backslashes."""
    ok = (
        isinstance(value, str)
        and 1 <= len(value) <= 80
        and value.isascii()
        and value.isprintable()
        and not any(c in value for c in '"\\')
    )
    if not ok:
        raise InvalidRequest(
            "a BGP password must be 1-80 printable ASCII characters without quotes or backslashes"
        )
    return str(value)


@dataclass(frozen=True)
class Peer:
    ip: str
    as_num: int

    def to_json(self) -> str:
        return _dump({"ip": self.ip, "as_num": self.as_num})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Peer:
        data = _load(raw, "BGP peer", ("ip", "as_num"))
        return cls(check_host_ip(data.get("ip"), "peer address"), check_as(data.get("as_num")))

    @classmethod
    def parse(cls, ip: str, as_num: str) -> Peer:
        return cls(check_host_ip(ip, "peer address"), check_as(as_num))


CLUSTER_NETWORK_FIELDS = ("name", "subnet", "ip_range", "profile", "internal")


@dataclass(frozen=True)
class ClusterNetwork:
    """A Docker network defined once for the cluster (``calicnm network
    create``): every node creates it, with these settings, on its own
    Docker.  ``name`` is the Docker network's name, and so its profile's
    unless ``profile`` names another."""

    name: str
    subnet: IPv4Network | None = None
    ip_range: IPv4Network | None = None
    profile: str | None = None
    internal: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "network name")
        if self.ip_range is not None and (
            self.subnet is None or not self.ip_range.subnet_of(self.subnet)
        ):
            raise InvalidRequest(f"--ip-range {self.ip_range} must lie inside --subnet")

    def to_json(self) -> str:
        return _dump(
            {
                "name": self.name,
                "subnet": None if self.subnet is None else str(self.subnet),
                "ip_range": None if self.ip_range is None else str(self.ip_range),
                "profile": self.profile,
                "internal": self.internal,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> ClusterNetwork:
        data = _load(raw, "cluster network", CLUSTER_NETWORK_FIELDS)

        def cidr(name: str) -> IPv4Network | None:
            value = data.get(name)
            return None if value is None else parse_network(check_text(value, name, 64), name)

        return cls(
            name=check_name(data.get("name"), "network name"),
            subnet=cidr("subnet"),
            ip_range=cidr("ip_range"),
            profile=_optional_name(data.get("profile"), "profile"),
            internal=check_bool(data.get("internal", False), "internal"),
        )


HOST_NETWORK_STATES = ("present", "in-use", "problem")


@dataclass(frozen=True)
class HostNetworkState:
    """One node's report on one cluster network: its Docker has it
    (``present``), keeps it because containers use it after its definition
    was removed (``in-use``), or cannot make it (``problem``, with why)."""

    name: str
    host: str
    state: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.state not in HOST_NETWORK_STATES:
            raise InvalidRequest(f"state {self.state!r} is not one of {HOST_NETWORK_STATES}")

    def to_json(self) -> str:
        return _dump(
            {"name": self.name, "host": self.host, "state": self.state, "detail": self.detail}
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> HostNetworkState:
        data = _load(raw, "host network state", ("name", "host", "state", "detail"))
        return cls(
            name=check_name(data.get("name"), "network name"),
            host=check_hostname(data.get("host"), "host"),
            state=check_text(data.get("state"), "state", 16),
            detail=check_text(data.get("detail", ""), "detail", 512),
        )
