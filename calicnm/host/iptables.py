"""iptables through ``iptables-restore``: the only module that runs it.

Why not python-iptables: libiptc only writes the *legacy* tables, and on a
host whose ``iptables`` is the nf_tables backend (Debian 12's default, and
dockerd's) those rules are invisible to ``iptables -S`` and interleave
unpredictably with Docker's.  calicnm instead drives the same backend as the
host's own ``iptables`` command, with whole-chain ``iptables-restore
--noflush`` transactions (atomic per table, one process per change, never
one process per rule) and ``--wait`` for the xtables lock.

calicnm owns every chain whose name starts with ``calicnm-`` and touches
nothing else except the single jump rules it inserts into kernel chains.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from calicnm.errors import DataplaneError

_log = logging.getLogger(__name__)

CHAIN_PREFIX = "calicnm-"
MAX_CHAIN_NAME = 28
_JUMP_RE = re.compile(r"\A-(D [A-Z][A-Z_-]*|I [A-Z][A-Z_-]* [0-9]+) -j [A-Za-z0-9_-]{1,28}\Z")
"""The only jump lines a script may carry: insert or delete an unconditional
jump from a kernel chain (``FORWARD``, ``POSTROUTING`` ...)."""


@dataclass(frozen=True)
class Backend:
    name: str  # "nf_tables" or "legacy"
    save: str
    restore: str
    iptables: str


BACKEND_CHOICES = ("host", "auto", "nft", "legacy")
"""How the node picks the iptables backend (setting ``CALICNM_IPTABLES_BACKEND``):
``host``, the backend of this system's ``iptables`` command; ``auto``, the
backend that already holds more rules (dockerd's), as Felix's ``auto`` does,
for a node in a container whose ``iptables`` need not be the host's; or
``nft``/``legacy`` by name."""


def _binary(suffix: str, tool: str) -> str | None:
    return shutil.which(f"iptables-{suffix}{tool}")


def _backend(name: str) -> Backend:
    suffix = "legacy" if name == "legacy" else "nft"
    binary = _binary(suffix, "")
    save, restore = _binary(suffix, "-save"), _binary(suffix, "-restore")
    if binary is None or save is None or restore is None:
        raise DataplaneError(f"iptables-{suffix} is not installed (apt-get install iptables)")
    return Backend(name, save, restore, binary)


def _rule_count(save: str) -> int:
    """Rules the backend of ``save`` holds now; -1 when it cannot tell."""
    try:
        out = subprocess.run([save], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return -1
    return sum(1 for line in out.splitlines() if line.startswith("-A "))


def detect_backend(choice: str = "host") -> Backend:
    """The backend for ``choice`` (one of :data:`BACKEND_CHOICES`).

    ``auto`` reads both backends' rules once and takes legacy only when it
    holds more rules than nf_tables; on a tie it falls back to ``host``.
    DataplaneError when the tools are missing or ``choice`` is unknown."""
    if choice not in BACKEND_CHOICES:
        raise DataplaneError(
            f"iptables backend {choice!r} is not one of {', '.join(BACKEND_CHOICES)}"
        )
    if choice in ("nft", "legacy"):
        return _backend("nf_tables" if choice == "nft" else "legacy")
    if choice == "auto":
        legacy_save, nft_save = _binary("legacy", "-save"), _binary("nft", "-save")
        if legacy_save is not None and nft_save is not None:
            legacy, nft = _rule_count(legacy_save), _rule_count(nft_save)
            if legacy != nft:
                return _backend("legacy" if legacy > nft else "nf_tables")
    iptables = shutil.which("iptables")
    if iptables is None:
        raise DataplaneError("iptables is not installed (apt-get install iptables)")
    try:
        version = subprocess.run(
            [iptables, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise DataplaneError(f"cannot run iptables --version: {exc}") from exc
    name = "legacy" if "legacy" in version else "nf_tables"
    suffix = "legacy" if name == "legacy" else "nft"
    save = _binary(suffix, "-save") or "iptables-save"
    restore = _binary(suffix, "-restore") or "iptables-restore"
    binary = _binary(suffix, "") or iptables
    return Backend(name, save, restore, binary)


class Iptables:
    def __init__(
        self,
        backend: Backend | None = None,
        timeout: float = 30.0,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        """``on_error()`` is called for each restore that fails (metrics)."""
        self.backend = backend or detect_backend()
        self._timeout = timeout
        self._on_error = on_error or (lambda: None)

    def restore(self, text: str) -> None:
        """Apply a restore script atomically (per table), waiting for the lock."""
        argv = [self.backend.restore, "--noflush", "--wait", "10"]
        try:
            proc = subprocess.run(
                argv, input=text, capture_output=True, text=True, timeout=self._timeout
            )
        except (OSError, subprocess.SubprocessError) as exc:
            self._on_error()
            raise DataplaneError(f"{argv[0]} failed to run: {exc}") from exc
        if proc.returncode != 0:
            self._on_error()
            raise DataplaneError(f"{argv[0]} rejected the update: {proc.stderr.strip()[:400]}")

    def save(self, table: str = "filter") -> str:
        argv = [self.backend.save, "-t", table]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self._timeout)
        except (OSError, subprocess.SubprocessError) as exc:
            raise DataplaneError(f"{argv[0]} failed to run: {exc}") from exc
        if proc.returncode != 0:
            raise DataplaneError(f"{argv[0]} failed: {proc.stderr.strip()[:400]}")
        return proc.stdout

    def first_rule(self, table: str, chain: str) -> str | None:
        """Rule 1 of ``chain`` as ``iptables -S`` prints it ("" for an empty
        chain), or None when the chain does not exist.  One short process:
        cheap enough to ask every second."""
        argv = [self.backend.iptables, "-w", "10", "-t", table, "-S", chain, "1"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self._timeout)
        except (OSError, subprocess.SubprocessError) as exc:
            raise DataplaneError(f"{argv[0]} failed to run: {exc}") from exc
        if proc.returncode != 0:
            return None
        return proc.stdout.strip()


def restore_script(
    table: str,
    write: dict[str, tuple[str, ...]],
    jumps: Sequence[str] = (),
    delete: Sequence[str] = (),
) -> str:
    """One ``iptables-restore --noflush`` transaction for ``table``.

    Each chain in ``write`` is rewritten whole: ``:<chain> - [0:0]`` creates
    or flushes it in the same transaction that appends its rules, so a
    reader never sees it half written.  ``jumps`` (inserts or deletes of our
    jumps from kernel chains) follow, then each chain in ``delete`` is
    flushed and deleted.

    This is the only place a restore script is built, and it refuses (with
    ``DataplaneError``, before anything runs) a chain name that is not
    calicnm's, a rule body holding a line break, and a jump line that does
    anything but insert or delete an unconditional jump to a calicnm chain:
    whatever the compiler was given, the script can only touch calicnm's
    own chains.
    """
    for name in (*write, *delete):
        _check_chain(name)
    for name, rules in write.items():
        for rule in rules:
            if any(c in rule for c in "\n\r\0"):
                raise DataplaneError(f"refusing a rule for {name} that holds a line break")
    for line in jumps:
        if not _JUMP_RE.match(line) or not line.split()[-1].startswith(CHAIN_PREFIX):
            raise DataplaneError(f"refusing jump line {line!r}: not a jump to a calicnm chain")
    lines = [f"*{table}"]
    lines += [f":{name} - [0:0]" for name in write]
    lines += [f":{name} - [0:0]" for name in delete]
    for name, rules in write.items():
        lines += [f"-A {name} {rule}" for rule in rules]
    lines += list(jumps)
    lines += [f"-X {name}" for name in delete]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _check_chain(name: str) -> None:
    if (
        not name.startswith(CHAIN_PREFIX)
        or len(name) > MAX_CHAIN_NAME
        or not all(c.isalnum() or c in "-_" for c in name)
    ):
        raise DataplaneError(f"refusing to write chain {name!r}: not a calicnm chain name")


def kernel_chains(saved: str) -> set[str]:
    """Names of calicnm chains in ``iptables-save`` output."""
    return {
        line[1:].split()[0] for line in saved.splitlines() if line.startswith(f":{CHAIN_PREFIX}")
    }


def chain_rules(saved: str) -> dict[str, tuple[str, ...]]:
    """Each calicnm chain in ``iptables-save`` output with its rule lines, in
    order and as printed (``-A <chain> ...``); an empty chain has none."""
    rules: dict[str, list[str]] = {name: [] for name in kernel_chains(saved)}
    for line in saved.splitlines():
        if line.startswith(f"-A {CHAIN_PREFIX}"):
            name = line.split(maxsplit=2)[1]
            if name in rules:
                rules[name].append(line.rstrip())
    return {name: tuple(lines) for name, lines in rules.items()}


def jump_removals(saved: str, parent: str, chain: str) -> list[str]:
    """Lines that delete every one of our ``-j chain`` jumps from ``parent``."""
    rule = f"-A {parent} -j {chain}"
    count = sum(1 for line in saved.splitlines() if line.strip() == rule)
    return [f"-D {parent} -j {chain}"] * count


def jump_fixups(saved: str, parent: str, chain: str) -> list[str]:
    """Lines that leave exactly one ``-j chain``, as rule 1 of ``parent``.

    Reads back only our own unconditional jump (a rule iptables cannot
    normalise differently).  If it is already the one and only copy and the
    first rule, nothing is needed; otherwise every copy is deleted and one is
    inserted at the top, in the same transaction, so no packet sees the
    chain without it.
    """
    rule = f"-A {parent} -j {chain}"
    rules = [line.strip() for line in saved.splitlines() if line.startswith(f"-A {parent} ")]
    copies = rules.count(rule)
    if copies == 1 and rules[0] == rule:
        return []
    return [f"-D {parent} -j {chain}"] * copies + [f"-I {parent} 1 -j {chain}"]


def has_chain(saved: str, chain: str) -> bool:
    """Does ``iptables-save`` output declare ``chain``?"""
    return any(line.startswith(f":{chain} ") for line in saved.splitlines())
