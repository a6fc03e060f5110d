"""Policy at size: the data path and the agent's host side with 10,000 endpoints of policy.

Builds, in throwaway network namespaces and a throwaway etcd, one host whose kernel state
the real agent programs (real veths, /32 routes, chains and ipsets), and measures in one
run (figures only; nothing here fails on a number):

1. **The data path with 10,000 endpoints of policy against none.**  Two endpoints of the
   host, each in a namespace of its own standing for a container, exchange qperf
   ``tcp_bw`` and ``tcp_lat`` (64 KiB, both ends pinned to one CPU, as ``bench.dataplane``
   does), 1-byte latency and a burst of new TCP connections, in two states taken in turn
   (a, b, b, a, ...) over several repetitions, reported as medians:

   - (a) only the pair's own policy: their two endpoint records and their profile;
   - (b) the same pair plus the rest of 10,000 endpoints: local endpoints with real veths
     over many profiles, and endpoint records of other hosts whose addresses fill the tag
     ipsets the local profiles' rules (and the pair's) reference.

   The agent programs each state once; the repetitions then swap the two kernel
   snapshots (filter table and sets, saved and restored with the kernel's own tools), so
   only the policy differs between measurements: no etcd writes or agent pass just before.
   The pair's profile denies a few big tags before it allows the tag everyone carries, so
   each new connection in (b) walks the two-level dispatch chains and misses and then hits
   ipsets of thousands of members.  An established connection is accepted by conntrack
   before any of that, which is why the new-connection figure is reported next to qperf's.
2. **The agent's memory at 1,000 and at 10,000 local endpoints** (real veths, created in
   batches with ``ip -batch``): the RSS of a fresh process running the agent (its change
   stream included) before it starts and once its passes have programmed every endpoint,
   and the slope per endpoint between the two sizes.
3. **A full resync with 1,000 local endpoints** (state b): one complete pass (read the
   datastore, compile, compare and write ipsets and chains, re-assert every route,
   markers), right after switching from (a) and warm (over an unchanged kernel), split
   into those steps by timing each adapter call, plus one warm pass under cProfile
   (DIR/policy_at_size_profile.txt).

Usage (root, from the repository's root):
``.venv/bin/python -m bench.policy_at_size [--quick] [--out DIR]``; writes
DIR/policy_at_size.md and DIR/policy_at_size.json.  :func:`measure` returns the same
figures as a dict, for other reports.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import hashlib
import io
import ipaddress
import json
import os
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report
from bench.dataplane.places import Pair, Place
from bench.dataplane.qperf import run_qperf, wait_reachable
from bench.dataplane.settings import FIXED_SIZE, cpus, log
from bench.dataplane.testbed import Testbed
from bench.policy_bench import CLONE_NEWNET, setns
from calicnm.endpoint import derive_mac, plan_link
from calicnm.host.ipsets import Ipsets
from calicnm.host.iptables import Iptables
from calicnm.host.markers import Markers
from calicnm.host.netlink import HostPlumbing, ensure_gateway_route
from calicnm.host.policy_applier import PolicyApplier
from calicnm.host.sysctl import ensure_forwarding
from calicnm.model import Endpoint, Network
from calicnm.node.agent import Agent
from calicnm.policy import Profile, Rule
from calicnm.store import etcd as etcd_module
from calicnm.store import keys
from calicnm.store.etcd import EtcdStore, parse_endpoints
from calicnm.store.kv import KV, Txn
from lab.etcd import EtcdServer
from lab.netns import Netns
from lab.paths import REPO
from lab.procs import Process

Json = dict[str, Any]

HOST = "size-host"
NETWORK_ID = "5" * 64
PAIR_PROFILE = "measured"
EVERYONE = "everyone"
GROUPS = 10
"""Tags ``group-0`` .. ``group-9``: each local and remote profile carries one."""
LOCAL_NET = ipaddress.IPv4Address("10.128.0.0")
REMOTE_NET = ipaddress.IPv4Address("10.130.0.0")
PAIR_ADDRESSES = ("10.127.0.1", "10.127.0.2")
REMOTE_HOSTS = 50
TXN_OPS = 100
"""Writes per etcd transaction when switching states (etcd's limit is 128)."""
CONNECT_PORT = 19766
SETTLE_SECONDS = 1.0
"""Pause between loading a state's kernel snapshot and measuring it."""
GOALS = {"bandwidth_ratio": 0.95, "latency_diff_us": 1.0, "resync_s": 1.0}


@dataclass(frozen=True)
class Settings:
    """Sizes and repetitions of one run."""

    local: int
    """Local endpoints with real veths in state (b), the measured pair included."""
    remote: int
    """Endpoint records of other hosts in state (b)."""
    profiles: int
    reps: int
    """Repetitions of each state (taken a, b, b, a, ...)."""
    seconds: int
    """qperf -t per test."""
    connections: int
    """New TCP connections per repetition."""
    resyncs: int
    """Warm full resyncs timed (after the one that switches from state a)."""
    memory_sizes: tuple[int, ...]
    quick: bool

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(40, 10, 5, 1, 1, 200, 2, (20, 50), True)
        return cls(1000, 9000, 100, 9, 2, 2000, 5, (1000, 10000), False)


# ---- the endpoints and profiles ---------------------------------------------------------


@dataclass(frozen=True)
class Ep:
    """One endpoint of the benchmark: its record, and the veth it needs if local."""

    record: Endpoint

    @property
    def key(self) -> str:
        return keys.endpoint(self.record.host, self.record.id)


def endpoint(eid: str, host: str, address: str, profile: str) -> Ep:
    plan = plan_link(eid, derive_mac(eid), (ipaddress.IPv4Address(address),))
    record = Endpoint(
        eid,
        host,
        NETWORK_ID,
        plan.host_if,
        plan.peer_if,
        plan.mac,
        plan.addresses,
        profiles=(profile,),
    )
    return Ep(record)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def pair_ids() -> tuple[str, str]:
    """Two endpoint ids whose interfaces (``calif...``) sort into the last dispatch bucket,
    so a packet of the pair matches the most top-level dispatch rules (bounded search)."""
    found = [digest(f"pair-{k}") for k in range(100_000) if digest(f"pair-{k}").startswith("f")]
    if len(found) < 2:
        raise RuntimeError("no endpoint ids for the measured pair")
    return found[-1], found[-2]


def profile_name(k: int) -> str:
    return f"prof{k:03d}"


def profiles(count: int) -> dict[str, Profile]:
    """The pair's profile and ``count`` others.

    The pair's inbound rules deny five ``group-*`` tags (the sender is in none of them:
    five ipset misses) before allowing the tag every endpoint carries (a hit in the
    biggest set); outbound likewise with the other five groups.  The other profiles have a
    port rule, a network rule and tag rules, as real ones would."""

    def rule(**match: Any) -> Rule:
        return Rule.from_dict(match)

    out = {
        PAIR_PROFILE: Profile(
            PAIR_PROFILE,
            (PAIR_PROFILE, EVERYONE),
            (
                *(rule(action="deny", src_tag=f"group-{g}") for g in range(GROUPS // 2)),
                rule(action="allow", src_tag=EVERYONE),
            ),
            (
                *(rule(action="deny", dst_tag=f"group-{g}") for g in range(GROUPS // 2, GROUPS)),
                rule(action="allow", dst_tag=EVERYONE),
            ),
        )
    }
    for k in range(count):
        name = profile_name(k)
        out[name] = Profile(
            name,
            (name, EVERYONE, f"group-{k % GROUPS}"),
            (
                rule(
                    action="allow",
                    protocol="tcp",
                    dst_ports=[80, 443],
                    src_tag=f"group-{(k + 1) % GROUPS}",
                ),
                rule(action="deny", src_net="10.99.0.0/16"),
                rule(action="allow", src_tag=name),
            ),
            (
                rule(action="deny", protocol="tcp", dst_ports=[22], dst_tag=f"group-{k % 7}"),
                rule(action="allow"),
            ),
        )
    return out


@dataclass(frozen=True)
class Population:
    """Every endpoint a run may program: the pair, local ones, remote ones."""

    pair: tuple[Ep, Ep]
    local: list[Ep]
    """Local endpoints besides the pair, as many as the largest size needs."""
    remote: list[Ep]
    profile_count: int

    @classmethod
    def make(cls, settings: Settings) -> Population:
        a, b = pair_ids()
        pair = (
            endpoint(a, HOST, PAIR_ADDRESSES[0], PAIR_PROFILE),
            endpoint(b, HOST, PAIR_ADDRESSES[1], PAIR_PROFILE),
        )
        most = max(settings.local, *settings.memory_sizes) - 2
        p = settings.profiles
        local = [
            endpoint(digest(f"local-{i}"), HOST, str(LOCAL_NET + i + 1), profile_name(i % p))
            for i in range(most)
        ]
        remote = [
            endpoint(
                digest(f"remote-{j}"),
                f"size-peer{j % REMOTE_HOSTS:02d}",
                str(REMOTE_NET + j + 1),
                profile_name(j % p),
            )
            for j in range(settings.remote)
        ]
        return cls(pair, local, remote, p)

    def state(self, local: int, remote: int) -> list[Ep]:
        """The pair plus ``local - 2`` local endpoints and ``remote`` remote ones."""
        return [*self.pair, *self.local[: max(0, local - 2)], *self.remote[:remote]]


# ---- the datastore ------------------------------------------------------------------------


def read_size(population: Population) -> Json:
    """The mean size of an endpoint record (key and value), and how many of them one
    page of a listing holds (the product reads listings in pages of
    ``store.etcd.PAGE_KEYS`` keys, so no answer nears gRPC's message limit)."""
    eps = [*population.pair, *population.local, *population.remote]
    size = sum(len(ep.key) + len(ep.record.to_json()) for ep in eps) / len(eps)
    return {"bytes_per_record": size, "page_bytes": int(size * etcd_module.PAGE_KEYS)}


class Records:
    """The endpoint records in etcd, switched between states in batched transactions."""

    def __init__(self, store: EtcdStore, population: Population) -> None:
        self.store = store
        self._present: dict[str, str] = {}
        store.put(keys.network(NETWORK_ID), Network(NETWORK_ID, docker_name="size").to_json())
        for name, profile in profiles(population.profile_count).items():
            store.put(keys.profile(name), profile.to_json())

    def set(self, endpoints: Iterable[Ep]) -> None:
        """Make the endpoint records exactly ``endpoints``."""
        wanted = {ep.key: ep.record.to_json() for ep in endpoints}
        puts = [(k, v) for k, v in wanted.items() if self._present.get(k) != v]
        deletes = [k for k in self._present if k not in wanted]
        for i in range(0, len(puts), TXN_OPS):
            self.store.commit(Txn(puts=puts[i : i + TXN_OPS]))
        for i in range(0, len(deletes), TXN_OPS):
            self.store.commit(Txn(deletes=deletes[i : i + TXN_OPS]))
        self._present = wanted


# ---- the host -------------------------------------------------------------------------------


@contextlib.contextmanager
def inside(netns: Netns) -> Iterator[None]:
    """Run this thread in ``netns`` for the block (the agent's netlink sockets and its
    iptables/ipset processes then act there); back to where it was, whatever happens."""
    original = setns(str(netns.path))
    try:
        yield
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns(original, CLONE_NEWNET)
        os.close(original)


def add_veths(netns: Netns, endpoints: Sequence[Ep]) -> float:
    """Create the veth pairs of ``endpoints`` in ``netns`` (host side up, peer with the
    endpoint's MAC), with two ``ip -batch`` runs; returns the seconds it took."""
    started = time.perf_counter()
    adds, ups = [], []
    for ep in endpoints:
        r = ep.record
        adds.append(f"link add {r.interface} type veth peer name {r.peer} address {r.mac}")
        ups.append(f"link set {r.interface} up")
    for lines in (adds, ups):
        if lines:
            timeout = 120 + len(lines) / 50
            netns.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n", timeout=timeout)
    return time.perf_counter() - started


def plug_container(host: Netns, container: Netns, ep: Ep) -> None:
    """Move ``ep``'s peer into ``container`` and configure it as Docker and calicnm's
    Join would: eth0, the /32 address, the link-local gateway and the default route."""
    r = ep.record
    address = str(r.ipv4[0])
    host.run(["ip", "link", "set", r.peer, "netns", container.name])
    for cmd in (
        ["ip", "link", "set", r.peer, "name", "eth0"],
        ["ip", "addr", "add", f"{address}/32", "dev", "eth0"],
        ["ip", "link", "set", "eth0", "up"],
        ["ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"],
        ["ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"],
    ):
        container.run(cmd)


# ---- timing each step of a pass -----------------------------------------------------------


class Steps:
    """Seconds spent per step, summed since the last :meth:`take`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def time(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - started

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


class TimedStore:
    """The etcd store, its reads timed (the agent's read of the datastore)."""

    def __init__(self, inner: EtcdStore, steps: Steps) -> None:
        self._inner = inner
        self._steps = steps

    def get(self, key: str) -> KV | None:
        with self._steps.time("read"):
            return self._inner.get(key)

    def list(self, prefix: str) -> list[KV]:
        with self._steps.time("read"):
            return self._inner.list(prefix)

    def put(self, key: str, value: str) -> None:
        self._inner.put(key, value)

    def delete(self, key: str) -> bool:
        return self._inner.delete(key)

    def commit(self, txn: Txn) -> int:
        return self._inner.commit(txn)

    def close(self) -> None:
        self._inner.close()


class TimedIptables(Iptables):
    def __init__(self, steps: Steps) -> None:
        super().__init__()
        self._steps = steps

    def restore(self, text: str) -> None:
        with self._steps.time("iptables-restore"):
            super().restore(text)

    def save(self, table: str = "filter") -> str:
        with self._steps.time("iptables-save"):
            return super().save(table)


class TimedIpsets(Ipsets):
    def __init__(self, steps: Steps) -> None:
        super().__init__()
        self._steps = steps

    def _run(self, args: list[str], script: str | None = None) -> str:
        with self._steps.time("ipset"):
            return super()._run(args, script)


class TimedApplier(PolicyApplier):
    def __init__(self, steps: Steps) -> None:
        super().__init__(TimedIptables(steps), TimedIpsets(steps))
        self._steps = steps

    def apply(self, desired: Any, full: bool = False) -> Any:
        with self._steps.time("apply"):
            return super().apply(desired, full)


class TimedRoutes(HostPlumbing):
    def __init__(self, steps: Steps) -> None:
        self._steps = steps

    def ensure_routes(self, host_if: str, ips: tuple[str, ...], mac: str) -> bool:
        with self._steps.time("routes"):
            return super().ensure_routes(host_if, ips, mac)


class TimedMarkers(Markers):
    def __init__(self, directory: str, steps: Steps) -> None:
        super().__init__(directory)
        self._steps = steps

    def sync(self, programmed: set[str]) -> None:
        with self._steps.time("markers"):
            super().sync(programmed)


def breakdown(total: float, steps: dict[str, float]) -> dict[str, float]:
    """A pass's seconds per step: the datastore read, compile (what no adapter call
    accounts for), the applier's own work, its ipset and iptables processes, routes and
    markers."""
    tools = sum(steps.get(k, 0.0) for k in ("ipset", "iptables-restore", "iptables-save"))
    apply = steps.get("apply", 0.0)
    timed = steps.get("read", 0.0) + apply + steps.get("routes", 0.0) + steps.get("markers", 0.0)
    return {
        "total": total,
        "read": steps.get("read", 0.0),
        "compile": max(0.0, total - timed),
        "applier_python": max(0.0, apply - tools),
        "ipset": steps.get("ipset", 0.0),
        "iptables_save": steps.get("iptables-save", 0.0),
        "iptables_restore": steps.get("iptables-restore", 0.0),
        "routes": steps.get("routes", 0.0),
        "markers": steps.get("markers", 0.0),
    }


class HostAgent:
    """The agent of the emulated host, in this process, every call timed by step."""

    def __init__(self, store: EtcdStore, netns: Netns, workdir: Path) -> None:
        self.steps = Steps()
        self.netns = netns
        self.agent = Agent(
            TimedStore(store, self.steps),
            HOST,
            TimedApplier(self.steps),
            TimedRoutes(self.steps),
            TimedMarkers(str(workdir / "markers"), self.steps),
        )

    def full_pass(self) -> dict[str, float]:
        """One full resync in the host's namespace: its step breakdown."""
        self.steps.take()
        with inside(self.netns):
            started = time.perf_counter()
            self.agent.reconcile(full=True)
            total = time.perf_counter() - started
        return breakdown(total, self.steps.take())

    def profiled_pass(self, top: int = 30) -> str:
        """One more full pass under cProfile: its functions by cumulative time."""
        profiler = cProfile.Profile()
        with inside(self.netns):
            profiler.runcall(self.agent.reconcile, True)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
        return text.getvalue()


# ---- the data path --------------------------------------------------------------------------

ACCEPT_LOOP = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(512)
end = time.monotonic() + 7200
for _ in range(10_000_000):
    if time.monotonic() > end:
        break
    c, _ = s.accept()
    c.close()
"""
"""A server that accepts and closes connections (bounded in count and time)."""

CONNECT_LOOP = """
import socket, struct, sys, time
address, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
linger = struct.pack("ii", 1, 0)
started = time.perf_counter()
for _ in range(n):
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    c.settimeout(5)
    c.connect((address, port))
    c.close()
print((time.perf_counter() - started) / n)
"""
"""``n`` connections one after another (closed with a reset: no TIME_WAIT piles up); prints
the mean seconds per connection."""


@dataclass
class PathFigures:
    """What one state measured, per repetition."""

    bw: list[float] = field(default_factory=list)
    """tcp_bw at 64 KiB, bytes/s."""
    lat: list[float] = field(default_factory=list)
    """tcp_lat at 64 KiB, seconds one way."""
    lat1: list[float] = field(default_factory=list)
    """tcp_lat at 1 byte, seconds one way (per-packet costs, not copying, dominate)."""
    connect: list[float] = field(default_factory=list)
    """Seconds per new connection."""
    errors: list[str] = field(default_factory=list)


def pinned() -> list[str]:
    return ["taskset", "-c", str(max(cpus()))]


def measure_path(pair: Pair, settings: Settings, into: PathFigures) -> None:
    """One repetition in the current state: qperf, then the connection burst."""
    try:
        wait_reachable(pair)
        samples = run_qperf(
            pair,
            ["-m", FIXED_SIZE, "-t", str(settings.seconds)],
            4 * settings.seconds + 30,
            pinned(),
        )
        into.bw.append(next(s.value for s in samples if s.test == "tcp_bw"))
        into.lat.append(next(s.value for s in samples if s.test == "tcp_lat"))
        small = run_qperf(
            pair, ["-m", "1", "-t", str(settings.seconds)], 2 * settings.seconds + 30, pinned(),
            ("tcp_lat",),
        )  # fmt: skip
        into.lat1.append(small[0].value)
        argv = [*pinned(), sys.executable, "-c", CONNECT_LOOP, pair.address, str(CONNECT_PORT)]
        proc = pair.client.run([*argv, str(settings.connections)], timeout=120)
        into.connect.append(float(proc.stdout.strip()))
    except (Exception, StopIteration) as exc:
        into.errors.append(f"{type(exc).__name__}: {exc}"[:600])
        log(f"  measurement failed: {into.errors[-1][:300]}")


@dataclass(frozen=True)
class KernelSnapshot:
    """A state's policy as the kernel holds it: the filter table as ``iptables-save``
    prints it, and each calicnm set's ``ipset save`` lines."""

    filter_table: str
    sets: dict[str, tuple[str, tuple[str, ...]]]
    """name -> (its create line, its add lines)."""

    @classmethod
    def save(cls, netns: Netns) -> KernelSnapshot:
        backend = Iptables().backend
        table = netns.run([backend.save, "-t", "filter"], timeout=60).stdout
        sets: dict[str, tuple[str, list[str]]] = {}
        for line in netns.run(["ipset", "save"], timeout=60).stdout.splitlines():
            words = line.split()
            if len(words) < 3 or not words[1].startswith("calicnm-"):
                continue
            if words[0] == "create":
                sets[words[1]] = (line, [])
            elif words[0] == "add" and words[1] in sets:
                sets[words[1]][1].append(line)
        return cls(table, {name: (create, tuple(adds)) for name, (create, adds) in sets.items()})

    def load(self, netns: Netns, names: set[str]) -> None:
        """Put this state back: every set in ``names`` refilled with this state's
        members (empty if it has none), then the whole filter table replaced in one
        ``iptables-restore`` transaction."""
        lines = []
        for name in sorted(names):
            create, adds = self.sets.get(name, ("", ()))
            if create:
                lines.append(f"{create} -exist")
            lines.append(f"flush {name}")
            lines += adds
        netns.run(["ipset", "restore", "-exist"], input="\n".join(lines) + "\n", timeout=120)
        restore = Iptables().backend.restore
        netns.run([restore, "-w", "10", "-T", "filter"], input=self.filter_table, timeout=120)


def kernel_counts(netns: Netns) -> dict[str, int]:
    """calicnm's rules, chains and ipset members programmed in ``netns`` now."""
    saved = netns.run(["iptables-save", "-t", "filter"], timeout=60).stdout
    sets = netns.run(["ipset", "save"], timeout=60).stdout
    return {
        "iptables_rules": sum(1 for x in saved.splitlines() if x.startswith("-A calicnm")),
        "chains": sum(1 for x in saved.splitlines() if x.startswith(":calicnm")),
        "ipsets": sum(1 for x in sets.splitlines() if x.startswith("create calicnm")),
        "ipset_members": sum(1 for x in sets.splitlines() if x.startswith("add calicnm")),
    }


# ---- memory -----------------------------------------------------------------------------


def rss_kib() -> dict[str, int]:
    """VmRSS and VmHWM of this process, KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def memory_child(url: str, netns_path: str, size: int, markers: str, limit: float) -> Json:
    """In a fresh process: the agent runs (change stream included) until it has programmed
    ``size`` local endpoints; RSS before it was built and after, and the time of one more
    full pass once its loop has stopped (the periodic resync at that size)."""
    store = EtcdStore(parse_endpoints(url))
    store.get(keys.profile(PAIR_PROFILE))  # connect from the namespace etcd listens in
    setns(netns_path)
    before = rss_kib()
    agent = Agent(
        store, HOST, PolicyApplier(Iptables(), Ipsets()), HostPlumbing(), Markers(markers)
    )
    stop = threading.Event()
    started = time.monotonic()
    thread = threading.Thread(target=agent.run, args=(stop, store), daemon=True)
    thread.start()
    programmed = None
    deadline = started + limit
    while time.monotonic() < deadline and thread.is_alive():
        if agent.local_endpoints >= size and programmed is None:
            programmed = time.monotonic() - started
        if programmed is not None and agent.passes >= 2:
            break
        time.sleep(0.05)
    time.sleep(1.0)  # a pass that was under way ends
    after = rss_kib()
    stop.set()
    agent.wake()
    thread.join(timeout=60)
    full_pass = None
    if not thread.is_alive() and programmed is not None:
        # One more full pass, now that the loop has stopped: the periodic resync.
        begun = time.perf_counter()
        agent.reconcile(full=True)
        full_pass = time.perf_counter() - begun
    store.close()
    return {
        "endpoints": size,
        "programmed": agent.local_endpoints,
        "seconds_to_program": programmed,
        "passes": agent.passes,
        "rss_before_kib": before["VmRSS"],
        "rss_after_kib": after["VmRSS"],
        "hwm_kib": after["VmHWM"],
        "full_pass_s": full_pass,
        "last_error": agent.last_error,
    }


def run_memory_child(url: str, netns: Netns, size: int, workdir: Path, limit: float) -> Json:
    argv = [
        sys.executable, "-m", "bench.policy_at_size", "--memory-child",
        json.dumps([url, str(netns.path), size, str(workdir / f"markers-{size}"), limit]),
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=limit + 300, check=False
        )
    except subprocess.TimeoutExpired:
        return {"endpoints": size, "error": f"no result within {limit + 300:.0f} s"}
    if proc.returncode != 0:
        return {"endpoints": size, "error": proc.stderr.strip()[-800:]}
    result: Json = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def slope(points: list[Json]) -> float | None:
    """KiB of RSS per endpoint between the smallest and the largest size measured."""
    good = sorted((p for p in points if "rss_after_kib" in p), key=lambda p: p["endpoints"])
    if len(good) < 2 or good[-1]["endpoints"] == good[0]["endpoints"]:
        return None
    low, high = good[0], good[-1]
    return float(
        (high["rss_after_kib"] - low["rss_after_kib"]) / (high["endpoints"] - low["endpoints"])
    )


# ---- the run --------------------------------------------------------------------------------


def load() -> list[float]:
    return list(os.getloadavg())


def measure(settings: Settings, workdir: Path) -> Json:
    """Everything measured, as a dict (what :func:`write_report` writes).  Builds and tears
    down its own etcd and namespaces (on failure too)."""
    population = Population.make(settings)
    started = time.monotonic()
    result: Json = {
        "settings": asdict(settings),
        "load_before": load(),
        "errors": [],
        "read_size": read_size(population),
    }
    with contextlib.ExitStack() as stack:
        etcd = EtcdServer().start()
        stack.callback(etcd.cleanup, raise_errors=False)
        store = EtcdStore(parse_endpoints(etcd.url))
        stack.callback(store.close)
        store.get("/")  # connect now, from the namespace etcd listens in
        records = Records(store, population)
        bed = Testbed(stack, workdir)
        host = bed.netns()
        result["namespaces"] = [host.name]
        result["data_path"] = data_path(
            settings, population, records, store, bed, host, workdir, result["namespaces"]
        )
        result["memory"] = memory(settings, population, records, etcd.url, host, workdir)
        result["load_after"] = load()
        log("tearing down")
    result["seconds"] = time.monotonic() - started
    result["figures"] = figures(result)
    return result


def data_path(
    settings: Settings,
    population: Population,
    records: Records,
    store: EtcdStore,
    bed: Testbed,
    host: Netns,
    workdir: Path,
    namespaces: list[str],
) -> Json:
    """Figures 1 and 3: the pair in states (a) and (b), and the full resync in (b)."""
    log(f"host: {settings.local} local endpoints with veths, {settings.remote} remote")
    others = population.local[: settings.local - 2]
    veth_seconds = add_veths(host, [*population.pair, *others])
    log(f"  {settings.local} veths in {veth_seconds:.1f} s")
    with inside(host):
        ensure_forwarding()
        ensure_gateway_route()
    containers = (bed.netns(), bed.netns())
    namespaces.extend(ns.name for ns in containers)
    for ns, ep in zip(containers, population.pair, strict=True):
        plug_container(host, ns, ep)
    client, server = (Place.of(ns) for ns in containers)
    pair = Pair(client, server, PAIR_ADDRESSES[1], ())
    bed.serve("size", server, pinned())
    accept = Process(
        server.argv([sys.executable, "-c", ACCEPT_LOOP, PAIR_ADDRESSES[1], str(CONNECT_PORT)]),
        workdir / "accept.log",
        name="accept-loop",
    )
    bed.stack.callback(accept.stop)
    accept.start()

    agent = HostAgent(store, host, workdir)
    states = {
        "a": population.state(2, 0),
        "b": population.state(settings.local, settings.remote),
    }
    # The agent programs each state once; the kernel's filter table and sets are then
    # saved, and the repetitions swap those snapshots in, so that nothing differs
    # between the two measurements but the policy in the kernel (no etcd writes, no
    # agent pass just before a measurement).
    passes: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    snapshots: dict[str, KernelSnapshot] = {}
    for state in ("a", "b"):
        records.set(states[state])
        passes[state] = agent.full_pass()
        counts[state] = kernel_counts(host)
        snapshots[state] = KernelSnapshot.save(host)
    names = {name for snapshot in snapshots.values() for name in snapshot.sets}
    measured = {"a": PathFigures(), "b": PathFigures()}
    for rep in range(settings.reps):
        for state in ("a", "b") if rep % 2 == 0 else ("b", "a"):
            snapshots[state].load(host, names)
            time.sleep(SETTLE_SECONDS)
            measure_path(pair, settings, measured[state])
            m = measured[state]
            if m.bw and m.lat and m.lat1 and m.connect:
                log(
                    f"  rep {rep + 1} state {state}: {m.bw[-1] * 8 / 1e9:.2f} Gbit/s, "
                    f"{m.lat[-1] * 1e6:.1f} us, 1 B {m.lat1[-1] * 1e6:.1f} us, "
                    f"connect {m.connect[-1] * 1e6:.0f} us"
                )
    # The full resync in state (b): once right after the switch from (a), which
    # programs 998 more endpoints, then warm passes over an unchanged kernel.
    records.set(states["a"])
    agent.full_pass()
    records.set(states["b"])
    cold = agent.full_pass()
    warm = [agent.full_pass() for _ in range(settings.resyncs)]
    log(f"  full resync (b): from (a) {cold['total']:.2f} s, warm {warm_median(warm):.2f} s")
    log(f"  from (a): {json.dumps({k: round(v, 3) for k, v in cold.items()})}")
    log(f"  warm: {json.dumps({k: round(v, 3) for k, v in warm[-1].items()})}")
    profile = agent.profiled_pass() if not settings.quick else ""
    return {
        "veth_seconds": veth_seconds,
        "states": {
            s: {**asdict(measured[s]), "kernel": counts.get(s, {}), "endpoints": len(states[s])}
            for s in states
        },
        "state_passes": passes,
        "swapped_by": "kernel snapshots (iptables-save/restore, ipset save/restore)",
        "resync": {"cold": cold, "warm": warm},
        "resync_profile": profile,
    }


def warm_median(warm: list[dict[str, float]]) -> float:
    return statistics.median(p["total"] for p in warm) if warm else float("nan")


def memory(
    settings: Settings,
    population: Population,
    records: Records,
    url: str,
    host: Netns,
    workdir: Path,
) -> Json:
    """Figure 2: the agent's RSS at each local size (veths added as needed)."""
    points = []
    have = settings.local
    for size in settings.memory_sizes:
        if size > have:
            extra = population.local[have - 2 : size - 2]
            log(f"memory: {len(extra)} more veths")
            add_veths(host, extra)
            have = size
        records.set(population.state(size, 0))
        log(f"memory: agent with {size} local endpoints")
        limit = 300.0 + size * 0.1
        point = run_memory_child(url, host, size, workdir, limit)
        log(f"  {point}")
        points.append(point)
    return {"points": points, "slope_kib_per_endpoint": slope(points)}


def med(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def figures(result: Json) -> Json:
    """The headline figures (None where missing) and whether each goal was met."""
    path = result.get("data_path", {})
    states = path.get("states", {})
    a, b = states.get("a", {}), states.get("b", {})
    bw_a, bw_b = med(a.get("bw", [])), med(b.get("bw", []))
    lat_a, lat_b = med(a.get("lat", [])), med(b.get("lat", []))
    con_a, con_b = med(a.get("connect", [])), med(b.get("connect", []))
    small_a, small_b = med(a.get("lat1", [])), med(b.get("lat1", []))
    warm = path.get("resync", {}).get("warm", [])
    resync = warm_median(warm) if warm else None
    mem = result.get("memory", {})
    points = {p["endpoints"]: p for p in mem.get("points", [])}
    bw_ratio = report.ratio(bw_b, bw_a)
    lat_diff = None if lat_a is None or lat_b is None else (lat_b - lat_a) * 1e6
    out: Json = {
        "bw_a_gbit": None if bw_a is None else bw_a * 8 / 1e9,
        "bw_b_gbit": None if bw_b is None else bw_b * 8 / 1e9,
        "bandwidth_ratio": bw_ratio,
        "lat_a_us": None if lat_a is None else lat_a * 1e6,
        "lat_b_us": None if lat_b is None else lat_b * 1e6,
        "latency_diff_us": lat_diff,
        "lat1_a_us": None if small_a is None else small_a * 1e6,
        "lat1_b_us": None if small_b is None else small_b * 1e6,
        "lat1_diff_us": None if small_a is None or small_b is None else (small_b - small_a) * 1e6,
        "connect_a_us": None if con_a is None else con_a * 1e6,
        "connect_b_us": None if con_b is None else con_b * 1e6,
        "connect_diff_us": None if con_a is None or con_b is None else (con_b - con_a) * 1e6,
        "endpoints_b": b.get("endpoints"),
        "resync_s": resync,
        "resync_cold_s": path.get("resync", {}).get("cold", {}).get("total"),
        "memory_kib": {n: p.get("rss_after_kib") for n, p in points.items()},
        "memory_before_kib": {n: p.get("rss_before_kib") for n, p in points.items()},
        "full_pass_s": {n: p.get("full_pass_s") for n, p in points.items()},
        "memory_slope_kib_per_endpoint": mem.get("slope_kib_per_endpoint"),
    }
    out["goals"] = {
        "bandwidth_ratio": None if bw_ratio is None else bw_ratio >= GOALS["bandwidth_ratio"],
        "latency_diff_us": None if lat_diff is None else lat_diff <= GOALS["latency_diff_us"],
        "resync_s": None if resync is None else resync <= GOALS["resync_s"],
    }
    return out


# ---- the report -----------------------------------------------------------------------------


def _n(value: Any, fmt: str = ".2f") -> str:
    return report.EN_DASH if value is None else format(value, fmt)


def _met(value: bool | None) -> str:
    return report.EN_DASH if value is None else ("met" if value else "missed")


def write_report(result: Json, out: Path) -> None:
    f = result["figures"]
    s = result["settings"]
    path = result.get("data_path", {})
    states = path.get("states", {})

    def spread(key: str, scale: float, digits: str) -> list[str]:
        """The (a) and (b) cells: median [min-max] of the repetitions."""
        return [
            report.format_spread(
                [v * scale for v in states.get(st, {}).get(key, [])], lambda v: format(v, digits)
            )
            for st in ("a", "b")
        ]

    rows = [
        ["qperf tcp_bw 64 KiB, Gbit/s", *spread("bw", 8e-9, ".1f"),
         f"ratio {report.format_ratio(f['bandwidth_ratio'])} (goal >= 0.95): "
         f"{_met(f['goals']['bandwidth_ratio'])}"],
        ["qperf tcp_lat 64 KiB one way, us", *spread("lat", 1e6, ".1f"),
         f"{_n(f['latency_diff_us'], '+.2f')} us (goal <= +1 us): "
         f"{_met(f['goals']['latency_diff_us'])}"],
        ["qperf tcp_lat 1 B one way, us", *spread("lat1", 1e6, ".1f"),
         f"{_n(f['lat1_diff_us'], '+.2f')} us"],
        ["new TCP connection, us", *spread("connect", 1e6, ".0f"),
         f"{_n(f['connect_diff_us'], '+.1f')} us"],
    ]  # fmt: skip
    kernel = [
        [state, str(info.get("endpoints", "")), *(str(v) for v in info.get("kernel", {}).values())]
        for state, info in states.items()
    ]
    mem_rows = [
        [
            str(p["endpoints"]),
            _n(p.get("rss_before_kib", None) and p["rss_before_kib"] / 1024, ".1f"),
            _n(p.get("rss_after_kib", None) and p["rss_after_kib"] / 1024, ".1f"),
            _n(p.get("seconds_to_program"), ".1f"),
            _n(p.get("full_pass_s"), ".2f"),
            str(p.get("error", p.get("last_error") or "")),
        ]
        for p in result.get("memory", {}).get("points", [])
    ]
    resync = path.get("resync", {})
    steps = list(resync.get("cold", {}).keys())
    resync_rows = [
        [step, _n(resync["cold"].get(step), ".3f"),
         _n(med([p[step] for p in resync.get("warm", [])]), ".3f")]
        for step in steps
    ]  # fmt: skip
    errors = [e for st in states.values() for e in st.get("errors", [])] + result["errors"]
    sections = [
        (
            "Results",
            f"State (a): the pair's own policy only.  State (b): {f['endpoints_b']} endpoints "
            f"({s['local']} local with veths over {s['profiles'] + 1} profiles, "
            f"{s['remote']} of other hosts).  Medians of {s['reps']} repetitions per state, "
            "taken in turn, as median [min-max]; qperf's ends pinned to one CPU.\n\n"
            + report.markdown_table(["figure", "(a)", "(b)", "(b) against (a)"], rows)
            + "\n\nOnly a connection's first packet walks the policy chains (conntrack "
            "accepts the rest), so qperf's established streams see the rule count hardly "
            "at all; the new-connection figure is where the dispatch chains and ipset "
            "lookups show.",
        ),
        (
            "Kernel state programmed",
            report.markdown_table(
                ["state", "endpoints", "rules", "chains", "ipsets", "ipset members"], kernel
            ),
        ),
        (
            "Full resync, seconds by step",
            f"{s['local']} local endpoints (state b).  From (a): the full pass right after "
            "the switch from state (a), which programs every endpoint but the pair; warm: "
            f"median of {s['resyncs']} more, over an unchanged kernel (the periodic "
            f"resync).  Goal <= 1 s (warm): {_met(f['goals']['resync_s'])}.  Read: the "
            "datastore read; compile: what no adapter call accounts for (decoding, "
            "compiling); applier_python: the applier's own work around its ipset and "
            "iptables processes.\n\n"
            + report.markdown_table(["step", "from (a)", "warm"], resync_rows),
        ),
        (
            "Agent memory",
            "RSS of a fresh process running the agent (its change stream and in-memory copy "
            "of the datastore included), before the agent starts and once it has programmed "
            "every local endpoint (real veths).  Slope: "
            f"{_n(f['memory_slope_kib_per_endpoint'], '.2f')} KiB per endpoint.\n\n"
            + report.markdown_table(
                [
                    "local endpoints",
                    "RSS before, MiB",
                    "RSS after, MiB",
                    "s to program",
                    "full pass, s",
                    "error",
                ],
                mem_rows,
            ),
        ),
        (
            "Datastore read at size",
            "Listings are read in pages of {} keys at one revision: at {:.0f} bytes an "
            "endpoint record (key and value) a page is about {} KiB, far below gRPC's 4 MiB "
            "message limit, which one answer for the whole cluster passed at about 9,500 "
            "endpoints.".format(
                etcd_module.PAGE_KEYS,
                result["read_size"]["bytes_per_record"],
                result["read_size"]["page_bytes"] // 1024,
            ),
        ),
        (
            "Machine",
            f"Load average before {result['load_before']}, after {result.get('load_after')} "
            f"(2 cores shared with other work).  Run took {result['seconds']:.0f} s; veths "
            f"for {s['local']} endpoints took {path.get('veth_seconds', 0):.1f} s.\n\n"
            + report.system_info_markdown(report.system_info()),
        ),
    ]
    if errors:
        sections.append(("Errors", "\n".join(f"- {e}" for e in errors)))
    report.write_markdown(out / "policy_at_size.md", sections, title="calicnm policy at size")
    report.write_json(out / "policy_at_size.json", result)
    profile = path.get("resync_profile")
    if profile:
        (out / "policy_at_size_profile.txt").write_text(profile)


# ---- entry point --------------------------------------------------------------------------


def _sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt("SIGTERM")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--out", type=Path, help="report directory (bench/results/<UTC time>/)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        url, path, size, markers, limit = json.loads(args.memory_child)
        print(json.dumps(memory_child(url, path, int(size), markers, float(limit))))
        return 0
    if os.geteuid() != 0:
        print("policy_at_size: needs root", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    out: Path = args.out or REPO / "bench" / "results" / report.utc_stamp()
    with tempfile.TemporaryDirectory(prefix="cnmt-size-", ignore_cleanup_errors=True) as tmp:
        result = measure(Settings.make(args.quick), Path(tmp))
    write_report(result, out)
    log(f"report in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
