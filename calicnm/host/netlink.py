"""Host-side plumbing: the only module that imports pyroute2, and the only one
that speaks netlink (the two requests ``ensure_routes`` repeats for every
endpoint are packed here by hand: see the end of the module).

``HostPlumbing`` carries out an ``endpoint.LinkPlan`` in the namespace of
the calling thread (the host's, in production; a throwaway one in tests).
It never enters a container's namespace: Docker moves the peer itself.

Failure behaviour: ``create`` either leaves a complete veth pair (host side
up with proxy ARP and strict rp_filter, container side carrying the MAC)
or removes what it made and raises ``DataplaneError``.  Routes are the
agent's: it calls ``ensure_routes`` once the endpoint is recorded, so the
route and the endpoint's policy chains appear together.  ``remove`` treats
a missing link as already removed.  Netlink errno values are translated
here and nowhere else.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from calicnm.endpoint import LinkPlan
from calicnm.errors import DataplaneError
from calicnm.host.sysctl import write_sysctl

_log = logging.getLogger(__name__)

SCOPE_LINK = 253

PER_INTERFACE_SYSCTLS = (
    # Answer ARP for the link-local gateway (and anything else routed
    # elsewhere) with this interface's MAC, immediately.
    ("net/ipv4/conf/{}/proxy_arp", "1"),
    ("net/ipv4/neigh/{}/proxy_delay", "0"),
    # Strict reverse-path filtering: a container can only send from the
    # addresses routed to its own interface.
    ("net/ipv4/conf/{}/rp_filter", "1"),
    ("net/ipv4/conf/{}/forwarding", "1"),
    # Gratuitous ARP from a container changes nothing on the host: its
    # neighbour entry is permanent, and nobody else's address is its to claim.
    ("net/ipv4/conf/{}/drop_gratuitous_arp", "1"),
    # No IPv6 on the host side: no link-local address, and router
    # advertisements from a container configure nothing.
    ("net/ipv6/conf/{}/accept_ra", "0"),
    ("net/ipv6/conf/{}/disable_ipv6", "1"),
)


@contextmanager
def _netlink() -> Iterator[Any]:
    from pyroute2 import IPRoute

    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _netlink_error(exc: Exception) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


class HostPlumbing:
    """Creates and removes endpoint veths in the current network namespace.

    A short-lived netlink socket per call keeps the object safe to share
    between request threads.
    """

    def create(self, plan: LinkPlan) -> None:
        with _netlink() as ipr:
            if ipr.link_lookup(ifname=plan.host_if):
                # A leftover from a crash between create and a recorded
                # endpoint: the endpoint id is ours, so the link is too.
                _log.warning("replacing stale interface %s", plan.host_if)
                self._delete(ipr, plan.host_if)
            if ipr.link_lookup(ifname=plan.peer_if):
                self._delete(ipr, plan.peer_if)
            try:
                ipr.link(
                    "add",
                    ifname=plan.host_if,
                    kind="veth",
                    mtu=plan.mtu,
                    peer={"ifname": plan.peer_if, "address": plan.mac, "mtu": plan.mtu},
                )
            except Exception as exc:
                raise DataplaneError(
                    f"cannot create veth {plan.host_if}/{plan.peer_if}: {exc}"
                ) from exc
            try:
                index = ipr.link_lookup(ifname=plan.host_if)[0]
                for path, value in PER_INTERFACE_SYSCTLS:
                    write_sysctl(path.format(plan.host_if), value)
                ipr.link("set", index=index, state="up")
            except Exception as exc:
                self._delete(ipr, plan.host_if)
                if isinstance(exc, DataplaneError):
                    raise
                raise DataplaneError(f"cannot configure {plan.host_if}: {exc}") from exc
        _log.info(
            "veth created host_if=%s peer=%s ips=%s",
            plan.host_if,
            plan.peer_if,
            ",".join(map(str, plan.addresses)),
        )

    def ensure_routes(self, host_if: str, ips: tuple[str, ...], mac: str) -> bool:
        """The interface's sysctls (``PER_INTERFACE_SYSCTLS``), and the /32
        scope-link route and permanent neighbour entry of each address,
        through ``host_if``; False when the interface does not exist.
        Idempotent ("replace"), so re-asserting repairs a route deleted or a
        sysctl changed by hand.

        The agent calls this for every local endpoint on each full resync,
        so it is one interface-index lookup, the sysctl writes and one
        netlink write carrying every request (see ``_replace_requests``),
        about 0.1 ms, instead of a pyroute2 socket and two encoded requests
        per address (about 3 ms)."""
        try:
            index = socket.if_nametoindex(host_if)
        except OSError:
            return False
        try:
            for path, value in PER_INTERFACE_SYSCTLS:
                write_sysctl(path.format(host_if), value)
        except DataplaneError:
            if not self.exists(host_if):
                return False  # removed meanwhile
            raise
        try:
            requests = _replace_requests(index, ips, mac)
            failed = _send_requests(requests)
        except (OSError, ValueError) as exc:
            raise DataplaneError(f"cannot route {','.join(ips)} via {host_if}: {exc}") from exc
        if errno.ENODEV in failed:
            return False  # removed meanwhile
        if failed:
            reason = os.strerror(failed[0])
            raise DataplaneError(f"cannot route {','.join(ips)} via {host_if}: {reason}")
        return True

    def remove(self, host_if: str, peer_if: str | None = None) -> bool:
        """Delete the pair (either end removes both); False if already gone.

        After Leave, Docker has moved the peer back to the host and renamed
        it to its original name, so either name may be what is left.
        """
        removed = False
        with _netlink() as ipr:
            for name in (host_if, peer_if):
                if name and ipr.link_lookup(ifname=name):
                    self._delete(ipr, name)
                    removed = True
        if removed:
            _log.info("veth removed host_if=%s", host_if)
        return removed

    def exists(self, ifname: str) -> bool:
        with _netlink() as ipr:
            return bool(ipr.link_lookup(ifname=ifname))

    def routes_to(self, ifname: str) -> list[str]:
        """Destinations of the routes through ``ifname`` (for checks)."""
        with _netlink() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return []
            return [
                f"{r.get('RTA_DST')}/{r['dst_len']}"
                for r in ipr.route("dump", oif=found[0])
                if r.get("RTA_DST")
            ]

    def links_with_prefix(self, *prefixes: str) -> list[str]:
        with _netlink() as ipr:
            names = [link.get("IFLA_IFNAME") for link in ipr.link("dump")]
        return sorted(n for n in names if n and n.startswith(prefixes))

    def link_facts(self, prefix: str) -> dict[str, tuple[int, str]]:
        """name -> (ifindex, MAC) of every link whose name starts with ``prefix``, in one
        netlink dump."""
        out: dict[str, tuple[int, str]] = {}
        with _netlink() as ipr:
            for link in ipr.link("dump"):
                name = link.get("IFLA_IFNAME")
                if name and name.startswith(prefix):
                    out[name] = (int(link["index"]), str(link.get("IFLA_ADDRESS") or ""))
        return out

    @staticmethod
    def _delete(ipr: Any, name: str) -> None:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return
        try:
            ipr.link("del", index=found[0])
        except Exception as exc:
            if _netlink_error(exc) == errno.ENODEV:
                return
            raise DataplaneError(f"cannot delete interface {name}: {exc}") from exc


GATEWAYS = "169.254.1.0/24"
"""Every link-local gateway a container may be given (169.254.1.1-250)."""
RT_TABLE_LOCAL = 255
RT_SCOPE_HOST = 254


def ensure_gateway_route() -> None:
    """Make the containers' gateways this host's own addresses: a ``local``
    route for ``GATEWAYS`` (as ``ip route replace local 169.254.1.0/24 dev lo``).

    The host then answers ARP for a container's gateway itself, whether or
    not it has a default route (proxy ARP alone answers only for addresses
    the host can route elsewhere), and a packet a container sends to its
    gateway is a packet for the host: it meets the endpoint-to-host action
    in INPUT instead of being forwarded anywhere.  Idempotent."""
    with _netlink() as ipr:
        lo = ipr.link_lookup(ifname="lo")
        if not lo:
            raise DataplaneError("this namespace has no loopback interface")
        try:
            ipr.route(
                "replace",
                dst=GATEWAYS,
                type="local",
                table=RT_TABLE_LOCAL,
                scope=RT_SCOPE_HOST,
                oif=lo[0],
            )
        except Exception as exc:
            raise DataplaneError(f"cannot route the gateways {GATEWAYS} locally: {exc}") from exc


def host_addresses() -> list[tuple[str, str]]:
    """(interface, IPv4 address) pairs of global scope, by interface index."""
    with _netlink() as ipr:
        names = {link["index"]: link.get("IFLA_IFNAME") or "" for link in ipr.link("dump")}
        found = [
            (msg["index"], msg.get("IFA_ADDRESS"))
            for msg in ipr.addr("dump", family=2)
            if msg["scope"] == 0 and msg.get("IFA_ADDRESS")
        ]
    return [(names.get(index, ""), str(addr)) for index, addr in sorted(found)]


RTNH_F_ONLINK = 4
EOPNOTSUPP_CODES = (errno.EOPNOTSUPP, errno.ENOTSUP)


def kernel_supports(kind: str) -> bool:
    """Can this kernel create a ``kind`` link ("vxlan", "ipip")?  Tries a
    throwaway link in the current namespace and removes it again."""
    name = f"cnmprobe{os.getpid() % 10000}"
    extra: dict[str, Any] = {"vxlan_id": 1} if kind == "vxlan" else {}
    with _netlink() as ipr:
        try:
            ipr.link("add", ifname=name, kind=kind, **extra)
        except Exception as exc:
            if _netlink_error(exc) in (*EOPNOTSUPP_CODES, errno.EINVAL):
                return False
            raise DataplaneError(f"cannot probe for {kind} support: {exc}") from exc
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("del", index=found[0])
    return True


def link_mtu(ifname: str) -> int | None:
    with _netlink() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return None
        mtu = ipr.link("get", index=found[0])[0].get("IFLA_MTU")
        return int(mtu) if mtu else None


def ensure_vxlan(
    device: str, vni: int, port: int, local_ip: str, underlay: str, mtu: int, mac: str
) -> None:
    """Create or correct the VXLAN device (no learning: every forwarding
    entry comes from etcd)."""
    with _netlink() as ipr:
        found = ipr.link_lookup(ifname=device)
        if found:
            link = ipr.link("get", index=found[0])[0]
            info = link.get_attr("IFLA_LINKINFO")
            data = info.get_attr("IFLA_INFO_DATA") if info else None
            ok = (
                data is not None
                and data.get_attr("IFLA_VXLAN_ID") == vni
                and data.get_attr("IFLA_VXLAN_LOCAL") == local_ip
                and link.get_attr("IFLA_ADDRESS") == mac
            )
            if not ok:
                ipr.link("del", index=found[0])
                found = []
        try:
            if not found:
                lower = ipr.link_lookup(ifname=underlay)
                if not lower:
                    raise DataplaneError(f"underlay interface {underlay} does not exist")
                ipr.link(
                    "add",
                    ifname=device,
                    kind="vxlan",
                    vxlan_id=vni,
                    vxlan_port=port,
                    vxlan_local=local_ip,
                    vxlan_learning=0,
                    vxlan_link=lower[0],
                    mtu=mtu,
                    address=mac,
                )
                found = ipr.link_lookup(ifname=device)
            ipr.link("set", index=found[0], mtu=mtu, state="up")
        except DataplaneError:
            raise
        except Exception as exc:
            raise DataplaneError(f"cannot set up {device}: {exc}") from exc
    write_sysctl(f"net/ipv4/conf/{device}/rp_filter", "0")


def sync_tunnel(
    device: str,
    routes: list[tuple[str, str]],
    peers: list[tuple[str, str]] | None = None,
) -> int:
    """Make ``device``'s routes exactly ``routes`` ((dst cidr, via) pairs,
    onlink) and, for VXLAN, its neighbour and forwarding entries exactly
    ``peers`` ((underlay ip, vtep mac) pairs).  Returns how many entries
    changed.  A missing device is an error: ``ensure_vxlan`` comes first."""
    changed = 0
    with _netlink() as ipr:
        found = ipr.link_lookup(ifname=device)
        if not found:
            raise DataplaneError(f"tunnel device {device} does not exist")
        index = found[0]
        try:
            if peers is not None:
                want_fdb = {(mac, ip) for ip, mac in peers}
                have_fdb = {
                    (f.get("NDA_LLADDR"), f.get("NDA_DST"))
                    for f in ipr.fdb("dump", ifindex=index)
                    if f.get("NDA_DST")
                }
                for mac, ip in have_fdb - want_fdb:
                    ipr.fdb("del", ifindex=index, lladdr=mac, dst=ip)
                    changed += 1
                for mac, ip in want_fdb - have_fdb:
                    ipr.fdb("append", ifindex=index, lladdr=mac, dst=ip)
                    changed += 1
                for ip, mac in peers:
                    ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=index, state="permanent")
            have = {
                (f"{r.get('RTA_DST')}/{r['dst_len']}", r.get("RTA_GATEWAY"))
                for r in ipr.route("dump", family=2, oif=index)
                if r.get("RTA_DST") and r.get("RTA_GATEWAY")
            }
            want = set(routes)
            for dst, via in have - want:
                ipr.route("del", dst=dst, gateway=via, oif=index)
                changed += 1
            for dst, via in want:
                ipr.route("replace", dst=dst, gateway=via, oif=index, flags=RTNH_F_ONLINK)
            changed += len(want - have)
        except Exception as exc:
            raise DataplaneError(f"cannot program routes through {device}: {exc}") from exc
    return changed


def delete_link(ifname: str) -> bool:
    with _netlink() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        ipr.link("del", index=found[0])
    return True


# ---- the agent's route and neighbour requests, encoded here -------------------
#
# ``ensure_routes`` runs for every local endpoint on every full resync.  pyroute2
# spends about 1 ms encoding one request; the kernel about 20 us carrying it out.
# So these two fixed-shape requests are packed here (``struct``, the layouts of
# <linux/netlink.h>, <linux/rtnetlink.h> and <linux/neighbour.h>) and sent together
# in one write on a plain netlink socket.

NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
NLMSG_ERROR = 2
RTM_NEWROUTE, RTM_NEWNEIGH = 24, 28
RT_TABLE_MAIN, RTPROT_STATIC, RTN_UNICAST = 254, 4, 1
RTA_DST, RTA_OIF = 1, 4
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80
NETLINK_TIMEOUT = 5.0
"""Longest wait for the kernel's answers to one write (it answers in microseconds)."""


