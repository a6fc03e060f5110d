"""A simulated cluster: many docker-less calicnm hosts on one fabric and one etcd.

Each :class:`SimHost` is a network namespace on the fabric running a real
``calicnm node run`` (plugin, agent, BIRD) with the product's settings, but no
dockerd: its ``DOCKER_HOST`` names a socket that does not exist, so the network
namer and the cluster-network thread only find Docker unreachable.  Endpoints
are made through the plugin socket with the calls dockerd makes
(:class:`~lab.plugin_client.PluginClient`); their veth peers stay in the host namespace, so each
endpoint is a real veth, /32 route and set of chains without a container.

:class:`SimCluster` starts the fabric, one etcd in the fabric namespace (its
``/metrics`` read with :meth:`SimCluster.etcd_metrics`), optionally a route
reflector in a namespace of its own (topology ``"rr"``: node mesh off, every
host peering with it), then the hosts, a few at a time.  :meth:`SimCluster.start`
either fully succeeds or undoes what it did; :meth:`SimCluster.close` is
idempotent and stops everything it started (hosts, reflector, etcd, namespaces,
the socket directory), raising one :class:`~lab.procs.TeardownError` at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Self

from lab.cluster import CalicnmHost, wait_until
from lab.etcd import FABRIC_ETCD_URL, fabric_etcd
from lab.fabric import Fabric
from lab.netns import Netns
from lab.paths import CALICNM
from lab.plugin_client import PluginClient
from lab.procs import NAME_PREFIX, Cleanup, HarnessError, Managed, Process, descendants

__all__ = [
    "IpsetProbe",
    "SimCluster",
    "SimHost",
    "Topology",
    "proc_tree_cpu",
    "proc_tree_rss",
    "process_start",
]

Topology = Literal["mesh", "rr"]
RR_AS = "64511"
START_PARALLEL = 3
"""Hosts started at once: each node's start is mostly Python imports on a loaded CPU."""
START_TRIES = 3
START_TIMEOUT = 240.0
_NAME_NETWORK = """
import dataclasses, sys
from calicnm.store import keys, records
from calicnm.store.edits import ensure_profile
from calicnm.store.etcd import EtcdStore, parse_endpoints
from calicnm.store.kv import replace

url, network_id, name = sys.argv[1:]
store = EtcdStore(parse_endpoints(url))
try:
    kv = store.get(keys.network(network_id))
    if kv is None:
        sys.exit(f"network {network_id} has no record")
    named = dataclasses.replace(records.decode_network(kv), docker_name=name)
    if not replace(store, kv.key, named.to_json(), kv.revision):
        sys.exit(f"network {network_id} changed while being named")
    ensure_profile(store, name)
finally:
    store.close()
"""
"""What a node's network namer does once its Docker knows the network's name."""


class IpsetProbe:
    """One ``ipset -`` (interactive mode, line-buffered) in a namespace: membership
    tests without starting a process each, about 50 µs a test.

    :meth:`member` is bounded by ``timeout`` (then :class:`HarnessError`);
    :meth:`close` ends the process (EOF, then SIGKILL after 5 s).  Not thread-safe."""

    def __init__(self, netns: Netns, timeout: float = 10.0) -> None:
        argv = netns.wrap(["stdbuf", "-oL", "-eL", "ipset", "-"])
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._timeout = timeout
        self._buffer = b""

    def member(self, ipset: str, address: str) -> bool:
        """Is ``address`` in ``ipset``?  False also when the set does not exist."""
        stdin, stdout = self._proc.stdin, self._proc.stdout
        if stdin is None or stdout is None:
            raise HarnessError("ipset probe has no pipes")
        stdin.write(f"test {ipset} {address}\n".encode())
        stdin.flush()
        deadline = time.monotonic() + self._timeout
        while True:
            line, newline, rest = self._buffer.partition(b"\n")
            if newline:
                self._buffer = rest
                if b"in set" in line:
                    return b" is in set" in line
                if b"ipset v" in line or b"rror" in line:
                    return False  # no such set (yet): not a member
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stdout], [], [], left)[0]:
                raise HarnessError(f"ipset probe: no answer in {self._timeout:.0f} s")
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                raise HarnessError(f"ipset probe exited: {self._buffer[-200:]!r}")
            self._buffer += chunk

    def close(self) -> None:
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


