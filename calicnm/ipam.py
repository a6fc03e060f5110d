"""IPAM: pools in etcd, split into host-affine blocks, changed only by CAS.

Every change is read -> pure change (``blocks.Block``) -> ``Store.commit``
guarded by the block's revision, retried a bounded number of times.  Two
allocators, on one host or many, can therefore never hand out the same
address: the second writer of a block loses its compare and re-reads.

Auto-assignment order (as Calico did):
1. blocks this host already has affinity for;
2. a block nobody has claimed yet, claimed for this host in the same
   transaction that creates it (block and affinity marker are written
   together, so a claim is never half-made);
3. free addresses in other hosts' blocks (affinity is a preference, not a
   reservation), so a pool is only exhausted when it is really full.

Docker's PoolID is self-describing (see ``PoolRef``) so it survives plugin
and dockerd restarts without any state of its own.

Handles (who holds an address) and what frees them:
- ``docker-pending:<unix seconds>:<nonce>``: Docker asked for the address
  and nobody has claimed it yet (``pending_handle``); the bare legacy
  ``docker-pending`` means "pending since an unknown time".  ``pending``
  lists them with their age and ``release_stale_pending`` frees the old
  ones no endpoint record names.
- an endpoint id: claimed by CreateEndpoint (``claim``);
- ``gateway:<network id>`` / ``aux:<network id>``: a network's ``--gateway``
  and ``--aux-address`` reservations, freed with the network (the driver's
  docstring has the scheme); ``gateway:<address>`` is the legacy form.

A commit whose reply is lost (``DatastoreUnavailable`` from ``commit``) may or
may not have been applied: the next try re-reads the block and takes the
change as made if it is there (the same handle at the same address), so a
lost reply never allocates twice (see ``_update_block``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from calicnm import faults
from calicnm.blocks import KIND_ENDPOINT, Allocation, Block
from calicnm.errors import (
    AddressInUse,
    Conflict,
    DatastoreConflict,
    DatastoreUnavailable,
    InvalidRequest,
    NotFound,
    PoolExhausted,
)
from calicnm.model import DEFAULT_POOL, IPv4Address, IPv4Network, Pool, parse_network
from calicnm.store import keys, records
from calicnm.store.kv import ABSENT, KV, Store, Txn, retry_cas

_log = logging.getLogger(__name__)
T = TypeVar("T")


POOLS_GUARD = keys.config("pools-generation")
"""Bumped by every pool add/remove, so concurrent overlapping adds conflict."""

ANY_POOL_ID = "calicnm:any"

PENDING = "docker-pending"
"""Handle prefix of an address Docker asked for that no endpoint has claimed
yet; alone, the legacy handle of one pending since an unknown time."""

AMBIGUOUS_RETRIES = 3
"""How many commits of one block update may end without a reply (applied or
not, nobody knows) before the update gives up with ``DatastoreUnavailable``."""


def pending_handle(now: float, nonce: str) -> str:
    """The handle of an address Docker requests at ``now`` (unix seconds).

    ``nonce`` makes the handle unique to the request: after a lost commit
    reply the allocator recognises its own allocation by its handle, and two
    requests within one second must never both take one address for theirs."""
    return f"{PENDING}:{int(now)}:{nonce}"


def is_pending(handle: str) -> bool:
    return handle == PENDING or handle.startswith(PENDING + ":")


def pending_since(handle: str) -> int | None:
    """Unix seconds at which a pending handle was made; None for the legacy
    bare handle (or any pending handle without a readable time)."""
    if not is_pending(handle):
        raise InvalidRequest(f"handle {handle!r} is not a pending handle")
    stamp = handle.split(":")[1] if handle != PENDING else ""
    return int(stamp) if stamp.isascii() and stamp.isdigit() else None


def gateway_handle(network_id: str) -> str:
    """Owner of a network's ``--gateway`` address."""
    return f"gateway:{network_id}"


def aux_handle(network_id: str) -> str:
    """Owner of a network's ``--aux-address`` addresses."""
    return f"aux:{network_id}"


