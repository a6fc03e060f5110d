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

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address

DEFAULT_BLOCK_PREFIX = 26
"""Host-affine blocks are /26 (64 addresses) unless a pool says otherwise."""

DEFAULT_POOL = IPv4Network("192.168.0.0/16")
"""Created at node start unless disabled, as Calico did."""


def _load(raw: str | bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"stored {what} is not JSON: {raw!r:.80}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest(f"stored {what} is not a JSON object: {raw!r:.80}")
    return data


def _dump(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def parse_network(text: str, what: str = "CIDR") -> IPv4Network:
    """Parse a strict IPv4 CIDR (host bits must be zero) or raise InvalidRequest."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise InvalidRequest(f"{what} {text!r} is not a valid network: {exc}") from exc
    if not isinstance(net, IPv4Network):
        raise InvalidRequest(f"{what} {text!r}: IPv6 is not supported by calicnm yet")
    return net


def parse_address(text: str, what: str = "address") -> IPv4Address:
    """Parse an IPv4 address, accepting and ignoring a ``/prefix`` suffix."""
    bare = text.split("/", 1)[0].strip()
    try:
        addr = ipaddress.ip_address(bare)
    except ValueError as exc:
        raise InvalidRequest(f"{what} {text!r} is not a valid IP address") from exc
    if not isinstance(addr, IPv4Address):
        raise InvalidRequest(f"{what} {text!r}: IPv6 is not supported by calicnm yet")
    return addr


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
        data = _load(raw, "pool")
        try:
            return cls(
                cidr=IPv4Network(data["cidr"]),
                block_prefix=int(data.get("block_prefix", DEFAULT_BLOCK_PREFIX)),
                nat_outgoing=bool(data.get("nat_outgoing", False)),
                ipip=bool(data.get("ipip", False)),
                vxlan=bool(data.get("vxlan", False)),
                disabled=bool(data.get("disabled", False)),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidRequest(f"stored pool is malformed: {raw!r:.80}") from exc


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
        return [IPv4Network(p) for p in self.ipv4_pools if p != "0.0.0.0/0"]

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
        data = _load(raw, "network")
        try:
            return cls(
                id=str(data["id"]),
                options={str(k): str(v) for k, v in (data.get("options") or {}).items()},
                ipv4_pools=tuple(str(p) for p in data.get("ipv4_pools") or ()),
                ipv4_gateway=data.get("ipv4_gateway"),
                docker_name=data.get("docker_name"),
                profile=data.get("profile"),
                internal=bool(data.get("internal", False)),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidRequest(f"stored network is malformed: {raw!r:.80}") from exc


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
        data = _load(raw, "endpoint")
        try:
            profiles = data.get("profiles")
            return cls(
                id=str(data["id"]),
                host=str(data["host"]),
                network_id=str(data["network_id"]),
                interface=str(data["interface"]),
                peer=str(data["peer"]),
                mac=str(data["mac"]),
                ipv4=tuple(parse_address(n) for n in data.get("ipv4_nets") or ()),
                sandbox=data.get("sandbox"),
                gateway=data.get("gateway"),
                profiles=None if profiles is None else tuple(str(p) for p in profiles),
            )
        except (KeyError, TypeError) as exc:
            raise InvalidRequest(f"stored endpoint is malformed: {raw!r:.80}") from exc


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
        data = _load(raw, "host")
        try:
            as_num = data.get("as_num")
            return cls(
                name=str(data["name"]),
                ip=data.get("ip"),
                as_num=None if as_num is None else int(as_num),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"stored host is malformed: {raw!r:.80}") from exc


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
    try:
        number = int(str(value))
    except ValueError:
        raise InvalidRequest(f"AS number {value!r} is not a number") from None
    if not 1 <= number <= 4294967295:
        raise InvalidRequest(f"AS number {number} is outside 1-4294967295")
    return number


@dataclass(frozen=True)
class BgpConfig:
    """Global settings: ``/calicnm/v1/bgp/config``."""

    node_mesh: bool = True
    as_num: int = DEFAULT_AS

    def to_json(self) -> str:
        return json.dumps({"node_mesh": self.node_mesh, "as_num": self.as_num}, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes | None) -> BgpConfig:
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            return cls(bool(data.get("node_mesh", True)), check_as(data.get("as_num", DEFAULT_AS)))
        except (ValueError, AttributeError) as exc:
            raise InvalidRequest(f"stored BGP config is malformed: {raw!r:.80}") from exc


@dataclass(frozen=True)
class Peer:
    ip: str
    as_num: int

    def to_json(self) -> str:
        return json.dumps({"ip": self.ip, "as_num": self.as_num}, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Peer:
        try:
            data = json.loads(raw)
            return cls(str(parse_address(str(data["ip"]))), check_as(data["as_num"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidRequest(f"stored BGP peer is malformed: {raw!r:.80}") from exc

    @classmethod
    def parse(cls, ip: str, as_num: str) -> Peer:
        return cls(str(parse_address(ip, "peer address")), check_as(as_num))
