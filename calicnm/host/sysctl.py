"""sysctls: reading and writing ``/proc/sys`` of the calling thread's network
namespace, and the host-wide settings the node checks and sets at start."""

from __future__ import annotations

import os

from calicnm.errors import DataplaneError


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
