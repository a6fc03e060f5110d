"""ipset through ``ipset restore``: the only module that runs ipset.

A set is rewritten atomically: its members go into a temporary set of the
same type, which is then swapped with the live one and destroyed, all in
one ``ipset restore`` call, so a rule matching the set never sees it half
filled.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Mapping

from calicnm.errors import DataplaneError

MAX_ELEMENTS = 1 << 20
SET_TYPES = ("hash:ip", "hash:net")


class Ipsets:
    def __init__(self, timeout: float = 30.0) -> None:
        binary = shutil.which("ipset")
        if binary is None:
            raise DataplaneError("ipset is not installed (apt-get install ipset)")
        self._ipset = binary
        self._timeout = timeout

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
            raise DataplaneError(f"ipset {args[0]} failed to run: {exc}") from exc
        if proc.returncode != 0:
            raise DataplaneError(f"ipset {args[0]} failed: {proc.stderr.strip()[:400]}")
        return proc.stdout

    def names(self, prefix: str) -> set[str]:
        return {n for n in self._run(["list", "-n"]).split() if n.startswith(prefix)}

    def replace(self, sets: Mapping[str, tuple[str, str, Iterable[str]]]) -> None:
        """Rewrite each ``name -> (temp name, type, members)`` by swap, in one
        call; ``type`` is ``hash:ip`` (addresses) or ``hash:net`` (CIDRs)."""
        if not sets:
            return
        lines = []
        for name, (temp, kind, members) in sorted(sets.items()):
            if kind not in SET_TYPES:
                raise DataplaneError(f"refusing to create ipset {name} of type {kind!r}")
            create = f"{kind} family inet maxelem {MAX_ELEMENTS} -exist"
            lines += [f"create {name} {create}", f"create {temp} {create}", f"flush {temp}"]
            lines += [f"add {temp} {ip}" for ip in sorted(members)]
            lines += [f"swap {temp} {name}", f"destroy {temp}"]
        self._run(["restore"], "\n".join(lines) + "\n")

    def destroy(self, names: Iterable[str]) -> None:
        """Destroy sets no rule references any more (the caller made sure)."""
        lines = [f"destroy {n}" for n in sorted(names)]
        if lines:
            self._run(["restore"], "\n".join(lines) + "\n")
