"""ipset through ``ipset restore``: the only module that runs ipset.

Every set name and member is checked here, just before the script is
written, whatever the compiler produced: a name that is not calicnm's or a
member that is not an address or network refuses the whole call.

A set is rewritten atomically: its members go into a temporary set of the
same type, which is then swapped with the live one and destroyed, all in
one ``ipset restore`` call, so a rule matching the set never sees it half
filled.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping

from calicnm.errors import DataplaneError

MAX_ELEMENTS = 1 << 20
_NAME_RE = re.compile(r"\Acalicnm-[A-Za-z0-9_.-]{1,23}\Z")
SET_TYPES = ("hash:ip", "hash:net")


class Ipsets:
    def __init__(self, timeout: float = 30.0, on_error: Callable[[], None] | None = None) -> None:
        """``on_error()`` is called for each ipset run that fails (metrics)."""
        binary = shutil.which("ipset")
        if binary is None:
            raise DataplaneError("ipset is not installed (apt-get install ipset)")
        self._ipset = binary
        self._timeout = timeout
        self._on_error = on_error or (lambda: None)

    def _run(self, args: list[str], script: str | None = None) -> str:
        try:
            proc = subprocess.run(
                [self._ipset, *args],
                input=script,
                capture_output=True,
                text=True,
                timeout=self._timeout,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            self._on_error()
            raise DataplaneError(f"ipset {args[0]} failed to run: {exc}") from exc
        if proc.returncode != 0:
            self._on_error()
            raise DataplaneError(f"ipset {args[0]} failed: {proc.stderr.strip()[:400]}")
        return proc.stdout

    def names(self, prefix: str) -> set[str]:
        return {n for n in self._run(["list", "-n"]).split() if n.startswith(prefix)}

    def read(self, prefix: str) -> dict[str, tuple[str, frozenset[str]]]:
        """Every set whose name starts with ``prefix``: ``name -> (type, members)``,
        in one ``ipset save``.  Members are spelt as the kernel prints them, with a
        ``hash:net`` /32 given its prefix length back, which is how ``replace``
        writes canonical members; a member spelt otherwise only makes its set
        look different, so the caller rewrites it.  A set of another type is
        read with its type and no members (it differs from any set calicnm
        wants)."""
        sets: dict[str, tuple[str, set[str]]] = {}
        for line in self._run(["save"]).splitlines():
            words = line.split()
            if len(words) < 3 or not words[1].startswith(prefix):
                continue
            if words[0] == "create":
                sets[words[1]] = (words[2], set())
            elif words[0] == "add" and words[1] in sets:
                kind, members = sets[words[1]]
                if kind == "hash:ip":
                    members.add(words[2])
                elif kind == "hash:net":
                    members.add(words[2] if "/" in words[2] else f"{words[2]}/32")
        return {name: (kind, frozenset(members)) for name, (kind, members) in sets.items()}

    def replace(self, sets: Mapping[str, tuple[str, str, Iterable[str]]]) -> None:
        """Rewrite each ``name -> (temp name, type, members)`` by swap, in one
        call; ``type`` is ``hash:ip`` (addresses) or ``hash:net`` (CIDRs)."""
        if not sets:
            return
        lines = []
        for name, (temp, kind, members) in sorted(sets.items()):
            if kind not in SET_TYPES:
                raise DataplaneError(f"refusing to create ipset {name} of type {kind!r}")
            _check_name(name)
            _check_name(temp)
            members = [_checked_member(m, kind, name) for m in members]
            create = f"{kind} family inet maxelem {MAX_ELEMENTS} -exist"
            lines += [f"create {name} {create}", f"create {temp} {create}", f"flush {temp}"]
            lines += [f"add {temp} {ip}" for ip in sorted(members)]
            lines += [f"swap {temp} {name}", f"destroy {temp}"]
        self._run(["restore"], "\n".join(lines) + "\n")

    def destroy(self, names: Iterable[str]) -> None:
        """Destroy sets no rule references any more (the caller made sure)."""
        lines = [f"destroy {_check_name(n)}" for n in sorted(names)]
        if lines:
            self._run(["restore"], "\n".join(lines) + "\n")


def _check_name(name: str) -> str:
    """Only calicnm's own sets, and only names ``ipset restore`` cannot
    misread: this is the last door before the script."""
    if not _NAME_RE.match(name):
        raise DataplaneError(f"refusing ipset name {name!r}: not a calicnm set")
    return name


def _checked_member(member: str, kind: str, name: str) -> str:
    """An IPv4 address (``hash:ip``) or network (``hash:net``), canonical."""
    try:
        if kind == "hash:ip":
            return str(ipaddress.IPv4Address(member))
        return str(ipaddress.IPv4Network(member, strict=False))
    except ValueError:
        raise DataplaneError(f"refusing member {member!r} of ipset {name}") from None
