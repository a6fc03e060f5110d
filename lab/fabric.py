"""``Fabric``: the emulated L2 underlay (a bridge in its own namespace) and its ``Attachment`` s.

Addresses: the fabric holds ``198.18.0.1/24`` (:data:`FABRIC_ADDRESS`); hosts get
``198.18.0.2``, ``.3``, ... in attach order.  Nothing here routes: see :class:`Fabric`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from lab.netns import Netns
from lab.procs import NAME_PREFIX, Cleanup, HarnessError, Managed, run_command, unique_name

__all__ = ["FABRIC_ADDRESS", "FABRIC_BRIDGE", "FABRIC_PREFIXLEN", "Attachment", "Fabric"]

FABRIC_ADDRESS = "198.18.0.1"
FABRIC_PREFIXLEN = 24
FABRIC_BRIDGE = "br0"
_FABRIC_NET = "198.18.0"


@dataclass(frozen=True)
class Attachment:
    """One host's link into the fabric."""

    host: Netns
    ifname: str
    """Host-side interface name (``eth0`` by default)."""
    address: str
    """Host address without prefix length, e.g. ``198.18.0.2``."""
    cidr: str
    """Host address with prefix length, e.g. ``198.18.0.2/24``."""
    gateway: str
    fabric_ifname: str
    """Name of the veth end enslaved to the fabric bridge (inside the fabric netns)."""


class Fabric(Managed):
    """A namespace acting as the L2 underlay: bridge ``br0`` holding ``198.18.0.1/24``.

    Invariants: ``net.ipv4.ip_forward=0`` (and IPv6 forwarding off) in the fabric namespace,
    so the fabric never routes anything anywhere: packets a host sends to its default gateway
    (the fabric address) for unknown destinations end here and are dropped.  Hosts on the
    fabric reach each other directly on L2.  Host addresses are handed out as 198.18.0.2, .3,
    ... in attach order.  Hosts made with :meth:`add_host` are owned by the fabric and deleted
    by :meth:`close` (before the fabric itself); hosts passed to :meth:`attach` stay owned by
    the caller (their veth disappears when either namespace is deleted).
    """

    def __init__(self, name: str | None = None) -> None:
        self.netns = Netns(name or unique_name(NAME_PREFIX + "f"))
        self.attachments: list[Attachment] = []
        self._owned_hosts: list[Netns] = []
        self._next_host = 2

    @property
    def address(self) -> str:
        return FABRIC_ADDRESS

    def create(self) -> Self:
        """Create the namespace, bridge and address; on failure nothing is left behind."""
        self.netns.create()
        try:
            run = self.netns.run
            run(["ip", "link", "add", FABRIC_BRIDGE, "type", "bridge"])
            run(["ip", "addr", "add", f"{FABRIC_ADDRESS}/{FABRIC_PREFIXLEN}", "dev", FABRIC_BRIDGE])
            run(["ip", "link", "set", FABRIC_BRIDGE, "up"])
            run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
            run(["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=0"])
            got = run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
            if got != "0":
                raise HarnessError(f"fabric {self.netns.name}: ip_forward is {got!r}")
        except BaseException:
            self.netns.delete(raise_errors=False)
            raise
        return self

    def next_address(self) -> str:
        """Allocate the next free host address (``198.18.0.N/24``)."""
        if self._next_host > 254:
            raise HarnessError("fabric out of host addresses")
        cidr = f"{_FABRIC_NET}.{self._next_host}/{FABRIC_PREFIXLEN}"
        self._next_host += 1
        return cidr

    def attach(
        self,
        host_netns: Netns,
        address_cidr: str | None = None,
        gateway_ip: str | None = FABRIC_ADDRESS,
        ifname: str = "eth0",
    ) -> Attachment:
        """Link ``host_netns`` to the fabric with a veth pair.

        The host end is named ``ifname``, gets ``address_cidr`` (allocated by
        :meth:`next_address` if ``None``) and is up; if ``gateway_ip`` is not ``None`` a
        default route via it is added.  The other end is enslaved to ``br0``.  On failure the
        veth pair is removed again and the error re-raised.
        """
        cidr = address_cidr or self.next_address()
        fab_if = unique_name(NAME_PREFIX + "v")
        tmp_if = unique_name(NAME_PREFIX + "h")
        run = self.netns.run
        run(
            [
                "ip",
                "link",
                "add",
                fab_if,
                "type",
                "veth",
                "peer",
                "name",
                tmp_if,
                "netns",
                host_netns.name,
            ]
        )
        try:
            run(["ip", "link", "set", fab_if, "master", FABRIC_BRIDGE])
            run(["ip", "link", "set", fab_if, "up"])
            hrun = host_netns.run
            hrun(["ip", "link", "set", tmp_if, "name", ifname])
            hrun(["ip", "addr", "add", cidr, "dev", ifname])
            hrun(["ip", "link", "set", ifname, "up"])
            if gateway_ip is not None:
                hrun(["ip", "route", "add", "default", "via", gateway_ip, "dev", ifname])
        except BaseException:
            run_command(["ip", "-n", self.netns.name, "link", "del", fab_if], check=False)
            raise
        att = Attachment(
            host=host_netns,
            ifname=ifname,
            address=cidr.split("/")[0],
            cidr=cidr,
            gateway=gateway_ip or "",
            fabric_ifname=fab_if,
        )
        self.attachments.append(att)
        return att

    def add_host(self, name: str | None = None, address_cidr: str | None = None) -> Attachment:
        """Create a new host namespace owned by the fabric and attach it; see :meth:`attach`."""
        host = Netns(name).create()
        self._owned_hosts.append(host)
        try:
            return self.attach(host, address_cidr)
        except BaseException:
            self._owned_hosts.remove(host)
            host.delete(raise_errors=False)
            raise

    def close(self, raise_errors: bool = True) -> None:
        """Delete owned hosts (newest first), then the fabric namespace.  Idempotent."""
        cleanup = Cleanup(f"fabric {self.netns.name}")
        while self._owned_hosts:
            host = self._owned_hosts.pop()
            cleanup.step(f"deleting host {host.name}", host.delete)
        cleanup.step("deleting fabric netns", self.netns.delete)
        cleanup.finish(raise_errors)

    _open = create
    _close = close
