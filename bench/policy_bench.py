#!/usr/bin/env python3
"""Control-plane benchmark of policy enforcement (prints figures; asserts nothing).

Builds, inside a throwaway network namespace, a host with N endpoints (real
veths) spread over P profiles, in a throwaway etcd, and measures with the
real agent:

- full resync: one complete pass (read etcd, compile, rewrite every chain
  and ipset, re-assert every route), cold and warm;
- rule change -> enforcement: the time from writing a changed profile to
  etcd until ``iptables-restore`` has returned with the new chain, over a
  series of changes, as median and p99;
- the number of iptables rules and ipset members programmed.

Baselines measured in the same run: one etcd put, and one
``iptables-restore`` of a one-rule chain (the floor any rule change pays).

Usage (root, from the repository's root):
.venv/bin/python -m bench.policy_bench [--endpoints 1000] [--profiles 50]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import ipaddress
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from calicnm.endpoint import derive_mac, plan_link
from calicnm.host.ipsets import Ipsets
from calicnm.host.iptables import Iptables
from calicnm.host.markers import Markers
from calicnm.host.netlink import HostPlumbing
from calicnm.host.policy_applier import PolicyApplier
from calicnm.model import Endpoint, Network
from calicnm.node.agent import Agent
from calicnm.policy import Profile, Rule
from calicnm.store import keys
from calicnm.store.etcd import EtcdStore, parse_endpoints
from lab.etcd import EtcdServer

CLONE_NEWNET = 0x40000000


def setns(path: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/self/ns/net", os.O_RDONLY)
    fd = os.open(path, os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    os.close(fd)
    return original


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class TimedDataplane(PolicyApplier):
    """Records when each apply returned and which chains it wrote."""

    def __init__(self) -> None:
        super().__init__(Iptables(), Ipsets())
        self.applied: list[tuple[float, set[str]]] = []
        self._last: dict[str, tuple[str, ...]] = {}

    def apply(self, desired, full=False):  # type: ignore[no-untyped-def]
        changed = {n for n, r in desired.chains.items() if self._last.get(n) != r}
        stats = super().apply(desired, full)
        self.applied.append((time.perf_counter(), changed))
        self._last = dict(desired.chains)
        return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoints", type=int, default=1000)
    ap.add_argument("--profiles", type=int, default=50)
    ap.add_argument("--changes", type=int, default=60)
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("etcd") is None:
        print("needs root and etcd (run 'make test' once to install it)", file=sys.stderr)
        return 2

    workdir = tempfile.mkdtemp(prefix="calicnm-bench-")
    etcd = EtcdServer()
    ns = "cnmb" + uuid.uuid4().hex[:8]
    original = -1
    try:
        etcd.start()
        store = EtcdStore(parse_endpoints(etcd.url))
        store.get("/x")  # connect now, from the root namespace, where etcd listens
        subprocess.run(["ip", "netns", "add", ns], check=True)
        original = setns(f"/run/netns/{ns}")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return run(store, args, workdir)
    finally:
        if original >= 0:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.setns(original, CLONE_NEWNET)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        etcd.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def run(store: EtcdStore, args: argparse.Namespace, workdir: str) -> int:
    n, p = args.endpoints, args.profiles
    print(f"setting up {n} endpoints (real veths) over {p} profiles ...", flush=True)
    names = [f"prof{i:03d}" for i in range(p)]
    for name in names:
        base = Profile.default(name)
        extra = (
            Rule.from_dict({"action": "allow", "protocol": "tcp", "dst_ports": [80, 443]}),
            Rule.from_dict({"action": "deny", "src_net": "10.99.0.0/16"}),
        )
        store.put(
            keys.profile(name),
            Profile(name, base.tags, extra + base.inbound, base.outbound).to_json(),
        )
    store.put(keys.network("n" * 64), Network("n" * 64, docker_name=names[0]).to_json())
    plumbing = HostPlumbing()
    t0 = time.perf_counter()
    for i in range(n):
        eid = hashlib.sha256(str(i).encode()).hexdigest()
        ip = ipaddress.IPv4Address("10.128.0.0") + i + 1
        plan = plan_link(eid, derive_mac(eid), (ip,))
        plumbing.create(plan)
        ep = Endpoint(
            eid,
            "bench",
            "n" * 64,
            plan.host_if,
            plan.peer_if,
            plan.mac,
            (ip,),
            profiles=(names[i % p],),
        )
        store.put(keys.endpoint("bench", eid), ep.to_json())
    print(f"  setup took {time.perf_counter() - t0:.1f} s")

    dataplane = TimedDataplane()
    agent = Agent(store, "bench", dataplane, plumbing, Markers(f"{workdir}/markers"))
    t0 = time.perf_counter()
    agent.reconcile(full=True)
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(3):
        t0 = time.perf_counter()
        agent.reconcile(full=True)
        warm.append(time.perf_counter() - t0)
    rules = sum(
        1
        for line in subprocess.run(
            ["iptables-save", "-t", "filter"], check=True, capture_output=True, text=True
        ).stdout.splitlines()
        if line.startswith("-A calicnm")
    )
    members = subprocess.run(["ipset", "list"], capture_output=True, text=True).stdout.count(
        "\n10.128."
    )

    # Baselines: one etcd put; one iptables-restore of a one-rule chain.
    puts = []
    for i in range(30):
        t0 = time.perf_counter()
        store.put("/calicnm/v1/config/bench", str(i))
        puts.append(time.perf_counter() - t0)
    floor = []
    ipt = Iptables()
    for _ in range(10):
        t0 = time.perf_counter()
        ipt.restore("*filter\n:calicnm-bench - [0:0]\n-A calicnm-bench -j RETURN\nCOMMIT\n")
        floor.append(time.perf_counter() - t0)
    ipt.restore("*filter\n:calicnm-bench - [0:0]\n-X calicnm-bench\nCOMMIT\n")

    # Rule changes with the agent running on its etcd watch.
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop, store), daemon=True)
    thread.start()
    time.sleep(1.0)
    latencies = []
    for i in range(args.changes):
        name = names[i % p]
        base = Profile.default(name)
        rule = Rule.from_dict({"action": "allow", "protocol": "tcp", "dst_ports": [10000 + i]})
        chain = f"calicnm-pi-{name}"
        seen = len(dataplane.applied)
        t0 = time.perf_counter()
        store.put(
            keys.profile(name),
            Profile(name, base.tags, (rule, *base.inbound), base.outbound).to_json(),
        )
        deadline = time.monotonic() + 10
        done = None
        while done is None and time.monotonic() < deadline:
            for when, changed in dataplane.applied[seen:]:
                if chain in changed:
                    done = when
                    break
            time.sleep(0.001)
        if done is None:
            print(f"  change {i}: not applied within 10 s")
            continue
        latencies.append(done - t0)
        time.sleep(0.05)
    stop.set()
    agent.wake()
    thread.join(timeout=10)

    ms = 1000.0
    print()
    print(f"endpoints {n}, profiles {p}, iptables rules {rules}, ipset members {members}")
    print(
        f"full resync: cold {cold * ms:.0f} ms, warm median {statistics.median(warm) * ms:.0f} ms"
    )
    print(
        f"rule change -> kernel: median {statistics.median(latencies) * ms:.1f} ms, "
        f"p99 {pct(latencies, 0.99) * ms:.1f} ms, max {max(latencies) * ms:.1f} ms "
        f"(n={len(latencies)})"
    )
    baseline = statistics.median(puts) + statistics.median(floor)
    print(
        f"baseline: etcd put {statistics.median(puts) * ms:.1f} ms + one-chain "
        f"iptables-restore {statistics.median(floor) * ms:.1f} ms = {baseline * ms:.1f} ms"
    )
    print(f"ratio rule-change median / baseline: {statistics.median(latencies) / baseline:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