class PendingAddress(NamedTuple):
    """A pending allocation: ``age`` in seconds (None: unknown, a legacy
    handle), and the exact ``handle`` to give ``release_if_held``."""

    address: IPv4Address
    age: float | None
    handle: str
    kind: str


@dataclass(frozen=True)
class PoolRef:
    """What a Docker PoolID means: all pools, or one ``--subnet`` (optionally
    narrowed to an ``--ip-range``)."""

    subnet: IPv4Network | None = None
    ip_range: IPv4Network | None = None

    @property
    def pool_id(self) -> str:
        if self.subnet is None:
            return ANY_POOL_ID
        if self.ip_range is None:
            return f"calicnm:{self.subnet}"
        return f"calicnm:{self.subnet}:{self.ip_range}"

    @property
    def docker_pool(self) -> str:
        """The CIDR Docker records for the network; 0.0.0.0/0 means "any pool",
        which also keeps Docker from running its overlap check against routes."""
        return "0.0.0.0/0" if self.subnet is None else str(self.subnet)

    @classmethod
    def parse(cls, pool_id: object) -> PoolRef:
        if not isinstance(pool_id, str) or not pool_id.startswith("calicnm:"):
            raise InvalidRequest(f"PoolID {pool_id!r} was not issued by calicnm")
        if pool_id == ANY_POOL_ID:
            return cls()
        parts = pool_id.split(":")[1:]
        if len(parts) not in (1, 2):
            raise InvalidRequest(f"PoolID {pool_id!r} is malformed")
        subnet = parse_network(parts[0], "PoolID subnet")
        ip_range = parse_network(parts[1], "PoolID range") if len(parts) == 2 else None
        return cls(subnet, ip_range)

    def allows(self, addr: IPv4Address, pool: Pool, exclude: tuple[IPv4Network, ...] = ()) -> bool:
        """May auto-assignment hand out ``addr``?

        Never the first or last address of the Docker subnet (or of the pool,
        for "any"): operators read those as network and broadcast addresses.
        Never an address in ``exclude``: a network without ``--subnet`` stays
        out of the subnets other networks were created with, so a container
        on both never holds an address that the other network's subnet
        route would capture.
        """
        scope = self.subnet if self.subnet is not None else pool.cidr
        if addr not in scope:
            return False
        if self.ip_range is not None and addr not in self.ip_range:
            return False
        if any(addr in net for net in exclude):
            return False
        edges = (scope.network_address, scope.broadcast_address)
        return not (scope.prefixlen <= 30 and addr in edges)


@dataclass(frozen=True)
class AddressInfo:
    address: IPv4Address
    pool: Pool | None
    block: Block | None
    holder: Allocation | None


