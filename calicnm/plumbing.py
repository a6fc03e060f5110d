"""Host-side plumbing: the only module that imports pyroute2.

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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from calicnm.endpoint import LinkPlan
from calicnm.errors import DataplaneError

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
    # The host side needs no IPv6 link-local address of its own.
    ("net/ipv6/conf/{}/disable_ipv6", "1"),
)


def write_sysctl(path: str, value: str, proc: str = "/proc/sys") -> None:
    """Write one sysctl of the calling thread's network namespace."""
    full = os.path.join(proc, path)
    try:
        with open(full, "w") as fh:
            fh.write(value)
    except FileNotFoundError:
        if "/ipv6/" in path:
            return  # IPv6 disabled on this host: nothing to turn off.
        raise DataplaneError(f"sysctl {path} does not exist") from None
    except OSError as exc:
        raise DataplaneError(f"cannot set sysctl {path}={value}: {exc.strerror}") from exc


def read_sysctl(path: str, proc: str = "/proc/sys") -> str:
    with open(os.path.join(proc, path)) as fh:
        return fh.read().strip()


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
        """The /32 scope-link route and permanent neighbour entry of each
        address, through ``host_if``; False when the interface does not exist.
        Idempotent ("replace"), so re-asserting repairs a route deleted by hand."""
        with _netlink() as ipr:
            found = ipr.link_lookup(ifname=host_if)
            if not found:
                return False
            try:
                for addr in ips:
                    ipr.route("replace", dst=f"{addr}/32", oif=found[0], scope=SCOPE_LINK)
                    ipr.neigh("replace", dst=addr, lladdr=mac, ifindex=found[0], state="permanent")
            except Exception as exc:
                if _netlink_error(exc) == errno.ENODEV:
                    return False
                raise DataplaneError(f"cannot route {','.join(ips)} via {host_if}: {exc}") from exc
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