def _attribute(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, sequence: int, body: bytes) -> bytes:
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    return struct.pack("=IHHII", 16 + len(body), kind, flags, sequence, 0) + body


def _replace_requests(index: int, ips: tuple[str, ...], mac: str) -> list[bytes]:
    """Per address, the requests of ``ip route replace ADDR/32 dev IF scope link proto
    static`` and ``ip neigh replace ADDR lladdr MAC dev IF nud permanent`` (numbered 1,
    2, ... in order).  ValueError or OSError for an address or MAC that is not one."""
    lladdr = bytes.fromhex(mac.replace(":", ""))
    if len(lladdr) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    out: list[bytes] = []
    for ip in ips:
        dst = socket.inet_pton(socket.AF_INET, ip)
        route = struct.pack(
            "=BBBBBBBBI", socket.AF_INET, 32, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, SCOPE_LINK,
            RTN_UNICAST, 0,
        )  # fmt: skip
        route += _attribute(RTA_DST, dst) + _attribute(RTA_OIF, struct.pack("=i", index))
        neigh = struct.pack("=BBHiHBB", socket.AF_INET, 0, 0, index, NUD_PERMANENT, 0, 0)
        neigh += _attribute(NDA_DST, dst) + _attribute(NDA_LLADDR, lladdr)
        out.append(_message(RTM_NEWROUTE, len(out) + 1, route))
        out.append(_message(RTM_NEWNEIGH, len(out) + 1, neigh))
    return out


def _send_requests(requests: list[bytes]) -> list[int]:
    """Send ``requests`` (numbered 1..n) in one write on a fresh rtnetlink socket of
    the calling thread's namespace and read every answer; the errno of each request
    the kernel refused.  OSError when the socket fails or an answer does not come
    within ``NETLINK_TIMEOUT``."""
    if not requests:
        return []
    failed: list[int] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(NETLINK_TIMEOUT)
        sock.bind((0, 0))
        sock.send(b"".join(requests))
        pending = set(range(1, len(requests) + 1))
        for _read in range(4 * len(requests)):  # each answer is at most one read
            if not pending:
                break
            data = sock.recv(65536)
            offset = 0
            while offset + 20 <= len(data):
                length, kind, _flags, sequence, _pid = struct.unpack_from("=IHHII", data, offset)
                if kind == NLMSG_ERROR and sequence in pending:
                    pending.discard(sequence)
                    (code,) = struct.unpack_from("=i", data, offset + 16)
                    if code:
                        failed.append(-code)
                offset += max(16, (length + 3) & ~3)
        if pending:
            raise OSError(errno.EPROTO, f"no answer to {len(pending)} netlink requests")
    return failed
