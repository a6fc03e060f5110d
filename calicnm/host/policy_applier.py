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
few small writes.  ``full=True`` (at start and on the resync timer) reads the
kernel's list of calicnm chains and jumps of every table, and rewrites
everything, which repairs any drift (a chain flushed or deleted by hand, an
ipset emptied, a jump deleted).

If applying fails, what was programmed is forgotten, so the next apply is
a full one.  Nothing is ever flushed wholesale, but a failure can leave a
partial apply behind: ipsets are written before the chains, and
``iptables-restore`` commits each table at its own ``COMMIT`` (filter before
nat).  Every such state is one the next full apply converges from, and no
state in between has a calicnm chain accepting what policy denies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from calicnm.errors import DataplaneError
from calicnm.host.ipsets import Ipsets
from calicnm.host.iptables import (
    Iptables,
    has_chain,
    jump_fixups,
    jump_removals,
    kernel_chains,
    restore_script,
)
from calicnm.profiles import GUEST_JUMPS, PREFIX, TABLE_JUMPS, CompiledPolicy, temp_ipset

_log = logging.getLogger(__name__)

Chains = dict[str, tuple[str, ...]]


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
        old_sets = {} if full or self._sets is None else self._sets
        sets = {
            name: (temp_ipset(name), kind, members)
            for name, (kind, members) in wanted.items()
            if old_sets.get(name) != (kind, members)
        }
        self._ipsets.replace(sets)

        tables = desired.tables()
        script: list[str] = []
        written = deleted = 0
        for table, chains in tables.items():
            old = {} if full or self._chains is None else self._chains.get(table, {})
            lines, changed, stale = self._table_script(table, chains, old, full)
            script += lines
            written += changed
            deleted += stale
        if script:
            self._iptables.restore("\n".join(script) + "\n")

        unused: set[str] = set()
        if full:
            unused = self._ipsets.names(PREFIX) - set(wanted)
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
    ) -> tuple[list[str], int, int]:
        """One table's transaction (or nothing), chains written, chains deleted.

        The kernel's jumps are read on a full pass, and whenever a jump's
        target chain comes or goes (nat-outgoing switched on or off).
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
        changed = {n: r for n, r in chains.items() if old.get(n) != r}
        stale = sorted(present - set(chains))
        if not (changed or fixups or stale):
            return [], 0, 0
        script = restore_script(table, changed, fixups, stale)
        return script.splitlines(), len(changed), len(stale)

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
