"""The checks every name, id and field passes before calicnm stores or uses it.

One copy of each rule: the plugin, the CLI and the records layer all call
these, so a value refused at one door is refused at every door, and what
comes back from etcd (written by another host, another release, or by hand)
passes the same checks as what Docker sent.  Anything that later reaches a
file path, an ``iptables-restore`` line, an ipset, a route or ``bird.conf``
is one of these checked values.

Patterns end in ``\\Z``, never ``$``: ``$`` also matches before a trailing
newline, which would let ``"web\\n"`` through.  Pure; every check raises
``InvalidRequest`` naming what was wrong.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, TypeGuard

from calicnm.errors import InvalidRequest

_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_ID_RE = re.compile(r"\A[0-9a-z]{12,64}\Z")
_HOSTNAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,252}\Z")
_MAC_RE = re.compile(r"\A[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")

MAX_TEXT = 4096
"""Longest free-text field calicnm stores (a sandbox path, an option value)."""


def is_name(value: object) -> TypeGuard[str]:
    """Profile, tag and network names: 1-64 letters, digits, ``_.-``."""
    return isinstance(value, str) and _NAME_RE.match(value) is not None


def check_name(value: object, what: str) -> str:
    if not is_name(value):
        raise InvalidRequest(
            f"{what} {value!r} must be 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_id(value: object, what: str) -> str:
    """Docker ids are 64 hex chars (25 base36 chars for swarm networks)."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidRequest(f"{what} must be a Docker id (12-64 lowercase hex/base36 chars)")
    return value


def check_hostname(value: object, what: str = "host name") -> str:
    """A host's name in calicnm: letters, digits, ``_.-``, at most 253."""
    if not isinstance(value, str) or not _HOSTNAME_RE.match(value):
        raise InvalidRequest(
            f"{what} {value!r} must be 1-253 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_text(value: object, what: str, limit: int = MAX_TEXT) -> str:
    """Free text: a string of printable characters (no control characters,
    no line breaks), at most ``limit`` long."""
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise InvalidRequest(f"{what} must be printable text of at most {limit} characters")
    return value


def check_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{what} must be true or false, not {value!r}")
    return value


def check_int(value: object, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequest(f"{what} must be an integer {low}-{high}, not {value!r}")
    return value


def check_mac(value: object, what: str = "MacAddress") -> str:
    """A unicast MAC, normalised to lower-case colon form."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} {value!r} is not a MAC address")
    mac = value.strip().lower().replace("-", ":")
    if not _MAC_RE.match(mac):
        raise InvalidRequest(f"{what} {value!r} is not a MAC address")
    if int(mac[:2], 16) & 1:
        raise InvalidRequest(f"{what} {value!r} is a multicast address")
    return mac


def check_host_ip(value: object, what: str = "host address") -> str:
    """A unicast IPv4 address another host can reach, in canonical form."""
    try:
        addr = ipaddress.IPv4Address(value if isinstance(value, str) else "")
    except ValueError:
        raise InvalidRequest(f"{what} {value!r} is not an IPv4 address") from None
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback or addr == _BROADCAST:
        raise InvalidRequest(f"{what} {value!r} is not a unicast address")
    return str(addr)


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def check_object(value: Any, what: str, known: tuple[str, ...]) -> dict[str, Any]:
    """A JSON object whose keys are all among ``known``."""
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise InvalidRequest(f"{what} has unknown field(s): {', '.join(unknown)}")
    return value


def check_utf8(text: str, what: str) -> str:
    """Text that was decoded from valid UTF-8 (no escaped stray bytes, nor
    any other lone surrogate, which UTF-8 cannot hold)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} is not valid UTF-8") from None
    return text
