"""Applying a compiled ``profiles.CompiledPolicy`` to the kernel: the one writer
of calicnm's chains and ipsets on a host.

Order within one apply: ipsets first (a rule may not name a set that does
not exist yet), then one ``iptables-restore --noflush`` call holding one
transaction per table that changed (filter, nat): each rewrites every
changed chain whole, keeps exactly one jump from each kernel chain to a
wanted calicnm chain, deletes the jumps to calicnm chains nobody wants any
more and then those chains.  Last, the ipsets no rule references any more
are destroyed (a set still referenced cannot be).

Incremental by default: chains and sets equal to what this process last
programmed are not rewritten, which keeps a rule change on a busy host to a
few small writes.  ``full=True`` (at start and on the resync timer) reads
the kernel instead (one ``ipset save``, one ``iptables-save`` per table) and
rewrites every set, chain and jump that differs from what is wanted, which
repairs any drift (a chain flushed, edited or deleted by hand, an ipset
emptied, a jump deleted) without rewriting thousands of equal chains.

A chain is compared in the kernel's own spelling (``iptables-save`` prints a
rule otherwise than it was written: ``-p tcp`` gains ``-m tcp``, a mark
gains its mask...).  The applier learns that spelling by reading back each
chain it writes on a full pass (one more ``iptables-save`` of that table,
only when the pass wrote something) and keeps it with the rules it spelt;
a chain it has no spelling for, or whose wanted rules changed since, is
simply rewritten.

If applying fails, what was programmed is forgotten, so the next apply is
a full one.  Nothing is ever flushed wholesale, but a failure can leave a
partial apply behind: ipsets are written before the chains, and
``iptables-restore`` commits each table at its own ``COMMIT`` (filter before
nat).  Every such state is one the next full apply converges from, and no
state in between has a calicnm chain accepting what policy denies.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from calicnm.errors import DataplaneError
from calicnm.host.ipsets import Ipsets
from calicnm.host.iptables import (
    Iptables,
    chain_rules,
    has_chain,
    jump_fixups,
    jump_removals,
    kernel_chains,
    restore_script,
)
from calicnm.profiles import GUEST_JUMPS, PREFIX, TABLE_JUMPS, CompiledPolicy, temp_ipset

_log = logging.getLogger(__name__)

Chains = dict[str, tuple[str, ...]]


def _digests(rules: tuple[str, ...], spelled: tuple[str, ...]) -> tuple[bytes, bytes]:
    """A chain's rules as written and as ``iptables-save`` printed them, hashed."""
    return (
        hashlib.blake2b("\n".join(rules).encode(), digest_size=16).digest(),
        hashlib.blake2b("\n".join(spelled).encode(), digest_size=16).digest(),
    )


@dataclass(frozen=True)
class ApplyStats:
    chains_written: int
    chains_deleted: int
    sets_written: int
    sets_deleted: int


