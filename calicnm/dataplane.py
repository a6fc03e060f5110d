"""Applying a compiled ``profiles.Dataplane`` to the kernel: the one writer
of calicnm's chains and ipsets on a host.

Order within one apply: ipsets first (a rule may not name a set that does
not exist yet), then one ``iptables-restore --noflush`` transaction that
rewrites every changed chain whole, keeps exactly one jump from each kernel
chain and deletes calicnm chains nobody wants any more, then the ipsets no
rule references any more are destroyed.

Incremental by default: chains and sets equal to what this process last
programmed are not rewritten, which keeps a rule change on a busy host to a
few small writes.  ``full=True`` (at start and on the resync timer) reads the
kernel's list of calicnm chains and jumps, and rewrites everything, which
repairs any drift (a chain flushed or deleted by hand, an ipset emptied).

If applying fails, what was programmed is forgotten, so the next apply is
a full one; the kernel keeps whatever it had (never flushed wholesale).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from calicnm.ipsets import Ipsets
from calicnm.iptables import Iptables, jump_fixups
from calicnm.profiles import JUMPS, PREFIX, Dataplane, temp_ipset

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyStats:
    chains_written: int
    chains_deleted: int
    sets_written: int
    sets_deleted: int


def kernel_chains(saved: str) -> set[str]:
    """Names of calicnm chains in ``iptables-save`` output."""
    return {line[1:].split()[0] for line in saved.splitlines() if line.startswith(f":{PREFIX}")}


class PolicyDataplane:
    def __init__(self, iptables: Iptables, ipsets: Ipsets) -> None:
        self._iptables = iptables
        self._ipsets = ipsets
        self._chains: dict[str, tuple[str, ...]] | None = None
        self._sets: dict[str, frozenset[str]] | None = None

    def apply(self, desired: Dataplane, full: bool = False) -> ApplyStats:
        try:
            return self._apply(desired, full or self._chains is None)
        except Exception:
            self._chains = None
            self._sets = None
            raise

    def _apply(self, desired: Dataplane, full: bool) -> ApplyStats:
        old_sets = {} if full or self._sets is None else self._sets
        sets = {
            name: (temp_ipset(name), members)
            for name, members in desired.ipsets.items()
            if old_sets.get(name) != members
        }
        self._ipsets.replace(sets)

        old_chains = {} if full or self._chains is None else self._chains
        changed = {n: r for n, r in desired.chains.items() if old_chains.get(n) != r}
        fixups: list[str] = []
        if full:
            saved = self._iptables.save("filter")
            present = kernel_chains(saved)
            for parent, chain in JUMPS:
                fixups += jump_fixups(saved, parent, chain)
        else:
            present = set(old_chains)
        stale = sorted(present - set(desired.chains))
        if changed or fixups or stale:
            lines = ["*filter"]
            lines += [f":{name} - [0:0]" for name in changed]
            lines += [f":{name} - [0:0]" for name in stale]
            for name, rules in changed.items():
                lines += [f"-A {name} {rule}" for rule in rules]
            lines += fixups
            lines += [f"-X {name}" for name in stale]
            lines.append("COMMIT")
            self._iptables.restore("\n".join(lines) + "\n")

        unused: set[str] = set()
        if full:
            unused = self._ipsets.names(PREFIX) - set(desired.ipsets)
        elif self._sets is not None:
            unused = set(self._sets) - set(desired.ipsets)
        self._ipsets.destroy(unused)

        self._chains = dict(desired.chains)
        self._sets = dict(desired.ipsets)
        stats = ApplyStats(len(changed), len(stale), len(sets), len(unused))
        if changed or stale or sets or unused:
            _log.info(
                "dataplane applied full=%s chains_written=%d chains_deleted=%d sets_written=%d "
                "sets_deleted=%d",
                full,
                *stats.__dict__.values(),
            )
        return stats
