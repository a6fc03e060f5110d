"""Host-wide kernel settings the node checks and sets at start."""

from __future__ import annotations

from calicnm.errors import DataplaneError
from calicnm.plumbing import read_sysctl, write_sysctl


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