class PolicyApplier:
    def __init__(self, iptables: Iptables, ipsets: Ipsets) -> None:
        self._iptables = iptables
        self._ipsets = ipsets
        self._chains: dict[str, Chains] | None = None  # table -> chains
        self._sets: dict[str, tuple[str, frozenset[str]]] | None = None  # name -> (type, members)
        # (table, chain) -> digests of (the rules last written, the lines
        # iptables-save printed for them): how the kernel spells those rules.
        # Digests, not the lines: a host with 10,000 endpoints has 20,000 chains.
        self._spelled: dict[tuple[str, str], tuple[bytes, bytes]] = {}

    def apply(self, desired: CompiledPolicy, full: bool = False) -> ApplyStats:
        try:
            return self._apply(desired, full or self._chains is None)
        except Exception:
            self._chains = None
            self._sets = None
            raise

    def jumps_in_place(self) -> bool:
        """Is everything that keeps calicnm first still where the last apply
        put it?  Every jump is rule 1 of its kernel chain (and of dockerd's
        DOCKER-USER, where that exists) and calicnm's top chains still hold
        rules.  A few one-rule reads: cheap enough to ask twice a second, so
        an outside ``iptables -F`` or a dockerd restart is noticed at once.
        False also when nothing was applied yet, or a read fails."""
        if self._chains is None:
            return False
        try:
            for table, chains in self._chains.items():
                for parent, chain in TABLE_JUMPS.get(table, ()):
                    if chain not in chains:
                        continue
                    if self._iptables.first_rule(table, parent) != f"-A {parent} -j {chain}":
                        return False
                    if chains[chain] and not self._iptables.first_rule(table, chain):
                        return False
                for parent, chain in GUEST_JUMPS.get(table, ()):
                    first = self._iptables.first_rule(table, parent)
                    if first is not None and chain in chains and first != f"-A {parent} -j {chain}":
                        return False
        except DataplaneError:
            return False
        return True

    def _apply(self, desired: CompiledPolicy, full: bool) -> ApplyStats:
        wanted = {n: (desired.ipset_type(n), m) for n, m in desired.ipsets.items()}
        kernel_sets = self._ipsets.read(PREFIX) if full else {}
        old_sets = kernel_sets if full or self._sets is None else self._sets
        sets = {
            name: (temp_ipset(name), kind, members)
            for name, (kind, members) in wanted.items()
            if old_sets.get(name) != (kind, members)
        }
        self._ipsets.replace(sets)

        tables = desired.tables()
        script: list[str] = []
        written = deleted = 0
        learn: dict[str, Chains] = {}
        for table, chains in tables.items():
            old = {} if full or self._chains is None else self._chains.get(table, {})
            lines, changed, stale = self._table_script(table, chains, old, full)
            script += lines
            written += len(changed)
            deleted += stale
            if full and changed:
                learn[table] = changed
        if script:
            self._iptables.restore("\n".join(script) + "\n")
        for table, changed in learn.items():
            self._learn(table, changed)

        unused: set[str] = set()
        if full:
            # The kernel's sets as read before the replace, less the
            # temporaries the replace itself destroyed.
            swapped = {temp for temp, _kind, _members in sets.values()}
            unused = set(kernel_sets) - set(wanted) - swapped
        elif self._sets is not None:
            unused = set(self._sets) - set(wanted)
        self._ipsets.destroy(unused)

        self._chains = {table: dict(chains) for table, chains in tables.items()}
        self._sets = wanted
        stats = ApplyStats(written, deleted, len(sets), len(unused))
        if written or deleted or sets or unused:
            _log.info(
                "dataplane applied full=%s chains_written=%d chains_deleted=%d sets_written=%d "
                "sets_deleted=%d",
                full,
                *stats.__dict__.values(),
            )
        return stats

    def _table_script(
        self, table: str, chains: Chains, old: Chains, full: bool
    ) -> tuple[list[str], Chains, int]:
        """One table's transaction (or nothing), the chains it writes, and how
        many it deletes.

        The kernel's jumps are read on a full pass, and whenever a jump's
        target chain comes or goes (nat-outgoing switched on or off).  On a
        full pass a chain is written unless the kernel holds it exactly as
        the applier last spelt the same rules.
        """
        jumps = TABLE_JUMPS.get(table, ())
        look = full or any((chain in chains) != (chain in old) for _, chain in jumps)
        saved = self._save(table, chains) if look else ""
        present = kernel_chains(saved) if full else set(old)
        fixups: list[str] = []
        if look:
            for parent, chain in jumps:
                if chain in chains:
                    fixups += jump_fixups(saved, parent, chain)
                else:
                    fixups += jump_removals(saved, parent, chain)
            for parent, chain in GUEST_JUMPS.get(table, ()):
                if not has_chain(saved, parent):
                    continue
                if chain in chains:
                    fixups += jump_fixups(saved, parent, chain)
                else:
                    fixups += jump_removals(saved, parent, chain)
        if full:
            kernel = chain_rules(saved)
            self._forget(table, chains)
            changed = {
                n: r
                for n, r in chains.items()
                if n not in kernel or self._spelled.get((table, n)) != _digests(r, kernel[n])
            }
        else:
            changed = {n: r for n, r in chains.items() if old.get(n) != r}
        stale = sorted(present - set(chains))
        if not (changed or fixups or stale):
            return [], {}, 0
        script = restore_script(table, changed, fixups, stale)
        return script.splitlines(), changed, len(stale)

    def _learn(self, table: str, written: Chains) -> None:
        """Read back how the kernel spells the chains just written."""
        kernel = chain_rules(self._save(table, written))
        for name, rules in written.items():
            if name in kernel:
                self._spelled[(table, name)] = _digests(rules, kernel[name])

    def _forget(self, table: str, chains: Chains) -> None:
        """Drop the spellings of ``table``'s chains that are no longer wanted."""
        for key in [k for k in self._spelled if k[0] == table and k[1] not in chains]:
            del self._spelled[key]

    def _save(self, table: str, chains: Chains) -> str:
        """``iptables-save -t table``; a table we want nothing in and that
        cannot be read (no nat support in the kernel) holds nothing of ours."""
        try:
            return self._iptables.save(table)
        except DataplaneError:
            if chains:
                raise
            _log.debug("cannot read the %s table; assuming no calicnm chains in it", table)
            return ""
