"""Host-wide kernel settings the node owns: forwarding and the base chains.

The node is the single writer of these; it asserts them at start and again
on a timer, so a flush by hand or a dockerd restart (which rewrites FORWARD
and may set its policy to DROP) is repaired within one period.
"""

from __future__ import annotations

import logging

from calicnm.errors import DataplaneError
from calicnm.iptables import Iptables, jump_fixups, render
from calicnm.plumbing import read_sysctl, write_sysctl

_log = logging.getLogger(__name__)

FORWARD_CHAIN = "calicnm-FORWARD"


def base_chains() -> dict[str, list[str]]:
    """Routed container traffic is forwarded whatever FORWARD's policy is.

    (Per-endpoint policy chains replace the blanket ACCEPTs once profiles
    are enforced.)
    """
    return {FORWARD_CHAIN: ["-i cali+ -j ACCEPT", "-o cali+ -j ACCEPT"]}


def check_kernel_settings() -> None:
    """Refuse a loose global rp_filter: it would let containers spoof each other."""
    try:
        value = read_sysctl("net/ipv4/conf/all/rp_filter")
    except OSError as exc:
        raise DataplaneError(f"cannot read rp_filter: {exc}") from exc
    if value == "2":
        raise DataplaneError(
            "net.ipv4.conf.all.rp_filter is 2 (loose), which overrides calicnm's strict "
            "per-interface setting; set it to 1 or 0 (sysctl -w net.ipv4.conf.all.rp_filter=1)"
        )


def ensure_forwarding() -> None:
    write_sysctl("net/ipv4/ip_forward", "1")


class BaseDataplane:
    def __init__(self, iptables: Iptables) -> None:
        self._iptables = iptables

    def ensure(self) -> None:
        saved = self._iptables.save("filter")
        fixups = jump_fixups(saved, "FORWARD", FORWARD_CHAIN)
        self._iptables.restore(render("filter", base_chains(), fixups))
        if fixups:
            _log.info(
                "base chains programmed backend=%s fixups=%d",
                self._iptables.backend.name,
                len(fixups),
            )
