"""Test harness for end-to-end tests: throwaway network namespaces, an L2 fabric, dockerds.

Everything here is pure standard library plus ``subprocess`` calls to ``ip``, ``nsenter``,
``unshare``, ``dockerd`` and the Debian docker client.  It must run as root.

Global invariants
-----------------
* Every name this module creates (network namespaces, interfaces, temp dirs, cgroups) starts
  with ``cnmt`` and every kernel name is at most 15 characters long.
* Nothing is ever created in, or sent to, the root network namespace: hosts and the fabric
  live in their own namespaces, veth pairs are created directly between those namespaces, and
  the only addresses involved are ``198.18.0.0/24`` inside the fabric and loopback.
* Every object is a context manager.  ``__enter__`` either fully succeeds or undoes whatever
  it already did and re-raises.  ``__exit__`` always runs every cleanup step, even if earlier
  steps fail; failures are logged (logger ``tests.harness``) and collected.  If the ``with``
  body raised, cleanup errors are only logged, so the original error is never masked;
  otherwise they are raised at the end as one :class:`TeardownError`.
* Every wait is bounded.  A process that does not exit after ``SIGKILL`` within the bound is
  reported as a cleanup error rather than waited on forever.
* After teardown nothing is left: namespaces deleted (which destroys their veths, bridges and
  iptables state), every process started in them killed (dockerd, its containerd, the
  containerd shims and the container processes, which live in namespaces of their own),
  container cgroups removed, temp dirs removed.  dockerd runs in a private mount namespace,
  so its mounts vanish with its processes; it runs under a subreaper wrapper, so its
  double-forked shims are reaped too instead of lingering as zombies under PID 1 (only if the
  wrapper itself is SIGKILLed do killed processes stay zombies until PID 1 reaps them,
  ~2 s on this VM).  The only host paths that may be created (empty,
  and deliberately kept because concurrent sessions share them) are the mount points
  ``/run/docker/plugins`` and ``/run/containerd``, plus ``/run/netns`` made by ``ip netns``.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = [
    "DEFAULT_IMAGE",
    "DOCKER_CLIENT",
    "FABRIC_ADDRESS",
    "FABRIC_PREFIXLEN",
    "Attachment",
    "CommandError",
    "DockerHost",
    "Fabric",
    "HarnessError",
    "Netns",
    "Process",
    "TeardownError",
    "busybox_rootfs_tar",
    "pids_with_arg",
    "unique_name",
]

_log = logging.getLogger("tests.harness")

NAME_PREFIX = "cnmt"
"""Every name created by this harness starts with this."""
IFNAMSIZ_MAX = 15
"""Longest Linux interface / namespace name this harness produces."""
DOCKER_CLIENT = "/usr/bin/docker"
"""The Debian 20.10 client; newer clients refuse to talk to the 20.10 daemon."""
DOCKERD = "dockerd"
DEFAULT_IMAGE = "calicnm-test/busybox:1"
FABRIC_ADDRESS = "198.18.0.1"
FABRIC_PREFIXLEN = 24
FABRIC_BRIDGE = "br0"
_FABRIC_NET = "198.18.0"
_HOST_PLUGIN_DIR = Path("/run/docker/plugins")
_HOST_CONTAINERD_RUN = Path("/run/containerd")
_NETNS_DIR = Path("/run/netns")
_SUN_PATH_MAX = 107
_KILL_TIMEOUT = 10.0


# --------------------------------------------------------------------------------------------
# errors


class HarnessError(RuntimeError):
    """The harness could not set something up, or could not prove something was torn down."""


class CommandError(subprocess.CalledProcessError):
    """A command exited non-zero; ``str()`` includes the tails of its stdout and stderr."""

    def __str__(self) -> str:
        text = super().__str__()
        for label, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                body = data if isinstance(data, str) else data.decode(errors="replace")
                text += f"\n--- {label} (tail) ---\n{body[-2000:]}"
        return text


class TeardownError(ExceptionGroup[Exception]):
    """One or more cleanup steps failed; every step was still attempted."""


class _Cleanup:
    """Runs cleanup steps, never letting one failure stop the later steps.

    Invariant: :meth:`step` never raises an ``Exception``; failures are logged with traceback
    and kept.  :meth:`finish` raises :class:`TeardownError` with all of them iff
    ``raise_errors`` is true and at least one step failed.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.errors: list[Exception] = []

    def step(self, desc: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:
            _log.error("%s: cleanup step %r failed: %s", self.what, desc, exc, exc_info=True)
            exc.add_note(f"{self.what}: while {desc}")
            self.errors.append(exc)

    def finish(self, raise_errors: bool) -> None:
        if self.errors and raise_errors:
            raise TeardownError(
                f"{self.what}: {len(self.errors)} cleanup step(s) failed", self.errors
            )


# --------------------------------------------------------------------------------------------
# names and small helpers

_name_lock = threading.Lock()
_issued: set[str] = set()
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_SUFFIX_LEN = 6


def unique_name(prefix: str = NAME_PREFIX) -> str:
    """Return a fresh name ``<prefix><6 random [a-z0-9]>`` of at most 15 characters.

    ``prefix`` is forced to start with ``cnmt`` (prepended if missing) so every harness
    object is recognisable.  The name is unique within this process and, with 36**6 random
    choices, also checked against existing ``/run/netns`` entries and interfaces of the root
    namespace.  Raises ``ValueError`` if the prefix is too long or has characters other than
    ``[a-z0-9-]``.
    """
    if not prefix.startswith(NAME_PREFIX):
        prefix = NAME_PREFIX + prefix
    if len(prefix) + _SUFFIX_LEN > IFNAMSIZ_MAX:
        raise ValueError(f"prefix {prefix!r} too long: names must be <= {IFNAMSIZ_MAX} chars")
    if any(c not in _ALPHABET + "-" for c in prefix):
        raise ValueError(f"prefix {prefix!r} must match [a-z0-9-]*")
    with _name_lock:
        for _ in range(100):
            name = prefix + "".join(secrets.choice(_ALPHABET) for _ in range(_SUFFIX_LEN))
            if name in _issued or (_NETNS_DIR / name).exists():
                continue
            if Path("/sys/class/net", name).exists():
                continue
            _issued.add(name)
            return name
    raise HarnessError(f"could not find a free name with prefix {prefix!r}")


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` in text mode with captured output; raises :class:`CommandError`.

    On timeout the child is killed by ``subprocess.run`` and ``TimeoutExpired`` propagates.
    """
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=dict(env) if env is not None else None,
        check=False,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def _tail(path: Path, n: int) -> str:
    """Last ``n`` lines of ``path`` (empty string if it does not exist)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            data = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-n:])


def _rmtree(path: Path) -> None:
    """Remove ``path`` recursively if it exists; raise if anything is left."""
    if path.exists() or path.is_symlink():
        shutil.rmtree(path)


# --------------------------------------------------------------------------------------------
# process table


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """``(ppid, state)`` of ``pid`` from ``/proc``, or ``None`` if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def _is_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (zombies hold no resources)."""
    st = _proc_stat(pid)
    return st is not None and st[1] not in ("Z", "X")


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _descendants(roots: Iterable[int]) -> set[int]:
    """``roots`` plus every (transitive) child of them, from one scan of ``/proc``."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st is not None:
            children.setdefault(st[0], []).append(pid)
    result: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in result:
            continue
        result.add(pid)
        todo.extend(children.get(pid, ()))
    return result


def _protected_pids() -> set[int]:
    """This process and its ancestors: never killed, whatever a scan returns."""
    out: set[int] = set()
    pid = os.getpid()
    for _ in range(256):
        if pid <= 1 or pid in out:
            break
        out.add(pid)
        st = _proc_stat(pid)
        if st is None:
            break
        pid = st[0]
    out.add(1)
    return out


def _kill_until_gone(
    targets: Callable[[], set[int]], what: str, timeout: float = _KILL_TIMEOUT
) -> None:
    """SIGKILL everything ``targets()`` returns, rescanning, until nothing is alive.

    ``targets`` is re-evaluated each round so processes forked during the kill are caught.
    At most 20 rounds and ``timeout`` seconds; raises :class:`HarnessError` listing the
    survivors otherwise.  Zombies count as gone.
    """
    protected = _protected_pids()
    deadline = time.monotonic() + timeout
    alive: set[int] = set()
    for _ in range(20):
        alive = {p for p in targets() - protected if _is_alive(p)}
        if not alive:
            return
        _log.info("%s: SIGKILL %s", what, sorted(alive))
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        round_end = min(deadline, time.monotonic() + 1.0)
        while time.monotonic() < round_end and any(_is_alive(p) for p in alive):
            time.sleep(0.05)
        if time.monotonic() >= deadline:
            break
    alive = {p for p in targets() - protected if _is_alive(p)}
    if alive:
        desc = {p: " ".join(_cmdline(p))[:200] for p in sorted(alive)}
        raise HarnessError(f"{what}: processes survived SIGKILL for {timeout}s: {desc}")


def pids_with_arg(needle: str) -> list[int]:
    """Live (non-zombie) pids having an argv element that equals or contains ``needle``."""
    return sorted(
        pid for pid in _all_pids() if any(needle in arg for arg in _cmdline(pid)) and _is_alive(pid)
    )


# --------------------------------------------------------------------------------------------
# network namespaces


class Netns:
    """A named network namespace (``ip netns add``) with ``lo`` up.

    Invariants: while created, ``/run/netns/<name>`` exists and ``lo`` is up.  :meth:`delete`
    kills every process in the namespace (plus all their descendants, which catches container
    processes living in child namespaces) and then deletes it; it is idempotent.  Commands run
    via ``nsenter --net=/run/netns/<name>`` so they keep the caller's mount namespace (unlike
    ``ip netns exec``, which remounts ``/sys``).
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name or unique_name(NAME_PREFIX)
        if len(self.name) > IFNAMSIZ_MAX:
            raise ValueError(f"netns name {self.name!r} longer than {IFNAMSIZ_MAX}")
        self.created = False

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @property
    def path(self) -> Path:
        """The nsfs bind mount ``/run/netns/<name>``."""
        return _NETNS_DIR / self.name

    def exists(self) -> bool:
        return self.path.exists()

    def create(self) -> Self:
        """Create the namespace and bring ``lo`` up; on failure nothing is left behind."""
        _run(["ip", "netns", "add", self.name])
        self.created = True
        try:
            self.run(["ip", "link", "set", "lo", "up"])
        except BaseException:
            self.delete(raise_errors=False)
            raise
        return self

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside this namespace."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace (text mode, output captured).

        Raises :class:`CommandError` on non-zero exit if ``check``; on timeout the command is
        killed and ``subprocess.TimeoutExpired`` propagates.
        """
        return _run(self.wrap(argv), check=check, timeout=timeout, input=input, env=env)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` of ``argv`` inside the namespace; the caller must reap it."""
        return subprocess.Popen(self.wrap(argv), **kw)

    def process(self, argv: Sequence[str], log_path: str | os.PathLike[str], **kw: Any) -> Process:
        """A not-yet-started :class:`Process` running ``argv`` in this namespace."""
        return Process(argv, log_path, netns=self, **kw)

    def pids(self) -> list[int]:
        """Pids whose network namespace is this one (``ip netns pids``); [] if none/absent."""
        if not self.exists():
            return []
        out = _run(["ip", "netns", "pids", self.name], timeout=30).stdout
        return [int(tok) for tok in out.split()]

    def kill_all(self, timeout: float = _KILL_TIMEOUT) -> None:
        """SIGKILL every process in the namespace and all their descendants, bounded.

        Raises :class:`HarnessError` if some survive ``timeout`` seconds.
        """
        _kill_until_gone(lambda: _descendants(self.pids()), f"netns {self.name}", timeout)

    def delete(self, raise_errors: bool = True) -> None:
        """Kill all processes in it, then delete the namespace.  Idempotent.

        All steps are attempted; failures raise :class:`TeardownError` at the end if
        ``raise_errors`` (otherwise they are only logged).
        """
        cleanup = _Cleanup(f"netns {self.name}")
        if self.exists():
            cleanup.step("killing processes", self.kill_all)
            cleanup.step("ip netns del", lambda: _run(["ip", "netns", "del", self.name]))
        self.created = False
        cleanup.finish(raise_errors)

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete(raise_errors=exc_type is None)


# --------------------------------------------------------------------------------------------
# long running processes


class Process:
    """A long-running command in its own session/process group, output to a log file.

    Invariants: stdin is ``/dev/null``; stdout and stderr are appended to ``log_path``; the
    child is a session leader, so ``pgid == pid``.  :meth:`stop` signals the whole group,
    escalates to SIGKILL after ``timeout``, SIGKILLs any group members left after the leader
    died (checked before the leader is reaped, so the pgid cannot be recycled meanwhile), and
    reaps the leader.  It is idempotent and bounded; it raises :class:`HarnessError` only if
    the leader survives SIGKILL.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: str | os.PathLike[str],
        *,
        netns: Netns | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.netns = netns
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        self._popen: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"Process({self.name!r}, pid={self.pid if self._popen else None})"

    def start(self) -> Self:
        """Start the command; raises if already started."""
        if self._popen is not None:
            raise HarnessError(f"{self.name}: already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = self.netns.wrap(self.argv) if self.netns is not None else self.argv
        with self.log_path.open("ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} start: {argv}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise HarnessError(f"{self.name}: not started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.returncode

    def poll(self) -> int | None:
        """Exit status if it exited (reaping it), else ``None``."""
        return None if self._popen is None else self._popen.poll()

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def wait(self, timeout: float) -> int:
        """Wait for exit; raises ``subprocess.TimeoutExpired`` after ``timeout``."""
        if self._popen is None:
            raise HarnessError(f"{self.name}: not started")
        return self._popen.wait(timeout=timeout)

    def _exited_unreaped(self) -> bool:
        """True if the leader exited; leaves it a zombie so its pgid stays reserved."""
        assert self._popen is not None
        if self._popen.returncode is not None:
            return True
        try:
            res = os.waitid(os.P_PID, self._popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return res is not None

    def _wait_unreaped(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self._exited_unreaped():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _killpg(self, sig: int) -> None:
        assert self._popen is not None
        if self._popen.returncode is not None:
            return  # reaped: the pgid may belong to someone else now
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Signal the group with ``sig``; SIGKILL after ``timeout``; return the exit status.

        Returns ``None`` if never started.  Bounded by ``timeout + ~10 s``.
        """
        if self._popen is None:
            return None
        if self._popen.returncode is None:
            self._killpg(sig)
            if not self._wait_unreaped(timeout):
                _log.warning("%s: no exit %.0fs after signal %d, SIGKILL", self.name, timeout, sig)
                self._killpg(signal.SIGKILL)
                if not self._wait_unreaped(_KILL_TIMEOUT):
                    raise HarnessError(f"{self.name} (pid {self.pid}) survived SIGKILL")
            self._killpg(signal.SIGKILL)  # stragglers left in the group
        try:
            return self._popen.wait(timeout=_KILL_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"{self.name} (pid {self.pid}) could not be reaped") from exc

    def log_tail(self, n: int = 50) -> str:
        """The last ``n`` lines of the log file."""
        return _tail(self.log_path, n)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        cleanup = _Cleanup(f"process {self.name}")
        cleanup.step("stop", self.stop)
        cleanup.finish(raise_errors=exc_type is None)


# --------------------------------------------------------------------------------------------
# fabric


@dataclass(frozen=True)
class Attachment:
    """One host's link into the fabric."""

    host: Netns
    ifname: str
    """Host-side interface name (``eth0`` by default)."""
    address: str
    """Host address without prefix length, e.g. ``198.18.0.2``."""
    cidr: str
    """Host address with prefix length, e.g. ``198.18.0.2/24``."""
    gateway: str
    fabric_ifname: str
    """Name of the veth end enslaved to the fabric bridge (inside the fabric netns)."""


class Fabric:
    """A namespace acting as the L2 underlay: bridge ``br0`` holding ``198.18.0.1/24``.

    Invariants: ``net.ipv4.ip_forward=0`` (and IPv6 forwarding off) in the fabric namespace,
    so the fabric never routes anything anywhere: packets a host sends to its default gateway
    (the fabric address) for unknown destinations end here and are dropped.  Hosts on the
    fabric reach each other directly on L2.  Host addresses are handed out as 198.18.0.2, .3,
    ... in attach order.  Hosts made with :meth:`add_host` are owned by the fabric and deleted
    by :meth:`close` (before the fabric itself); hosts passed to :meth:`attach` stay owned by
    the caller (their veth disappears when either namespace is deleted).
    """

    def __init__(self, name: str | None = None) -> None:
        self.netns = Netns(name or unique_name(NAME_PREFIX + "f"))
        self.attachments: list[Attachment] = []
        self._owned_hosts: list[Netns] = []
        self._next_host = 2

    @property
    def address(self) -> str:
        return FABRIC_ADDRESS

    def create(self) -> Self:
        """Create the namespace, bridge and address; on failure nothing is left behind."""
        self.netns.create()
        try:
            run = self.netns.run
            run(["ip", "link", "add", FABRIC_BRIDGE, "type", "bridge"])
            run(["ip", "addr", "add", f"{FABRIC_ADDRESS}/{FABRIC_PREFIXLEN}", "dev", FABRIC_BRIDGE])
            run(["ip", "link", "set", FABRIC_BRIDGE, "up"])
            run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
            run(["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=0"])
            got = run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
            if got != "0":
                raise HarnessError(f"fabric {self.netns.name}: ip_forward is {got!r}")
        except BaseException:
            self.netns.delete(raise_errors=False)
            raise
        return self

    def next_address(self) -> str:
        """Allocate the next free host address (``198.18.0.N/24``)."""
        if self._next_host > 254:
            raise HarnessError("fabric out of host addresses")
        cidr = f"{_FABRIC_NET}.{self._next_host}/{FABRIC_PREFIXLEN}"
        self._next_host += 1
        return cidr

    def attach(
        self,
        host_netns: Netns,
        address_cidr: str | None = None,
        gateway_ip: str | None = FABRIC_ADDRESS,
        ifname: str = "eth0",
    ) -> Attachment:
        """Link ``host_netns`` to the fabric with a veth pair.

        The host end is named ``ifname``, gets ``address_cidr`` (allocated by
        :meth:`next_address` if ``None``) and is up; if ``gateway_ip`` is not ``None`` a
        default route via it is added.  The other end is enslaved to ``br0``.  On failure the
        veth pair is removed again and the error re-raised.
        """
        cidr = address_cidr or self.next_address()
        fab_if = unique_name(NAME_PREFIX + "v")
        tmp_if = unique_name(NAME_PREFIX + "h")
        run = self.netns.run
        run(
            [
                "ip",
                "link",
                "add",
                fab_if,
                "type",
                "veth",
                "peer",
                "name",
                tmp_if,
                "netns",
                host_netns.name,
            ]
        )
        try:
            run(["ip", "link", "set", fab_if, "master", FABRIC_BRIDGE])
            run(["ip", "link", "set", fab_if, "up"])
            hrun = host_netns.run
            hrun(["ip", "link", "set", tmp_if, "name", ifname])
            hrun(["ip", "addr", "add", cidr, "dev", ifname])
            hrun(["ip", "link", "set", ifname, "up"])
            if gateway_ip is not None:
                hrun(["ip", "route", "add", "default", "via", gateway_ip, "dev", ifname])
        except BaseException:
            _run(["ip", "-n", self.netns.name, "link", "del", fab_if], check=False)
            raise
        att = Attachment(
            host=host_netns,
            ifname=ifname,
            address=cidr.split("/")[0],
            cidr=cidr,
            gateway=gateway_ip or "",
            fabric_ifname=fab_if,
        )
        self.attachments.append(att)
        return att

    def add_host(self, name: str | None = None, address_cidr: str | None = None) -> Attachment:
        """Create a new host namespace owned by the fabric and attach it; see :meth:`attach`."""
        host = Netns(name).create()
        self._owned_hosts.append(host)
        try:
            return self.attach(host, address_cidr)
        except BaseException:
            self._owned_hosts.remove(host)
            host.delete(raise_errors=False)
            raise

    def close(self, raise_errors: bool = True) -> None:
        """Delete owned hosts (newest first), then the fabric namespace.  Idempotent."""
        cleanup = _Cleanup(f"fabric {self.netns.name}")
        while self._owned_hosts:
            host = self._owned_hosts.pop()
            cleanup.step(f"deleting host {host.name}", host.delete)
        cleanup.step("deleting fabric netns", self.netns.delete)
        cleanup.finish(raise_errors)

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_errors=exc_type is None)


# --------------------------------------------------------------------------------------------
# busybox image

_rootfs_lock = threading.Lock()
_rootfs_tar: Path | None = None


def _remove_rootfs_cache() -> None:
    if _rootfs_tar is not None:
        shutil.rmtree(_rootfs_tar.parent, ignore_errors=True)


def busybox_rootfs_tar() -> Path:
    """Path of a tarball: static ``/bin/busybox`` plus a symlink per applet.

    Built once per Python process in a ``cnmt-img-*`` temp dir that is removed at exit.
    Raises :class:`HarnessError` if ``/bin/busybox`` is missing or not static.
    """
    global _rootfs_tar
    with _rootfs_lock:
        if _rootfs_tar is not None and _rootfs_tar.exists():
            return _rootfs_tar
        src = Path("/bin/busybox")
        if not src.exists():
            raise HarnessError("/bin/busybox missing (apt-get install busybox-static)")
        applets = _run([str(src), "--list-full"]).stdout.split()
        if "bin/sh" not in applets:
            raise HarnessError("/bin/busybox has no sh applet; is it busybox-static?")
        tmpdir = Path(tempfile.mkdtemp(prefix="cnmt-img-"))
        tar_path = tmpdir / "busybox-rootfs.tar"

        def add_dir(tf: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 0
            tf.addfile(info)

        def add_file(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tf.addfile(info, io.BytesIO(data))

        try:
            with tarfile.open(tar_path, "w") as tf:
                for d in (
                    "bin",
                    "sbin",
                    "usr",
                    "usr/bin",
                    "usr/sbin",
                    "etc",
                    "proc",
                    "sys",
                    "dev",
                    "root",
                    "var",
                    "run",
                    "www",
                ):
                    add_dir(tf, d)
                add_dir(tf, "tmp", 0o1777)
                add_file(tf, "bin/busybox", src.read_bytes(), 0o755)
                for applet in applets:
                    if applet in ("bin/busybox", "linuxrc"):
                        continue
                    info = tarfile.TarInfo(applet)
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, "/bin/busybox", 0o777
                    tf.addfile(info)
                add_file(tf, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
                add_file(tf, "etc/group", b"root:x:0:\n")
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        if _rootfs_tar is None:
            atexit.register(_remove_rootfs_cache)
        _rootfs_tar = tar_path
        return tar_path


# --------------------------------------------------------------------------------------------
# dockerd


# Runs as the parent of dockerd (inside its namespaces).  It is a child subreaper, so the
# containerd shims (which double-fork) and any container process orphaned by a dead shim are
# re-parented to it instead of to PID 1.  It forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to
# dockerd; once dockerd has exited it SIGKILLs and reaps every remaining child (bounded,
# 10 s), then exits with dockerd's status (128+N if dockerd died of signal N).  Thus when it
# exits, everything dockerd started is dead *and reaped*: no zombies are left for PID 1.
_REAPER = r"""
import ctypes, os, signal, sys, time
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("cnmt-reaper: prctl(PR_SET_CHILD_SUBREAPER) failed")
child = os.fork()
if child == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    except OSError as exc:
        print(f"cnmt-reaper: cannot exec {sys.argv[1]}: {exc}", file=sys.stderr, flush=True)
    os._exit(127)
def forward(signum, _frame):
    try:
        os.kill(child, signum)
    except ProcessLookupError:
        pass
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(s, forward)
code = 1
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
        break
signal.signal(signal.SIGTERM, signal.SIG_DFL)
me = str(os.getpid())
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        break
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read()
        except (OSError, ValueError):
            continue
        fields = st[st.rindex(")") + 2:].split()
        if fields[1] == me and fields[0] not in "ZX":
            print(f"cnmt-reaper: SIGKILL leftover pid {p}", file=sys.stderr, flush=True)
            try:
                os.kill(int(p), signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(0.05)
sys.exit(code if code >= 0 else 128 - code)
"""


class DockerHost:
    """A dockerd running inside ``netns``: an emulated Docker host.

    Layout: a short private runtime dir ``/tmp/cnmt-*`` (unix socket paths must stay under
    108 bytes) holds the API socket ``sock``, ``exec-root``, the pidfile, the trust key,
    ``daemon.json``, the docker client config, the reaper script, and ``plugins_dir``.
    ``workdir`` (a temp dir if not given) holds ``dockerd.log`` and ``data-root``.  The
    process is the reaper, so ``process.pid`` is not dockerd's pid (that is in ``pidfile``).

    dockerd runs as ``nsenter --net=<netns> unshare -m --propagation private sh -c
    'mount --bind ...; exec python cnmt-reaper.py dockerd ...'``, where the reaper (see
    ``_REAPER``) is a child subreaper that makes sure everything dockerd started dies and is
    reaped when dockerd exits.  In the private mount namespace ``plugins_dir`` is
    bind-mounted on ``/run/docker/plugins`` (so it discovers exactly this host's plugins
    while host-namespace processes serve ``plugins_dir/<name>.sock``) and a private dir on
    ``/run/containerd`` (shim sockets).  Containers get the cgroup parent ``cgroup_parent``
    so they can be found and removed even if the daemon is gone.

    :meth:`stop` (idempotent, never stops early on errors): ``docker rm -f`` all containers
    if the daemon answers, SIGTERM dockerd (SIGKILL after 20 s), SIGKILL every leftover
    process of this daemon (containerd, shims, their descendants, anything in the container
    cgroups), remove the cgroups, the runtime dir, the data root, and the workdir if it was a
    temp dir (a caller-given workdir keeps ``dockerd.log``).  Other processes in ``netns``
    (e.g. the plugin under test) are not touched; deleting the netns kills them.  To keep a
    plugin alive for the whole daemon lifetime, :meth:`prepare` first, start the plugin on
    ``plugins_dir / "<driver>.sock"``, then :meth:`start`, and stop in reverse order.
    """

    def __init__(
        self,
        netns: Netns,
        workdir: str | os.PathLike[str] | None = None,
        *,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.netns = netns
        self.extra_args = list(extra_args)
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.runtime_dir: Path | None = None
        self.cgroup_parent = f"/{NAME_PREFIX}-docker-{netns.name}"
        self.process: Process | None = None
        self._images: set[str] = set()
        self._stopped = False

    def __repr__(self) -> str:
        return f"DockerHost({self.netns.name!r}, runtime_dir={self.runtime_dir})"

    # paths ---------------------------------------------------------------------------------

    def _rt(self) -> Path:
        if self.runtime_dir is None:
            raise HarnessError("DockerHost not started")
        return self.runtime_dir

    def _wd(self) -> Path:
        if self.workdir is None:
            raise HarnessError("DockerHost not started")
        return self.workdir

    @property
    def sock(self) -> Path:
        """The daemon's API socket (in the host mount namespace)."""
        return self._rt() / "docker.sock"

    @property
    def plugins_dir(self) -> Path:
        """Host-visible directory that this dockerd sees as ``/run/docker/plugins``."""
        return self._rt() / "plugins"

    @property
    def exec_root(self) -> Path:
        return self._rt() / "exec-root"

    @property
    def data_root(self) -> Path:
        return self._wd() / "data-root"

    @property
    def log_path(self) -> Path:
        return self._wd() / "dockerd.log"

    @property
    def pidfile(self) -> Path:
        return self._rt() / "dockerd.pid"

    # lifecycle -----------------------------------------------------------------------------

    def _dockerd_argv(self) -> list[str]:
        rt = self._rt()
        dockerd = [
            DOCKERD,
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "-H",
            f"unix://{self.sock}",
            "--pidfile",
            str(self.pidfile),
            "--bridge=none",
            "--config-file",
            str(rt / "daemon.json"),
            "--cgroup-parent",
            self.cgroup_parent,
            *self.extra_args,
        ]
        script = (
            'set -e; mount --bind "$1" /run/docker/plugins; '
            'mount --bind "$2" /run/containerd; shift 2; exec "$@"'
        )
        return [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
            str(self.plugins_dir),
            str(rt / "containerd-run"),
            sys.executable,
            "-I",
            str(rt / "cnmt-reaper.py"),
            *dockerd,
        ]

    def prepare(self) -> Self:
        """Create the runtime dir, workdir and ``plugins_dir`` without starting dockerd.

        Lets a plugin be started (listening in ``plugins_dir``) before the daemon, so that
        with ``contextlib.ExitStack`` it can also be stopped after it.  Idempotent; called by
        :meth:`start`.  On failure whatever it created is removed again.
        """
        if self.runtime_dir is not None:
            return self
        if self._stopped:
            raise HarnessError("DockerHost already stopped; make a new one")
        try:
            self.runtime_dir = Path(tempfile.mkdtemp(prefix=f"{NAME_PREFIX}-", dir="/tmp"))
            if self.workdir is None:
                self.workdir = Path(tempfile.mkdtemp(prefix=f"{NAME_PREFIX}-dh-"))
            self.workdir.mkdir(parents=True, exist_ok=True)
            longest = self.exec_root / "containerd" / "containerd.sock.ttrpc"
            if len(str(longest)) > _SUN_PATH_MAX:
                raise HarnessError(f"runtime dir path too long for unix sockets: {longest}")
            for d in (self.plugins_dir, self._rt() / "containerd-run", self._rt() / "client"):
                d.mkdir(mode=0o700)
            self.plugins_dir.chmod(0o755)
            # The trust key would otherwise be written to /etc/docker/key.json; its only
            # knob in 20.10 is this config-file key (no CLI flag).
            config = {"deprecated-key-path": str(self._rt() / "key.json")}
            (self._rt() / "daemon.json").write_text(json.dumps(config) + "\n")
            (self._rt() / "cnmt-reaper.py").write_text(_REAPER)
            for mountpoint in (_HOST_PLUGIN_DIR, _HOST_CONTAINERD_RUN):
                mountpoint.mkdir(parents=True, exist_ok=True)
        except BaseException:
            self.stop(raise_errors=False)
            raise
        return self

    def start(self, timeout: float = 60) -> Self:
        """Start dockerd and wait until ``docker info`` answers (bounded by ``timeout``).

        On any failure everything done so far is undone (as by :meth:`stop`) and the error is
        raised; a daemon that exits or never answers gives :class:`HarnessError` with the tail
        of ``dockerd.log``.
        """
        if self.process is not None:
            raise HarnessError("DockerHost already started")
        if not self.netns.exists():
            raise HarnessError(f"{self.netns} does not exist")
        self.prepare()
        try:
            self.process = Process(
                self._dockerd_argv(),
                self.log_path,
                netns=self.netns,
                name=f"dockerd[{self.netns.name}]",
            ).start()
            self._wait_ready(timeout)
        except BaseException as exc:
            tail = self.process.log_tail(40) if self.process else ""
            self.stop(raise_errors=False)
            if isinstance(exc, Exception) and not isinstance(exc, HarnessError):
                raise HarnessError(
                    f"dockerd in {self.netns} failed to start: {exc}\n"
                    f"--- dockerd.log tail ---\n{tail}"
                ) from exc
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HarnessError(
                    f"dockerd in {self.netns} exited with {self.process.returncode}\n"
                    f"--- dockerd.log tail ---\n{self.process.log_tail(40)}"
                )
            if self.sock.exists():
                try:
                    res = self.docker(
                        "info", "--format", "{{.ServerVersion}}", check=False, timeout=10
                    )
                except subprocess.TimeoutExpired:
                    last = "docker info timed out"
                else:
                    if res.returncode == 0:
                        _log.info(
                            "dockerd %s ready in %s (server %s)",
                            self.netns.name,
                            self.runtime_dir,
                            res.stdout.strip(),
                        )
                        return
                    last = res.stderr.strip()
            time.sleep(0.2)
        raise HarnessError(
            f"dockerd in {self.netns} not ready after {timeout}s ({last})\n"
            f"--- dockerd.log tail ---\n{self.process.log_tail(40)}"
        )

    def client_env(self) -> dict[str, str]:
        """Environment for the docker client: private config dir, no inherited DOCKER_*."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_CONFIG"] = str(self._rt() / "client")
        return env

    def docker(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``/usr/bin/docker -H unix://<sock> *args`` in the host namespaces.

        Raises :class:`CommandError` on non-zero exit if ``check``; ``TimeoutExpired`` (client
        killed) after ``timeout``.
        """
        argv = [DOCKER_CLIENT, "-H", f"unix://{self.sock}", *args]
        return _run(argv, check=check, timeout=timeout, input=input, env=self.client_env())

    def import_busybox(self, tag: str = DEFAULT_IMAGE) -> str:
        """Make sure image ``tag`` (busybox rootfs, ``PATH`` set) exists; return ``tag``."""
        if tag in self._images:
            return tag
        if self.docker("image", "inspect", tag, check=False, timeout=30).returncode != 0:
            tar_path = busybox_rootfs_tar()
            self.docker(
                "import",
                "-c",
                "ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                str(tar_path),
                tag,
                timeout=120,
            )
        self._images.add(tag)
        return tag

    def is_running(self) -> bool:
        return self.process is not None and self.process.is_running()

    # teardown ------------------------------------------------------------------------------

    def _cgroup_dirs(self) -> list[Path]:
        """Our cgroup-parent directory in every mounted cgroup hierarchy (existing only)."""
        out: list[Path] = []
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fstype = right.split()[0] if right else ""
                if fstype in ("cgroup", "cgroup2"):
                    d = Path(left.split()[4]) / self.cgroup_parent.lstrip("/")
                    if d.is_dir():
                        out.append(d)
        return out

    def _cgroup_pids(self) -> set[int]:
        pids: set[int] = set()
        for root in self._cgroup_dirs():
            for procs in root.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in procs.read_text().split())
        return pids

    def _leftover_pids(self) -> set[int]:
        """dockerd, containerd and shims of this daemon, container processes, descendants."""
        roots: set[int] = set()
        if self.process is not None and self.process.returncode is None:
            roots.add(self.process.pid)
        markers: list[str] = []
        if self.runtime_dir is not None:
            markers.append(str(self.exec_root))
        if self.workdir is not None:
            markers.append(str(self.data_root))
        for pid in self.netns.pids():
            if any(arg == m or arg.startswith(m + "/") for arg in _cmdline(pid) for m in markers):
                roots.add(pid)
        roots |= self._cgroup_pids()
        return _descendants(roots) if roots else set()

    def leftover_pids(self) -> list[int]:
        """Live processes that belong to this daemon (for assertions after :meth:`stop`)."""
        return sorted(p for p in self._leftover_pids() if _is_alive(p))

    def _remove_cgroups(self) -> None:
        for root in self._cgroup_dirs():
            for _ in range(50):
                try:
                    for dirpath, _dirs, _files in os.walk(root, topdown=False):
                        os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            if root.exists():
                raise HarnessError(f"cgroup {root} could not be removed")

    def _remove_containers(self) -> None:
        """``docker rm -f`` every container; a daemon that died meanwhile is not an error."""
        try:
            ids = self.docker("ps", "-aq", timeout=30).stdout.split()
        except (CommandError, subprocess.TimeoutExpired):
            time.sleep(0.2)
            if not self.is_running():
                _log.warning("dockerd %s died before teardown; skipping docker rm", self.netns.name)
                return
            raise
        if ids:
            self.docker("rm", "-f", *ids, timeout=90)

    def stop(self, raise_errors: bool = True) -> None:
        """Tear everything down (see the class docstring).  Idempotent and bounded."""
        if self._stopped:
            return
        if self.runtime_dir is None and self.workdir is None:
            self._stopped = True
            return
        self._stopped = True
        cleanup = _Cleanup(f"dockerd {self.netns.name}")
        if self.is_running():
            cleanup.step("removing containers", self._remove_containers)
        if self.process is not None:
            proc = self.process
            cleanup.step("stopping dockerd", lambda: proc.stop(signal.SIGTERM, timeout=20))
        cleanup.step(
            "killing leftovers",
            lambda: _kill_until_gone(self._leftover_pids, f"dockerd {self.netns.name} leftovers"),
        )
        cleanup.step("removing cgroups", self._remove_cgroups)
        if self.runtime_dir is not None:
            rt = self.runtime_dir
            cleanup.step("removing runtime dir", lambda: _rmtree(rt))
        if self.workdir is not None:
            wd = self.workdir
            if self._owns_workdir:
                cleanup.step("removing workdir", lambda: _rmtree(wd))
            else:
                cleanup.step("removing data root", lambda: _rmtree(wd / "data-root"))
        cleanup.finish(raise_errors)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(raise_errors=exc_type is None)