class SimHost(CalicnmHost):
    """A :class:`~lab.cluster.CalicnmHost` without dockerd: only the node runs.

    The plugin socket lives in ``socket_dir`` (short, for the 108-byte limit);
    ``DOCKER_HOST`` names ``socket_dir/docker.sock``, which never exists.
    :meth:`close` stops the node (the namespace, with BIRD, belongs to the fabric)."""

    node_start_timeout = START_TIMEOUT

    def __init__(
        self,
        netns: Netns,
        address: str,
        workdir: Path,
        hostname: str,
        etcd_endpoints: str,
        socket_dir: Path,
    ) -> None:
        super().__init__(netns, address, workdir, hostname, etcd_endpoints, node_settings="product")
        self.socket_dir = socket_dir
        self.plugin = PluginClient(self.socket)
        self._probe: IpsetProbe | None = None
        self.restarts = 0

    def in_ipset(self, ipset: str, address: str) -> bool:
        """Is ``address`` in this host's ``ipset`` (a missing set: no)?"""
        if self._probe is None:
            self._probe = IpsetProbe(self.netns)
        return self._probe.member(ipset, address)

    @property
    def socket(self) -> Path:
        return self.socket_dir / "calicnm.sock"

    @property
    def docker_socket(self) -> Path:
        return self.socket_dir / "docker.sock"

    def start(self) -> Self:
        """Start the node, again (up to :data:`START_TRIES` times) if it exits at start:
        on a loaded machine a node starting among many may not reach etcd within its
        own 60 s; :attr:`restarts` counts those."""
        try:
            self.socket_dir.mkdir(parents=True, exist_ok=True)
            for attempt in range(START_TRIES):
                try:
                    self.start_node()
                    break
                except AssertionError:
                    if attempt == START_TRIES - 1 or (self.node and self.node.is_running()):
                        raise
                    self.restarts += 1
        except BaseException:
            self.close(raise_errors=False)
            raise
        return self

    def close(self, raise_errors: bool = True) -> None:
        cleanup = Cleanup(f"host {self.hostname}")
        if self._probe is not None:
            cleanup.step("ending the ipset probe", self._probe.close)
            self._probe = None
        cleanup.step("stopping the node", self.stop_node)
        cleanup.step("removing the fast path's pins", self.remove_bpf_pins)
        cleanup.finish(raise_errors)

    _open = start
    _close = close

    def pids(self) -> list[int]:
        """The node, its descendants and its BIRD (which runs detached)."""
        if self.node is None or not self.node.is_running():
            return []
        pids = descendants([self.node.pid])
        with contextlib.suppress(OSError, ValueError, IndexError):
            pids.add(int((self.state_dir / "bird.pid").read_text().split()[0]))
        return sorted(pids)

    def agent_passes(self) -> int | None:
        try:
            return int(json.loads((self.state_dir / "agent-status.json").read_text())["passes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def bgp_established(self) -> int:
        """How many of BIRD's BGP sessions are Established (0 if BIRD does not answer)."""
        try:
            out = subprocess.run(
                ["birdc", "-s", str(self.state_dir / "bird.ctl"), "show", "protocols"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return 0
        return sum(1 for line in out.splitlines() if " BGP " in line and "Established" in line)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot), None if it is gone or has exited
    and only waits to be reaped (a zombie, whose parent may be a slow init): with its
    pid this names one running process, even after the pid is reused."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def proc_tree_cpu(pids: list[int]) -> float:
    """utime + stime of ``pids`` in seconds (processes gone are left out)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def proc_tree_rss(pids: list[int]) -> int:
    """Sum of VmRSS of ``pids`` in bytes."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


class SimCluster(Managed):
    """A fabric, its etcd, a route reflector for ``topology == "rr"``, and ``n``
    :class:`SimHost` s named ``host1`` .. ``hostN`` (workdirs of the same names under
    ``workdir``).  See the module docstring for the start and close guarantees."""

    def __init__(self, workdir: Path, n: int, topology: Topology = "mesh") -> None:
        self.workdir = workdir
        self.n = n
        self.topology = topology
        self.fabric = Fabric()
        self.hosts: list[SimHost] = []
        self.etcd: Process | None = None
        self.reflector: Process | None = None
        self.reflector_address: str | None = None
        self.socket_root: Path | None = None

    @property
    def etcd_url(self) -> str:
        return FABRIC_ETCD_URL

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``calicnm --etcd-endpoints URL ARGS`` in the fabric namespace."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD", "CALICNM"))}
        argv = [CALICNM, "--etcd-endpoints", self.etcd_url, *args]
        return self.fabric.netns.run(argv, check=check, env=env, timeout=60)

    def etcd_metrics(self) -> str:
        """etcd's Prometheus text from ``/metrics``, read inside the fabric namespace."""
        return self.fabric.netns.run(
            ["curl", "-sf", "--max-time", "10", f"{self.etcd_url}/metrics"], timeout=20
        ).stdout

    def name_network(self, network_id: str, name: str) -> None:
        """Give the network's record the name ``name`` and create its profile, as a
        node does once Docker names the network (these hosts have no Docker)."""
        argv = [sys.executable, "-c", _NAME_NETWORK, self.etcd_url, network_id, name]
        self.fabric.netns.run(argv, timeout=60)

    def _etcd_ready(self) -> bool:
        try:
            return bool(self.etcd_metrics())
        except (HarnessError, subprocess.SubprocessError):
            return False

    def start(self) -> Self:
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.socket_root = Path(tempfile.mkdtemp(prefix=f"{NAME_PREFIX}-sim-"))
            self.fabric.create()
            self.etcd = fabric_etcd(self.fabric, self.workdir)
            wait_until(self._etcd_ready, 30, "the fabric etcd")
            if self.topology == "rr":
                self._start_reflector()
            atts = [self.fabric.add_host() for _ in range(self.n)]
            for i, att in enumerate(atts):
                name = f"host{i + 1}"
                self.hosts.append(
                    SimHost(
                        att.host,
                        att.address,
                        self.workdir / name,
                        name,
                        self.etcd_url,
                        self.socket_root / f"h{i + 1}",
                    )
                )
            with ThreadPoolExecutor(START_PARALLEL) as pool:
                for started in pool.map(lambda h: h.start(), self.hosts):
                    del started
        except BaseException:
            self.close(raise_errors=False)
            raise
        return self

    def _start_reflector(self) -> None:
        """Mesh off, one reflector in a namespace of its own, every host peering with it."""
        att = self.fabric.add_host()
        self.reflector_address = att.address
        self.cli("bgp", "node-mesh", "off")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD", "CALICNM"))}
        argv = [CALICNM, "--etcd-endpoints", self.etcd_url, "route-reflector", "run"]
        argv += ["--ip", att.address, "--state-dir", str(self.workdir / "rr")]
        self.reflector = att.host.process(argv, self.workdir / "rr.log", env=env).start()
        self.cli("bgp", "peer", "add", att.address, "as", RR_AS)

    def inventory(self) -> dict[str, Any]:
        """What this cluster made, for a leak check after :meth:`close`: namespaces,
        the pids of etcd, the reflector and the nodes, and the socket dir."""
        namespaces = [self.fabric.netns.name, *(a.host.name for a in self.fabric.attachments)]
        pids = [p.pid for p in (self.etcd, self.reflector) if p is not None and p.is_running()]
        pids += [pid for h in self.hosts for pid in h.pids()]
        return {
            "namespaces": namespaces,
            "processes": [[pid, process_start(pid)] for pid in pids],
            "socket_dir": str(self.socket_root),
            "node_restarts_at_start": sum(h.restarts for h in self.hosts),
        }

    def wait_bgp(self, timeout: float) -> bool:
        """Until every host has its expected sessions Established (all other hosts in a
        mesh, the reflector with ``"rr"``); False (not raised) after ``timeout``."""
        want = 1 if self.topology == "rr" else self.n - 1
        try:
            wait_until(
                lambda: all(h.bgp_established() >= want for h in self.hosts),
                timeout,
                "BGP sessions",
                interval=1.0,
            )
        except AssertionError:
            return False
        return True

    def close(self, raise_errors: bool = True) -> None:
        cleanup = Cleanup(f"simulated cluster in {self.workdir}")
        with ThreadPoolExecutor(8) as pool:
            stops = [pool.submit(h.close) for h in reversed(self.hosts)]
            for host, stop in zip(reversed(self.hosts), stops, strict=True):
                cleanup.step(f"closing {host.hostname}", stop.result)
        if self.reflector is not None:
            cleanup.step("stopping the route reflector", self.reflector.stop)
        if self.etcd is not None:
            cleanup.step("stopping the fabric etcd", self.etcd.stop)
        cleanup.step("closing the fabric", self.fabric.close)
        if self.socket_root is not None:
            root = self.socket_root
            cleanup.step("removing the socket dir", lambda: shutil.rmtree(root, ignore_errors=True))
        cleanup.finish(raise_errors)

    _open = start
    _close = close
