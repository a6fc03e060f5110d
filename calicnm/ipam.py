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
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from calicnm.blocks import KIND_ENDPOINT, Allocation, Block
from calicnm.errors import (
    AddressInUse,
    Conflict,
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
        it first, and re-reads only when someone else wrote it since."""
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
            return self._assign_exact(ref, address, allocation)
        return self._assign_auto(ref, allocation, exclude)

    def _assign_exact(
        self, ref: PoolRef, address: IPv4Address, allocation: Allocation
    ) -> IPv4Address:
        pool = self.pool_of(address)
        if pool is None:
            raise InvalidRequest(f"address {address} is outside every calicnm pool")
        if ref.subnet is not None and address not in ref.subnet:
            raise InvalidRequest(f"address {address} is outside subnet {ref.subnet}")
        cidr = _block_of(address, pool)

        def change(block: Block) -> Block:
            return block.assign(address, allocation)

        self._update_block(cidr, change, claim_if_absent=True)
        _log.info(
            "address assigned ip=%s handle=%s kind=%s", address, allocation.handle, allocation.kind
        )
        return address

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

        try:
            try:
                self._update_block(
                    cidr, change, claim_if_absent=claim, only_claim=claim, guard=guard
                )
            except _AlreadyClaimed:
                # Someone created it first; if that someone is this host (a
                # concurrent request here), the block is ours to use.
                block = self._block(cidr)
                if block is None or block.affinity != self._host:
                    return None
                self._update_block(cidr, change, claim_if_absent=False)
        except (_BlockFull, _NoBlock):
            self._spare.pop(cidr, None)
            return None
        return chosen[0]

    def release(self, address: IPv4Address) -> bool:
        """Free ``address``; False (not an error) if it was not allocated."""
        pool = self.pool_of(address)
        if pool is None:
            return False
        released = [False]

        def change(block: Block) -> Block:
            new = block.release(address)
            if new is None:
                raise _Unchanged
            released[0] = True
            return new

        cidr = _block_of(address, pool)
        try:
            self._update_block(cidr, change, claim_if_absent=False)
        except (_Unchanged, _NoBlock):
            return False
        _log.info("address released ip=%s", address)
        return released[0]

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

        try:
            self._update_block(_block_of(address, pool), change, claim_if_absent=False)
        except _NoBlock:
            return False
        except _Unchanged:
            block = self._block(_block_of(address, pool))
            return block is not None and block.holder(address) is not None
        return True

    def release_by_handle(self, handle: str) -> list[IPv4Address]:
        """Free every address owned by ``handle`` (scans blocks)."""
        freed = []
        for block in self._blocks():
            for addr in block.addresses_of(handle):
                if self.release(addr):
                    freed.append(addr)
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

    def _update_block(
        self,
        cidr: IPv4Network,
        change: Callable[[Block], Block],
        claim_if_absent: bool,
        only_claim: bool = False,
        guard: int | None = None,
    ) -> None:
        """Apply ``change`` to block ``cidr`` atomically, re-reading on conflict.

        If the block does not exist and ``claim_if_absent``, it is created with
        this host's affinity in the same transaction.  With ``only_claim`` a
        block that someone else created meanwhile is left alone
        (``_AlreadyClaimed``): the caller wanted a fresh block, not a borrow.
        A claim also compares the pools generation against ``guard`` (when
        given), so a pool removed meanwhile is never claimed from
        (``_PoolsChanged``).  Exceptions raised by ``change`` propagate untouched.
        """
        # The first try compares against this allocator's own last write of
        # the block (no read); every later try re-reads it.
        known = [self._written.pop(cidr, None)]

        def attempt() -> bool | None:
            cached = known.pop() if known else None
            current = cached if cached is not None else self._block(cidr)
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
                if only_claim:
                    raise _AlreadyClaimed
                new = change(current)
                txn = Txn(
                    compare=[(keys.block(cidr), current.revision)],
                    puts=[(keys.block(cidr), new.to_json())],
                )
            if revision := self._store.commit(txn):
                self._written[cidr] = dataclasses.replace(new, revision=revision)
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


def _bump(guard: KV | None) -> str:
    return str(int(guard.value) + 1 if guard and guard.value.isdigit() else 1)


def _block_of(address: IPv4Address, pool: Pool) -> IPv4Network:
    return ipaddress.IPv4Network(f"{address}/{pool.block_prefix}", strict=False)


__all__ = ["ANY_POOL_ID", "AddressInUse", "AddressInfo", "Allocator", "PoolRef"]
