"""Endpoint plans: pure decisions about one container interface.

Given an endpoint id and its addresses this module decides the kernel names,
the MAC, the link-local gateway and the exact Join response.  It performs no
I/O; ``host.netlink.HostPlumbing`` carries the plan out in the host namespace.

The routed design: the container's ``eth<N>`` holds a /32 and reaches a
link-local gateway (169.254.1.1 for its first calicnm interface) through a
connected /32 route; the host side of the veth answers ARP for that gateway
by proxy ARP and holds a /32 route back to the container.  No bridge, no
NAT, no tunnel.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Any

from calicnm.errors import InvalidRequest
from calicnm.model import GATEWAY_BASE, GATEWAY_LIMIT, IPv4Address

HOST_PREFIX = "cali"
PEER_PREFIX = "tmp"
ID_CHARS = 11
"""cali + 11 = 15 characters, the kernel's IFNAMSIZ limit less the NUL."""


def host_ifname(endpoint_id: str) -> str:
    return HOST_PREFIX + endpoint_id[:ID_CHARS]


def peer_ifname(endpoint_id: str) -> str:
    return PEER_PREFIX + endpoint_id[:ID_CHARS]


def derive_mac(endpoint_id: str) -> str:
    """A stable, locally administered unicast MAC (first octet 0xee)."""
    digest = hashlib.sha256(endpoint_id.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0xEE, *digest[:5]))


def choose_gateway(in_use: set[str]) -> str:
    """The lowest link-local gateway no other interface of the sandbox uses."""
    for n in range(GATEWAY_LIMIT):
        candidate = str(GATEWAY_BASE + n)
        if candidate not in in_use:
            return candidate
    raise InvalidRequest(f"a container can join at most {GATEWAY_LIMIT} calicnm networks")


@dataclass(frozen=True)
class LinkPlan:
    """Everything the host side needs to wire one endpoint."""

    host_if: str
    peer_if: str
    mac: str
    addresses: tuple[IPv4Address, ...]
    mtu: int = 1500


def plan_link(endpoint_id: str, mac: str, addresses: tuple[IPv4Address, ...]) -> LinkPlan:
    return LinkPlan(
        host_if=host_ifname(endpoint_id),
        peer_if=peer_ifname(endpoint_id),
        mac=mac,
        addresses=addresses,
    )


def join_response(
    peer_if: str, gateway: str, subnets: list[ipaddress.IPv4Network]
) -> dict[str, Any]:
    """Docker's Join answer.

    Every interface offers its own link-local gateway; Docker installs the
    default route through one of them (its gateway endpoint) and keeps the
    others' connected routes, which cannot clash because the gateways differ.
    For a network created with ``--subnet`` a route to that subnet through
    the interface's gateway makes traffic to peers on that network leave by
    the interface whose address it carries (strict reverse-path filtering on
    the host drops anything else).  ``DisableGatewayService`` keeps Docker
    from adding a docker_gwbridge interface.
    """
    routes: list[dict[str, Any]] = [{"Destination": f"{gateway}/32", "RouteType": 1, "NextHop": ""}]
    routes += [{"Destination": str(net), "RouteType": 0, "NextHop": gateway} for net in subnets]
    return {
        "InterfaceName": {"SrcName": peer_if, "DstPrefix": "eth"},
        "Gateway": gateway,
        "StaticRoutes": routes,
        "DisableGatewayService": True,
    }
