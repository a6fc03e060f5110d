"""The same-host fast path in the kernel: the tc BPF program built from
``calicnm/bpf/fastpath.bpf.c`` on the host side of every local container veth, and
its endpoint map.  The only module that runs ``bpftool`` and ``tc``.

What is pinned, under ``pin_dir`` (a directory on the BPF filesystem, one per node)::

    <digest>/prog            the program (its object's content names the directory)
    <digest>/calicnm_eps     address -> (ifindex, open group, container MAC, host MAC)
    <digest>/calicnm_stats   packets redirected, packets passed to the host's stack

A restarted node with the same object reuses what is pinned, map included, so nothing
the kernel does changes while the node is down.  A node started with another object
loads it beside the old one; a full apply attaches the program to every interface and
only then removes any other object's pins.

Invariants: the map holds an address only while the last plan (``profiles.
fast_path_plan``) did, with that plan's interface, MAC and group; every ``cali``
interface carries the program at ingress (with an empty plan the program passes
everything to the stack, where iptables decides).  Order within a pass: the
agent calls :meth:`FastPath.withdraw` before it writes the iptables chains, which only
deletes or corrects entries, and :meth:`FastPath.apply` after, which adds; so a pair
that stops being open leaves the fast path before the chains that now deny it are
written, and a new pair joins it only once the chains allowing it are in place.

Failure: any ``bpftool``/``tc`` failure raises ``DataplaneError``, what was written is
forgotten (the next apply reads the kernel again), and the agent's pass fails and says
so in its status, as for iptables.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from calicnm.errors import DataplaneError
from calicnm.profiles import IFACE_PREFIX, FastPathEntry

_log = logging.getLogger(__name__)

OBJECT = Path(__file__).resolve().parent.parent / "bpf" / "fastpath.bpf.o"
"""Where ``make deps`` builds the program (``clang --target=bpf``)."""
DEFAULT_PIN_DIR = Path("/sys/fs/bpf/calicnm")
BPF_FS = Path("/sys/fs/bpf")
ENDPOINTS_MAP = "calicnm_eps"
STATS_MAP = "calicnm_stats"
PROGRAM = "prog"
FILTER = ("pref", "1", "handle", "1")

MapValue = tuple[int, int, str, str]
"""ifindex, group, container MAC, host-side MAC."""


class Links(Protocol):
    def link_facts(self, prefix: str) -> dict[str, tuple[int, str]]: ...


def unavailable(obj: Path = OBJECT) -> str | None:
    """Why the fast path cannot run here, or None."""
    if not obj.exists():
        return f"the BPF object {obj} is not built (make deps builds it; needs clang)"
    for tool in ("bpftool", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install bpftool iproute2)"
    return None


def _mac_bytes(mac: str) -> list[str]:
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise DataplaneError(f"fast path: {mac!r} is not a MAC")
    try:
        return [f"{int(p, 16):02x}" for p in parts]
    except ValueError as exc:
        raise DataplaneError(f"fast path: {mac!r} is not a MAC") from exc


def key_hex(address: str) -> list[str]:
    """The map key: the IPv4 address in network order."""
    try:
        packed = socket.inet_aton(address)
    except OSError as exc:
        raise DataplaneError(f"fast path: {address!r} is not an IPv4 address") from exc
    return [f"{b:02x}" for b in packed]


def value_hex(value: MapValue) -> list[str]:
    ifindex, group, mac, host_mac = value
    head = struct.pack("<II", ifindex, group)
    return [f"{b:02x}" for b in head] + _mac_bytes(mac) + _mac_bytes(host_mac)


def _mac_text(octets: Iterable[Any]) -> str:
    return ":".join(f"{int(o):02x}" for o in octets)


class FastPath:
    """The fast path of one node: its pins under ``pin_dir``, the map as last written
    and the interfaces the program was attached to (both forgotten on any failure)."""

    def __init__(
        self,
        links: Links,
        pin_dir: Path = DEFAULT_PIN_DIR,
        obj: Path = OBJECT,
        timeout: float = 30.0,
    ) -> None:
        self._links = links
        self._root = pin_dir
        self._obj = obj
        self._timeout = timeout
        self._dir: Path | None = None
        self._written: dict[str, MapValue] | None = None
        self._attached: dict[str, int] = {}
        """interface -> ifindex the program was attached to (an interface recreated
        under the same name has a new ifindex and is attached again)."""

    # ---- commands ----

    def _run(self, argv: list[str]) -> str:
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=self._timeout, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise DataplaneError(f"fast path: {argv[0]} failed: {exc}") from exc
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip()[-400:]
            raise DataplaneError(f"fast path: {' '.join(argv[:4])} exited {proc.returncode}: {err}")
        return proc.stdout

    def _json(self, argv: list[str]) -> Any:
        out = self._run(["bpftool", "-j", *argv])
        try:
            return json.loads(out or "null")
        except ValueError as exc:
            raise DataplaneError(f"fast path: bpftool printed no JSON: {out[:200]!r}") from exc

    # ---- loading ----

    def _ensure_loaded(self) -> Path:
        """The pinned program's directory, loading the object if it is not pinned yet."""
        if self._dir is not None and (self._dir / PROGRAM).exists():
            return self._dir
        problem = unavailable(self._obj)
        if problem:
            raise DataplaneError(f"fast path: {problem}")
        self._mount_bpffs()
        digest = hashlib.sha256(self._obj.read_bytes()).hexdigest()[:16]
        where = self._root / digest
        if not (where / PROGRAM).exists():
            # Maps pinned by a load that failed before its program was: nothing uses
            # them, and bpftool would refuse to pin over them.
            shutil.rmtree(where, ignore_errors=True)
            where.mkdir(parents=True, exist_ok=True)
            self._run(
                [
                    "bpftool", "prog", "load", str(self._obj), str(where / PROGRAM),
                    "type", "classifier", "pinmaps", str(where),
                ]
            )  # fmt: skip
            _log.info("fast path: loaded %s at %s", self._obj.name, where)
        self._dir = where
        self._written = None
        self._attached = {}
        return where

    def _mount_bpffs(self) -> None:
        """Mount the BPF filesystem at /sys/fs/bpf if the pin directory is under it and
        nothing is mounted there (as Felix does)."""
        if not self._root.is_relative_to(BPF_FS) or _is_bpffs(BPF_FS):
            return
        BPF_FS.mkdir(parents=True, exist_ok=True)
        self._run(["mount", "-t", "bpf", "bpf", str(BPF_FS)])

    # ---- the map ----

    def _read_map(self, where: Path) -> dict[str, MapValue]:
        entries = self._json(["map", "dump", "pinned", str(where / ENDPOINTS_MAP)]) or []
        out: dict[str, MapValue] = {}
        for entry in entries:
            try:
                address = socket.inet_ntoa(_raw(entry["key"]))
                ifindex, group, mac, host_mac = struct.unpack("<II6s6s", _raw(entry["value"]))
                out[address] = (ifindex, group, _mac_text(mac), _mac_text(host_mac))
            except (KeyError, TypeError, ValueError, OSError, struct.error) as exc:
                raise DataplaneError(f"fast path: unreadable map entry {entry!r}") from exc
        return out

    def _write(self, where: Path, updates: Mapping[str, MapValue], deletes: Iterable[str]) -> None:
        path = str(where / ENDPOINTS_MAP)
        lines = [f"map delete pinned {path} key hex {' '.join(key_hex(a))}" for a in deletes]
        lines += [
            f"map update pinned {path} key hex {' '.join(key_hex(a))} "
            f"value hex {' '.join(value_hex(v))}"
            for a, v in sorted(updates.items())
        ]
        if not lines:
            return
        with tempfile.NamedTemporaryFile("w", prefix="calicnm-bpf-", suffix=".batch") as batch:
            batch.write("\n".join(lines) + "\n")
            batch.flush()
            self._run(["bpftool", "batch", "file", batch.name])

    def _desired(self, plan: Mapping[str, FastPathEntry]) -> dict[str, MapValue]:
        """The map the plan asks for, for the interfaces that exist (a veth not there
        yet joins on a later pass)."""
        facts = self._links.link_facts(IFACE_PREFIX)
        out: dict[str, MapValue] = {}
        for address, entry in plan.items():
            if entry.interface in facts:
                ifindex, host_mac = facts[entry.interface]
                out[address] = (ifindex, entry.group, entry.mac, host_mac)
        return out

    # ---- the agent's two calls ----

    def withdraw(self, plan: Mapping[str, FastPathEntry]) -> int:
        """Before the chains are written: delete every entry the plan no longer has,
        and every entry whose group or interface changed.  Returns how many."""
        try:
            where = self._ensure_loaded()
            current = self._written if self._written is not None else self._read_map(where)
            desired = self._desired(plan)
            stale = [a for a, v in current.items() if desired.get(a) != v]
            self._write(where, {}, stale)
            self._written = {a: v for a, v in current.items() if a not in stale}
            return len(stale)
        except Exception:
            self._written = None
            raise

    def apply(self, plan: Mapping[str, FastPathEntry], full: bool) -> int:
        """After the chains are written: add what the plan has, and attach the program
        to every ``cali`` interface (one whose address is in no entry is passed to the
        stack whole; attaching all of them also replaces an older program everywhere).
        A full apply reads the kernel's map and attachments instead of trusting memory.
        Returns the number of entries written."""
        try:
            where = self._ensure_loaded()
            current = self._read_map(where) if full or self._written is None else self._written
            desired = self._desired(plan)
            updates = {a: v for a, v in desired.items() if current.get(a) != v}
            stale = [a for a in current if a not in desired]
            self._write(where, updates, stale)
            self._written = desired
            self._attach(where, full)
            if full:
                self._remove_others(where)
            return len(updates) + len(stale)
        except Exception:
            self._written = None
            self._attached = {}
            raise

    def _attach(self, where: Path, full: bool) -> None:
        facts = self._links.link_facts(IFACE_PREFIX)
        if full:
            self._attached = self._attachments(where, facts)
        for name in sorted(facts):
            if self._attached.get(name) == facts[name][0]:
                continue
            self._run(["tc", "qdisc", "replace", "dev", name, "clsact"])
            self._run(
                ["tc", "filter", "replace", "dev", name, "ingress", *FILTER, "bpf", "da",
                 "object-pinned", str(where / PROGRAM)]
            )  # fmt: skip
            self._attached[name] = facts[name][0]
        self._attached = {n: i for n, i in self._attached.items() if n in facts}

    def _attachments(self, where: Path, facts: Mapping[str, tuple[int, str]]) -> dict[str, int]:
        """interface -> ifindex of the cali interfaces whose ingress runs our program."""
        prog = self._json(["prog", "show", "pinned", str(where / PROGRAM)])
        prog_id = prog.get("id") if isinstance(prog, dict) else None
        shown = self._json(["net", "show"]) or []
        out: dict[str, int] = {}
        for block in shown if isinstance(shown, list) else [shown]:
            for att in block.get("tc", []) if isinstance(block, dict) else []:
                name = att.get("devname")
                if (
                    name in facts
                    and att.get("kind") == "clsact/ingress"
                    and att.get("id") == prog_id
                ):
                    out[name] = facts[name][0]
        return out

    def _remove_others(self, keep: Path) -> None:
        """Unpin programs and maps of other objects (no interface uses them any more)."""
        for other in self._root.iterdir() if self._root.is_dir() else ():
            if other != keep and other.is_dir():
                shutil.rmtree(other, ignore_errors=True)
                _log.info("fast path: removed the old program at %s", other)

    # ---- reading and removing ----

    def stats(self) -> tuple[int, int]:
        """(packets redirected, packets passed to the stack) since the program loaded."""
        where = self._ensure_loaded()
        totals = [0, 0]
        for entry in self._json(["map", "dump", "pinned", str(where / STATS_MAP)]) or []:
            try:
                index = int.from_bytes(_raw(entry["key"]), "little")
                counts = [int.from_bytes(_raw(v["value"]), "little") for v in entry["values"]]
            except (KeyError, TypeError, ValueError) as exc:
                raise DataplaneError(f"fast path: unreadable counter {entry!r}") from exc
            if index in (0, 1):
                totals[index] = sum(counts)
        return totals[0], totals[1]

    def remove(self) -> None:
        """Detach any calicnm program from every cali interface and unpin everything,
        for a node that runs without the fast path.  It detaches whether or not its own
        pins are visible (a node in a container does not see the host's), since a
        program nobody keeps equal to policy must not stay attached.  Idempotent."""
        names = sorted(self._links.link_facts(IFACE_PREFIX))
        if names and shutil.which("tc") is None:
            _log.warning("fast path: tc is not installed; cannot check cali interfaces")
        elif names:
            lines = [f"filter del dev {n} ingress {' '.join(FILTER)} bpf" for n in names]
            with tempfile.NamedTemporaryFile("w", prefix="calicnm-tc-", suffix=".batch") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                # -force: go on past interfaces that carry no filter (those lines fail).
                try:
                    subprocess.run(
                        ["tc", "-force", "-batch", f.name],
                        capture_output=True,
                        timeout=self._timeout,
                        check=False,
                    )
                except (OSError, subprocess.SubprocessError) as exc:
                    raise DataplaneError(f"fast path: cannot detach programs: {exc}") from exc
        shutil.rmtree(self._root, ignore_errors=True)
        self._dir = None
        self._written = None
        self._attached = {}


def _raw(octets: Any) -> bytes:
    """bpftool's raw spelling of a key or value (a list of "0x.." strings) as bytes."""
    if not isinstance(octets, list):
        raise ValueError(f"not a byte list: {octets!r}")
    return bytes(int(str(o), 16) for o in octets)


def _is_bpffs(path: Path) -> bool:
    """Whether a BPF filesystem is mounted exactly at ``path``."""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            return any(
                len(f) > 2 and f[1] == str(path) and f[2] == "bpf"
                for f in (line.split() for line in mounts)
            )
    except OSError:
        return os.path.ismount(path)
