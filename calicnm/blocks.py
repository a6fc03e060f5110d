"""Allocation blocks: the pure arithmetic of IPAM.

A block is a power-of-two slice of a pool (a /26 by default) and the unit of
both host affinity and compare-and-swap: every allocation or release reads
one block, computes the new block here, and writes it back only if nobody
else wrote it in between.  Nothing in this module performs I/O; ``revision``
merely remembers which etcd revision the value was read at.

Invariants, checked by ``Block.from_json`` and kept by every method:
- every ordinal in ``[0, size)`` is in exactly one of ``allocations`` (taken)
  or ``unallocated`` (free);
- ``unallocated`` is ordered by preference: assignment takes from the front
  and release appends to the back, so a freed address is reused last (a
  departed container's address does not reappear at once on a new one).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from calicnm.errors import AddressInUse, InvalidRequest
from calicnm.model import IPv4Address, IPv4Network, parse_network
from calicnm.validation import check_hostname, check_text

KIND_ENDPOINT = "endpoint"
KIND_GATEWAY = "gateway"
KIND_AUX = "aux"
KIND_HOST = "host"


@dataclass(frozen=True)
class Allocation:
    """Who holds an address: ``handle`` names the owner (an endpoint id once
    known), ``kind`` says why it is held."""

    handle: str
    kind: str = KIND_ENDPOINT


@dataclass(frozen=True)
class Block:
    cidr: IPv4Network
    affinity: str | None
    allocations: dict[int, Allocation] = field(default_factory=dict)
    unallocated: tuple[int, ...] = ()
    revision: int = 0
    """etcd mod_revision this value was read at; 0 means not yet stored."""

    @classmethod
    def new(cls, cidr: IPv4Network, host: str | None) -> Block:
        return cls(cidr=cidr, affinity=host, unallocated=tuple(range(cidr.num_addresses)))

    @property
    def size(self) -> int:
        return self.cidr.num_addresses

    @property
    def free(self) -> int:
        return len(self.unallocated)

    @property
    def empty(self) -> bool:
        return not self.allocations

    def ordinal(self, addr: IPv4Address) -> int:
        if addr not in self.cidr:
            raise InvalidRequest(f"{addr} is not in block {self.cidr}")
        return int(addr) - int(self.cidr.network_address)

    def address(self, ordinal: int) -> IPv4Address:
        return self.cidr.network_address + ordinal

    def holder(self, addr: IPv4Address) -> Allocation | None:
        return self.allocations.get(self.ordinal(addr))

    def assign_any(
        self, allocation: Allocation, allowed: Callable[[IPv4Address], bool]
    ) -> tuple[Block, IPv4Address] | None:
        """Take the most preferred free address that ``allowed`` accepts."""
        for ordinal in self.unallocated:
            addr = self.address(ordinal)
            if allowed(addr):
                return self._take(ordinal, allocation), addr
        return None

    def assign(self, addr: IPv4Address, allocation: Allocation) -> Block:
        """Take exactly ``addr``; AddressInUse if someone holds it."""
        ordinal = self.ordinal(addr)
        held = self.allocations.get(ordinal)
        if held is not None:
            raise AddressInUse(f"address {addr} is already in use ({held.kind} {held.handle})")
        return self._take(ordinal, allocation)

    def release(self, addr: IPv4Address) -> Block | None:
        """Free ``addr``; None when it was not allocated (release is idempotent)."""
        ordinal = self.ordinal(addr)
        if ordinal not in self.allocations:
            return None
        allocations = dict(self.allocations)
        del allocations[ordinal]
        return replace(self, allocations=allocations, unallocated=(*self.unallocated, ordinal))

    def with_handle(self, addr: IPv4Address, handle: str, kind: str | None = None) -> Block | None:
        """Re-own ``addr`` (and re-kind it, when ``kind`` is given); None when
        it is not allocated."""
        ordinal = self.ordinal(addr)
        held = self.allocations.get(ordinal)
        if held is None:
            return None
        allocations = dict(self.allocations)
        allocations[ordinal] = Allocation(handle=handle, kind=kind or held.kind)
        return replace(self, allocations=allocations)

    def addresses_of(self, handle: str) -> list[IPv4Address]:
        return [self.address(o) for o, a in sorted(self.allocations.items()) if a.handle == handle]

    def _take(self, ordinal: int, allocation: Allocation) -> Block:
        allocations = dict(self.allocations)
        allocations[ordinal] = allocation
        unallocated = tuple(o for o in self.unallocated if o != ordinal)
        return replace(self, allocations=allocations, unallocated=unallocated)

    def to_json(self) -> str:
        return json.dumps(
            {
                "cidr": str(self.cidr),
                "affinity": None if self.affinity is None else f"host:{self.affinity}",
                "allocations": {
                    str(o): {"handle": a.handle, "kind": a.kind}
                    for o, a in sorted(self.allocations.items())
                },
                "unallocated": list(self.unallocated),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes, revision: int = 0) -> Block:
        """A block whose every field checks out and whose ordinals are each
        either allocated or free, exactly once."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            cidr = parse_network(data["cidr"], "block cidr")
            affinity = data.get("affinity")
            if affinity is not None:
                affinity = check_hostname(check_text(affinity, "affinity").removeprefix("host:"))
            allocations = {
                _ordinal(o): Allocation(
                    handle=check_text(a["handle"], "handle", 200),
                    kind=_kind(a.get("kind", KIND_ENDPOINT)),
                )
                for o, a in (data.get("allocations") or {}).items()
            }
            unallocated = tuple(_ordinal(o) for o in data.get("unallocated") or ())
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise InvalidRequest(f"stored block is malformed ({exc}): {raw!r:.80}") from exc
        block = cls(cidr, affinity, allocations, unallocated, revision)
        every = set(allocations) | set(unallocated)
        if every != set(range(block.size)) or len(allocations) + len(unallocated) != block.size:
            raise InvalidRequest(
                f"stored block {cidr} breaks its invariant (lost or doubled ordinals)"
            )
        return block


KINDS = (KIND_ENDPOINT, KIND_GATEWAY, KIND_AUX, KIND_HOST)


def _kind(value: object) -> str:
    if value not in KINDS:
        raise InvalidRequest(f"allocation kind {value!r} is not one of {', '.join(KINDS)}")
    return str(value)


def _ordinal(value: object) -> int:
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    if not (text.isascii() and text.isdigit()):
        raise InvalidRequest(f"ordinal {value!r} is not a number")
    return int(text)