class Allocator:
    """IPAM for one host (``host`` is its affinity name)."""

    def __init__(
        self,
        store: Store,
        host: str,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._host = host
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._pools_cache: tuple[int, list[Pool]] | None = None
        """(pools-generation revision, pools) as last read; claims compare the
        revision, so a stale cache can never create a block in a removed pool."""
        self._written: dict[IPv4Network, Block] = {}
        """Blocks as this allocator last wrote them (with the revision of that
        write): the next change to one compares against it without reading
        it first, and re-reads only when someone else wrote it since.  An
        entry only ever moves forward in revision (``_remember``), whatever
        order concurrent threads finish their commits in."""
        self._written_lock = threading.Lock()
        self._spare: dict[IPv4Network, None] = {}
        """This host's blocks that had free space when last seen, in the order
        to try them: the steady-state allocation is one read and one commit."""

    def _known_pools(self, fresh: bool = False) -> tuple[int, list[Pool]]:
        if fresh or self._pools_cache is None:
            guard = self._store.get(POOLS_GUARD)
            self._pools_cache = (guard.revision if guard else ABSENT, self.pools())
        return self._pools_cache

    def pool_of(self, addr: IPv4Address) -> Pool | None:
        """The pool holding ``addr``, from the cache first, then fresh."""
        for fresh in (False, True):
            for pool in self._known_pools(fresh)[1]:
                if addr in pool.cidr:
                    return pool
        return None

    # ---- pools -----------------------------------------------------------

    def pools(self) -> list[Pool]:
        return records.pools(self._store)

    def add_pool(self, pool: Pool) -> None:
        """Add ``pool``; Conflict if it overlaps an existing one."""

        def attempt() -> bool | None:
            guard = self._store.get(POOLS_GUARD)
            for other in self.pools():
                if other.cidr == pool.cidr:
                    raise Conflict(f"pool {pool.cidr} already exists")
                if other.cidr.overlaps(pool.cidr):
                    raise Conflict(
                        f"cannot add pool {pool.cidr}: it overlaps existing pool {other.cidr}"
                    )
            txn = Txn(
                compare=[(POOLS_GUARD, guard.revision if guard else ABSENT)],
                puts=[(keys.pool(pool.cidr), pool.to_json()), (POOLS_GUARD, _bump(guard))],
            )
            return True if self._store.commit(txn) else None

        self._retry(attempt, "the pool list")
        self._pools_cache = None
        _log.info("pool added cidr=%s options=%s", pool.cidr, ",".join(pool.options))

    def ensure_default_pool(self) -> bool:
        """Create 192.168.0.0/16 when no pool exists at all; True if created."""
        if self.pools():
            return False
        try:
            self.add_pool(Pool(DEFAULT_POOL))
        except Conflict:
            return False
        return True

    def remove_pool(self, cidr: IPv4Network) -> None:
        """Remove a pool with no address in use, with its empty blocks."""

        def attempt() -> bool | None:
            guard = self._store.get(POOLS_GUARD)
            kv = self._store.get(keys.pool(cidr))
            if kv is None:
                raise NotFound(f"pool {cidr} does not exist")
            blocks = [b for b in self._blocks() if b.cidr.subnet_of(cidr)]
            used = sum(len(b.allocations) for b in blocks)
            if used:
                raise Conflict(
                    f"pool {cidr} still has {used} address(es) in use; "
                    "remove the containers (or 'calicnm ipam release') first"
                )
            txn = Txn(
                compare=[(POOLS_GUARD, guard.revision if guard else ABSENT), (kv.key, kv.revision)],
                puts=[(POOLS_GUARD, _bump(guard))],
                deletes=[kv.key],
            )
            for b in blocks:
                txn.compare.append((keys.block(b.cidr), b.revision))
                txn.deletes.append(keys.block(b.cidr))
                if b.affinity:
                    txn.deletes.append(keys.affinity(b.affinity, b.cidr))
            return True if self._store.commit(txn) else None

        self._retry(attempt, f"pool {cidr}")
        self._pools_cache = None
        self._spare = {}
        _log.info("pool removed cidr=%s", cidr)

    def pool_containing(self, addr: IPv4Address | IPv4Network) -> Pool | None:
        for pool in self.pools():
            if (isinstance(addr, IPv4Network) and addr.subnet_of(pool.cidr)) or (
                isinstance(addr, IPv4Address) and addr in pool.cidr
            ):
                return pool
        return None

    def request_pool(self, subnet: IPv4Network | None, ip_range: IPv4Network | None) -> PoolRef:
        """Resolve Docker's RequestPool: no ``--subnet`` means every pool."""
        pools = self.pools()
        if not pools:
            raise InvalidRequest("no calicnm pool exists; add one with 'calicnm pool add <CIDR>'")
        if subnet is None:
            if ip_range is not None:
                raise InvalidRequest("--ip-range needs --subnet")
            return PoolRef()
        if self.pool_containing(subnet) is None:
            known = ", ".join(str(p.cidr) for p in pools)
            raise InvalidRequest(
                f"subnet {subnet} is not inside any calicnm pool (pools: {known}); "
                f"add it with 'calicnm pool add {subnet}'"
            )
        if ip_range is not None and not ip_range.subnet_of(subnet):
            raise InvalidRequest(f"--ip-range {ip_range} is not inside --subnet {subnet}")
        return PoolRef(subnet, ip_range)

    # ---- addresses -------------------------------------------------------

    def assign(
        self,
        ref: PoolRef,
        handle: str,
        kind: str = KIND_ENDPOINT,
        address: IPv4Address | None = None,
        exclude: tuple[IPv4Network, ...] = (),
    ) -> IPv4Address:
        """Allocate ``address`` (or any free one outside ``exclude``) within
        ``ref`` for ``handle``."""
        allocation = Allocation(handle=handle, kind=kind)
        if address is not None:
            got = self._assign_exact(ref, address, allocation)
        else:
            got = self._assign_auto(ref, allocation, exclude)
        faults.point("after-assign-commit")
        return got

    def _assign_exact(
        self, ref: PoolRef, address: IPv4Address, allocation: Allocation
    ) -> IPv4Address:
        if self.pool_of(address) is None:
            raise InvalidRequest(f"address {address} is outside every calicnm pool")
        if ref.subnet is not None and address not in ref.subnet:
            raise InvalidRequest(f"address {address} is outside subnet {ref.subnet}")

        def change(block: Block) -> Block:
            return block.assign(address, allocation)

        self._update_exact(address, change, lambda b: b.holder(address) == allocation)
        _log.info(
            "address assigned ip=%s handle=%s kind=%s", address, allocation.handle, allocation.kind
        )
        return address

    def claim(
        self,
        address: IPv4Address,
        handle: str,
        kind: str = KIND_ENDPOINT,
        takes_over: Callable[[Allocation], bool] = lambda held: False,
    ) -> None:
        """Make ``handle`` (of ``kind``) the holder of ``address``, in one
        compare-and-swap of its block.

        A free address is allocated (creating its block if need be, under
        the same pools-generation compare as any claim); one already held by
        ``handle`` keeps it (kind updated); one held by an allocation that
        ``takes_over`` accepts (a pending request) changes hands.  Anything
        else is refused with ``AddressInUse`` naming the holder, and nothing
        is written.  InvalidRequest if ``address`` is outside every pool."""
        wanted = Allocation(handle=handle, kind=kind)

        def change(block: Block) -> Block:
            held = block.holder(address)
            if held == wanted:
                raise _Unchanged
            if held is None:
                return block.assign(address, wanted)
            _refuse_claim(address, held, handle, takes_over)
            new = block.with_handle(address, handle, kind)
            if new is None:  # pragma: no cover - held is not None
                raise _Unchanged
            return new

        try:
            self._update_exact(address, change, lambda b: b.holder(address) == wanted)
        except _Unchanged:
            return
        _log.info("address claimed ip=%s handle=%s kind=%s", address, handle, kind)

    def check_claim(
        self,
        address: IPv4Address,
        handle: str,
        takes_over: Callable[[Allocation], bool] = lambda held: False,
    ) -> None:
        """Refuse now, with the error ``claim`` would raise, a claim that
        cannot succeed as things stand; writes nothing.  (A read: ``claim``
        still compares, so a change in between is caught there.)"""
        info = self.info(address)
        if info.pool is None:
            raise InvalidRequest(f"address {address} is outside every calicnm pool")
        if info.holder is not None:
            _refuse_claim(address, info.holder, handle, takes_over)

    def _update_exact(
        self, address: IPv4Address, change: Callable[[Block], Block], done: Callable[[Block], bool]
    ) -> None:
        """Apply ``change`` to the block of ``address``, creating (claiming)
        the block if it does not exist.  The pool is looked up in the cached
        pool list first, and a claim compares the pools generation that list
        was read at: if a pool was added or removed meanwhile, the lookup is
        made again on a fresh list, so an exact claim never creates a block
        in a pool that is gone.  InvalidRequest when no pool holds it."""
        for fresh in (False, True, True):
            guard, known = self._known_pools(fresh)
            pool = next((p for p in known if address in p.cidr), None)
            if pool is None:
                if fresh:
                    raise InvalidRequest(f"address {address} is outside every calicnm pool")
                continue
            try:
                self._update_block(
                    _block_of(address, pool), change, claim_if_absent=True, guard=guard, done=done
                )
            except _PoolsChanged:
                continue
            return
        raise DatastoreConflict(f"the pool list kept changing while claiming {address}")

    def _assign_auto(
        self, ref: PoolRef, allocation: Allocation, exclude: tuple[IPv4Network, ...]
    ) -> IPv4Address:
        # First from what this allocator already knows (cached pools, blocks
        # of ours that had space); then, if that finds nothing or the pools
        # changed underneath, from a fresh read of everything.
        for fresh in (False, True):
            try:
                found = self._assign_pass(ref, allocation, exclude, fresh)
            except _PoolsChanged:
                continue
            if found is not None:
                return found
        pools = [p for p in self._known_pools()[1] if not p.disabled]
        if ref.subnet is not None:
            pools = [p for p in pools if ref.subnet.subnet_of(p.cidr)]
        if not pools:
            raise PoolExhausted(f"no enabled calicnm pool serves {ref.subnet or 'this network'}")
        where = ref.subnet or ", ".join(str(p.cidr) for p in pools)
        raise PoolExhausted(f"no free address left in {where}")

    def _assign_pass(
        self,
        ref: PoolRef,
        allocation: Allocation,
        exclude: tuple[IPv4Network, ...],
        fresh: bool,
    ) -> IPv4Address | None:
        guard, known = self._known_pools(fresh)
        pools = [p for p in known if not p.disabled]
        if ref.subnet is not None:
            pools = [p for p in pools if ref.subnet.subnet_of(p.cidr)]
        if not pools:
            return None

        def in_scope(cidr: IPv4Network) -> tuple[Pool | None, bool]:
            for pool in pools:
                if cidr.subnet_of(pool.cidr):
                    scope = ref.subnet or pool.cidr
                    return pool, cidr.overlaps(scope) and (
                        ref.ip_range is None or cidr.overlaps(ref.ip_range)
                    )
            return None, False

        def attempt(cidr: IPv4Network, claim: bool, phase: str) -> IPv4Address | None:
            pool, ok = in_scope(cidr)
            if pool is None or not ok:
                return None
            found = self._try_block(cidr, pool, ref, allocation, claim, exclude, guard)
            if found is not None:
                self._spare[cidr] = None
                _log.info(
                    "address assigned ip=%s handle=%s kind=%s block=%s via=%s",
                    found,
                    allocation.handle,
                    allocation.kind,
                    cidr,
                    phase,
                )
            return found

        if not fresh:
            for cidr in list(self._spare):
                if (found := attempt(cidr, False, "affine")) is not None:
                    return found
            return None

        # A pass works from one snapshot of the blocks; if another writer
        # created blocks meanwhile the pass can miss free space, so a failed
        # pass is repeated (bounded) while the set of blocks keeps changing.
        snapshot: dict[IPv4Network, Block] | None = None
        for _pass in range(3):
            existing = {b.cidr: b for b in self._blocks()}
            if snapshot is not None and existing.keys() == snapshot.keys():
                break
            snapshot = existing
            mine = [c for c, b in existing.items() if b.affinity == self._host and b.free]
            others = [c for c, b in existing.items() if b.affinity != self._host and b.free]
            for phase, candidates, claim in (
                ("affine", mine, False),
                ("claim", self._unclaimed(pools, ref, existing), True),
                ("borrow", others, False),
            ):
                for cidr in candidates:
                    if (found := attempt(cidr, claim, phase)) is not None:
                        return found
        return None

    def _unclaimed(
        self, pools: list[Pool], ref: PoolRef, existing: dict[IPv4Network, Block]
    ) -> Iterable[IPv4Network]:
        """Blocks nobody holds, in an order seeded by the host name so that
        different hosts start their claims in different places."""
        order = random.Random(self._host)
        for pool in pools:
            scope = ref.ip_range or ref.subnet or pool.cidr
            if scope.prefixlen >= pool.block_prefix:
                cidrs = [scope.supernet(new_prefix=pool.block_prefix)]
            else:
                cidrs = list(scope.subnets(new_prefix=pool.block_prefix))
            order.shuffle(cidrs)
            yield from (c for c in cidrs if c not in existing)

    def _try_block(
        self,
        cidr: IPv4Network,
        pool: Pool,
        ref: PoolRef,
        allocation: Allocation,
        claim: bool,
        exclude: tuple[IPv4Network, ...],
        guard: int,
    ) -> IPv4Address | None:
        chosen: list[IPv4Address] = []

        def change(block: Block) -> Block:
            result = block.assign_any(allocation, lambda a: ref.allows(a, pool, exclude))
            if result is None:
                raise _BlockFull
            new, addr = result
            chosen[:] = [addr]
            return new

        def done(block: Block) -> bool:
            return bool(chosen) and block.holder(chosen[0]) == allocation

        try:
            try:
                self._update_block(
                    cidr, change, claim_if_absent=claim, only_claim=claim, guard=guard, done=done
                )
            except _AlreadyClaimed:
                # Someone created it first; if that someone is this host (a
                # concurrent request here), the block is ours to use.
                block = self._block(cidr)
                if block is None or block.affinity != self._host:
                    return None
                self._update_block(cidr, change, claim_if_absent=False, done=done)
        except (_BlockFull, _NoBlock):
            self._spare.pop(cidr, None)
            return None
        return chosen[0]

    def release(self, address: IPv4Address) -> bool:
        """Free ``address``; False (not an error) if it was not allocated."""
        return self._release(address, None)

    def release_if_held(self, address: IPv4Address, handle: str) -> bool:
        """Free ``address`` only if ``handle`` still holds it: the handle is
        compared in the same compare-and-swap as the release, so an address
        that changed hands since it was seen (claimed by an endpoint,
        released and requested again) is left alone.  True if freed."""
        return self._release(address, handle)

    def _release(self, address: IPv4Address, handle: str | None) -> bool:
        pool = self.pool_of(address)
        if pool is None:
            return False

        def change(block: Block) -> Block:
            held = block.holder(address)
            if held is None or (handle is not None and held.handle != handle):
                raise _Unchanged
            new = block.release(address)
            if new is None:  # pragma: no cover - held is not None
                raise _Unchanged
            return new

        cidr = _block_of(address, pool)
        try:
            # After a lost reply: the address is free, so the release was made.
            self._update_block(
                cidr, change, claim_if_absent=False, done=lambda b: b.holder(address) is None
            )
        except (_Unchanged, _NoBlock):
            return False
        faults.point("after-release-commit")
        _log.info("address released ip=%s handle=%s", address, handle or "-")
        return True

    def set_handle(self, address: IPv4Address, handle: str) -> bool:
        """Record the owner of an allocated address (False if not allocated)."""
        pool = self.pool_of(address)
        if pool is None:
            return False

        def change(block: Block) -> Block:
            held = block.holder(address)
            if held is None:
                raise _Unchanged
            if held.handle == handle:
                raise _Unchanged
            new = block.with_handle(address, handle)
            if new is None:
                raise _Unchanged
            return new

        def done(block: Block) -> bool:
            held = block.holder(address)
            return held is not None and held.handle == handle

        try:
            self._update_block(_block_of(address, pool), change, claim_if_absent=False, done=done)
        except _NoBlock:
            return False
        except _Unchanged:
            block = self._block(_block_of(address, pool))
            return block is not None and block.holder(address) is not None
        return True

    def release_by_handle(self, handle: str) -> list[IPv4Address]:
        """Free every address owned by ``handle`` (scans blocks)."""
        return self.release_handles({handle})

    def release_handles(self, handles: Collection[str]) -> list[IPv4Address]:
        """Free every address held by one of ``handles``: one listing of the
        blocks, then one ``release_if_held`` each, so an address that changed
        hands since the listing is left alone.  Returns the addresses freed."""
        freed = []
        for block in self._blocks():
            for ordinal, held in sorted(block.allocations.items()):
                address = block.address(ordinal)
                if held.handle in handles and self.release_if_held(address, held.handle):
                    freed.append(address)
        return freed

    def pending(self, now: float) -> list[PendingAddress]:
        """Every pending allocation (an address Docker requested that no
        endpoint or network has claimed), with its age at ``now`` (unix
        seconds; None for a legacy handle without a time), oldest first."""
        found = []
        for block in self._blocks():
            for ordinal, held in sorted(block.allocations.items()):
                if is_pending(held.handle):
                    since = pending_since(held.handle)
                    age = None if since is None else now - since
                    found.append(
                        PendingAddress(block.address(ordinal), age, held.handle, held.kind)
                    )
        return sorted(found, key=lambda p: (p.age is None, -(p.age or 0.0), p.address))

    def release_stale_pending(self, now: float, max_age: float) -> list[IPv4Address]:
        """Free the pending allocations older than ``max_age`` seconds: what a
        lost reply or a replayed RequestAddress left behind.

        Left alone: legacy handles without a time (they may be the aux
        addresses of a network made before handles carried one), addresses
        some endpoint record (of any host) names (a CreateEndpoint cut short
        between its record and its claim; the record is what to clean up),
        and any address whose handle changed since it was listed (the
        release compares it).  Returns the addresses freed."""
        stale = [p for p in self.pending(now) if p.age is not None and p.age > max_age]
        if not stale:
            return []
        named = {ip for ep in records.endpoints(self._store) for ip in ep.ipv4}
        freed = []
        for p in stale:
            if p.address in named:
                _log.warning(
                    "pending address %s is named by an endpoint record; not released", p.address
                )
                continue
            if self.release_if_held(p.address, p.handle):
                _log.info("stale pending address released ip=%s age=%.0fs", p.address, p.age)
                freed.append(p.address)
        return freed

    def info(self, address: IPv4Address) -> AddressInfo:
        pool = self.pool_containing(address)
        if pool is None:
            return AddressInfo(address, None, None, None)
        block = self._block(_block_of(address, pool))
        holder = block.holder(address) if block else None
        return AddressInfo(address, pool, block, holder)

    def blocks(self) -> list[Block]:
        return self._blocks()

    def affine_blocks(self, host: str | None = None) -> list[IPv4Network]:
        owner = host or self._host
        return records.affinities(self._store, owner).get(owner, [])

    def release_affinity(self, host: str) -> tuple[int, int]:
        """Forget ``host``'s claims (it is gone): empty blocks are deleted,
        blocks still holding addresses keep them but lose the affinity.
        Returns (blocks deleted, blocks kept)."""
        deleted = kept = 0
        for cidr in self.affine_blocks(host):

            def attempt(cidr: IPv4Network = cidr) -> bool | None:
                block = self._block(cidr)
                txn = Txn(deletes=[keys.affinity(host, cidr)])
                if block is not None and block.affinity == host:
                    txn.compare.append((keys.block(cidr), block.revision))
                    if block.empty:
                        txn.deletes.append(keys.block(cidr))
                    else:
                        orphan = dataclasses.replace(block, affinity=None)
                        txn.puts.append((keys.block(cidr), orphan.to_json()))
                if not self._store.commit(txn):
                    return None
                return block is not None and block.empty

            if self._retry(attempt, f"block {cidr}"):
                deleted += 1
            else:
                kept += 1
        return deleted, kept

    # ---- the CAS loop ----------------------------------------------------

    def _retry(self, attempt: Callable[[], T | None], what: str) -> T:
        return retry_cas(attempt, what, sleep=self._sleep, rng=self._rng)

    def _blocks(self) -> list[Block]:
        return records.blocks(self._store)

    def _block(self, cidr: IPv4Network) -> Block | None:
        return records.block(self._store, cidr)

    def _take_written(self, cidr: IPv4Network) -> Block | None:
        with self._written_lock:
            return self._written.pop(cidr, None)

    def _remember(self, block: Block) -> None:
        """Keep ``block`` as this allocator's latest write of it, unless a
        newer revision is already kept (another thread's later commit)."""
        with self._written_lock:
            kept = self._written.get(block.cidr)
            if kept is None or kept.revision < block.revision:
                self._written[block.cidr] = block

    def _update_block(
        self,
        cidr: IPv4Network,
        change: Callable[[Block], Block],
        claim_if_absent: bool,
        only_claim: bool = False,
        guard: int | None = None,
        done: Callable[[Block], bool] | None = None,
    ) -> None:
        """Apply ``change`` to block ``cidr`` atomically, re-reading on conflict.

        If the block does not exist and ``claim_if_absent``, it is created with
        this host's affinity in the same transaction.  With ``only_claim`` a
        block that someone else created meanwhile is left alone
        (``_AlreadyClaimed``): the caller wanted a fresh block, not a borrow.
        A claim also compares the pools generation against ``guard`` (when
        given), so a pool removed meanwhile is never claimed from
        (``_PoolsChanged``).  Exceptions raised by ``change`` propagate untouched.

        A commit that raises ``DatastoreUnavailable`` lost its reply: it may
        have been applied.  The next try re-reads the block and, if ``done``
        says the change is already in it (this allocation, same handle, same
        address), counts it as made; otherwise the change is made again on
        what was read.  After ``AMBIGUOUS_RETRIES`` such commits the error
        propagates (the change may or may not be in the store then).
        """
        # The first try compares against this allocator's own last write of
        # the block (no read); every later try re-reads it.  Only a commit may
        # rest on that cached copy: any other outcome re-reads first.
        known = [self._take_written(cidr)]
        unsure: list[DatastoreUnavailable] = []

        def attempt() -> bool | None:
            cached = known.pop() if known else None
            current = cached if cached is not None else self._block(cidr)
            if unsure and current is not None and done is not None and done(current):
                _log.info("block %s: a commit whose reply was lost was applied", cidr)
                self._remember(current)
                return True
            if current is None:
                if not claim_if_absent:
                    raise _NoBlock
                new = change(Block.new(cidr, self._host))
                compare = [(keys.block(cidr), ABSENT)]
                if guard is not None:
                    compare.append((POOLS_GUARD, guard))
                txn = Txn(
                    compare=compare,
                    puts=[
                        (keys.block(cidr), new.to_json()),
                        (keys.affinity(self._host, cidr), ""),
                    ],
                )
            else:
                try:
                    if only_claim:
                        raise _AlreadyClaimed
                    new = change(current)
                except Exception:
                    if cached is None:
                        raise
                    # Only a commit compares the cached block with etcd: any
                    # other outcome (refused, nothing to do) may rest on a
                    # block another writer (the collector, the CLI, another
                    # host) changed since; it is decided again on a fresh read.
                    return None
                txn = Txn(
                    compare=[(keys.block(cidr), current.revision)],
                    puts=[(keys.block(cidr), new.to_json())],
                )
            try:
                revision = self._store.commit(txn)
            except DatastoreUnavailable as exc:
                unsure.append(exc)
                if len(unsure) > AMBIGUOUS_RETRIES:
                    raise
                _log.warning("block %s: commit outcome unknown (%s); re-reading", cidr, exc)
                return None
            if revision:
                self._remember(dataclasses.replace(new, revision=revision))
                if current is None:
                    _log.info("block claimed block=%s host=%s", cidr, self._host)
                return True
            if current is None and guard is not None:
                latest = self._store.get(POOLS_GUARD)
                if (latest.revision if latest else ABSENT) != guard:
                    self._pools_cache = None
                    raise _PoolsChanged
            return None  # lost the race: back off a little and re-read

        self._retry(attempt, f"block {cidr}")


class _BlockFull(Exception):
    pass


class _AlreadyClaimed(Exception):
    pass


class _NoBlock(Exception):
    pass


class _PoolsChanged(Exception):
    pass


class _Unchanged(Exception):
    pass


def _refuse_claim(
    address: IPv4Address, held: Allocation, handle: str, takes_over: Callable[[Allocation], bool]
) -> None:
    """AddressInUse unless ``handle`` may hold ``address`` that ``held`` holds."""
    if held.handle != handle and not takes_over(held):
        raise AddressInUse(f"address {address} is already in use ({held.kind} {held.handle})")


def _bump(guard: KV | None) -> str:
    return str(int(guard.value) + 1 if guard and guard.value.isdigit() else 1)


def _block_of(address: IPv4Address, pool: Pool) -> IPv4Network:
    return ipaddress.IPv4Network(f"{address}/{pool.block_prefix}", strict=False)


__all__ = [
    "ANY_POOL_ID",
    "PENDING",
    "AddressInUse",
    "AddressInfo",
    "Allocator",
    "PendingAddress",
    "PoolRef",
    "aux_handle",
    "gateway_handle",
    "is_pending",
    "pending_handle",
    "pending_since",
]
